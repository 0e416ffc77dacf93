"""The session: one accepted client connection, from original destination to close event.

A session is callbacks on the event loop, not a task. Its life is a few phases (`Phase`), in
this order, each entered once (docs/life-of-a-connection.md draws them):

    NEW ──start()──▶ CONNECTING ──connected──▶ RELAYING ──relay ended──▶ CLOSED
     │                   │                                                  ▲
     └──refused──────────┴──connect failed / deadline─────────────────────-─┘

`Session(...)` only records the accepted socket; `start()` reads the original destination,
writes `session_open`, applies the loop guard and starts the non-blocking upstream connect (the
socket becomes writable when it completes). While CONNECTING the session has a deadline,
`connect_deadline_at`; the server's sweep calls `sweep(now)` to enforce it, and the relay's idle
and half-closed timeouts once RELAYING. Every way out -- the relay ending, a refusal, a failed
connect, a timeout, a cut from outside (`close`), an unexpected error (`fail`) -- goes through
`close()`, the one teardown: stop what runs, close or reset both sockets, write `session_close`.

Whatever goes wrong inside one session is caught at this boundary: logged with its id, both
sides reset, only this session ended.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from tproxy.core.config import ProxyConfig, RelayKind
from tproxy.core.endpoint import format_sockaddr
from tproxy.core.lifecycle import expired_reason
from tproxy.core.reasons import CloseReason
from tproxy.core.session import SessionRecord
from tproxy.core.session_id import SessionIds
from tproxy.engine.pipes import PipePool
from tproxy.engine.poller import Poller
from tproxy.engine.relay import Relay
from tproxy.interception.original_dst import Destination
from tproxy.interception.self_connect import SelfConnectGuard
from tproxy.interception.sockopts import abort_socket, open_upstream_socket
from tproxy.observability.eventlog import EventLog
from tproxy.observability.events import (
    SessionClosed,
    SessionFailed,
    SessionOpened,
    UpstreamConnected,
    UpstreamFailed,
)
from tproxy.sniffers.passive import FirstBytes

# How a failed upstream connect is named in the close reason.
_CONNECT_FAILURE_REASONS = {
    errno.ECONNREFUSED: CloseReason.UPSTREAM_REFUSED,
    errno.EHOSTUNREACH: CloseReason.UPSTREAM_UNREACHABLE,
    errno.ENETUNREACH: CloseReason.UPSTREAM_UNREACHABLE,
    errno.ETIMEDOUT: CloseReason.UPSTREAM_TIMEOUT,
    errno.EMFILE: CloseReason.OUT_OF_DESCRIPTORS,
    errno.ENFILE: CloseReason.OUT_OF_DESCRIPTORS,
}


class Phase(enum.Enum):
    """Where a session is in its life; each phase is entered at most once, in this order."""

    NEW = "new"  # accepted; start() not called yet
    CONNECTING = "connecting"  # the upstream connect is in flight (until connect_deadline_at)
    RELAYING = "relaying"  # both sockets belong to the relay (idle and half-closed timeouts)
    CLOSED = "closed"  # sockets closed or reset, `session_close` written


@dataclass
class SessionContext:
    """What every session of one proxy process shares: configuration, log, ids, live sessions.

    `config` is replaced on reload; a session reads it when it starts.
    """

    config: ProxyConfig
    log: EventLog
    guard: SelfConnectGuard
    spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]
    ids: SessionIds
    # The accepted socket's original destination: getsockname() for TPROXY, conntrack for
    # REDIRECT (`interception.original_dst`).
    destination: Destination = socket.socket.getsockname
    poller: Poller = field(init=False)  # set when the server starts serving
    pipes: PipePool = field(default_factory=PipePool)
    sessions: set[Session] = field(default_factory=set)
    # Counters since this process started (the supervisor's heartbeats carry them).
    opened: int = 0
    closed_bytes_up: int = 0
    closed_bytes_down: int = 0

    @property
    def active(self) -> int:
        return len(self.sessions)


class Session:
    """One intercepted connection: `start()` it; it ends by itself, by `close` or by `fail`."""

    __slots__ = (
        "_client_addr",
        "_client_sock",
        "_ctx",
        "_relay",
        "_sniffer",
        "_upstream",
        "connect_deadline_at",
        "phase",
        "record",
    )

    def __init__(
        self, ctx: SessionContext, client_sock: socket.socket, client_addr: tuple[Any, ...]
    ) -> None:
        self._ctx = ctx
        self._client_sock = client_sock
        self._client_addr = client_addr
        self._upstream: socket.socket | None = None
        self._relay: Relay | None = None
        self._sniffer: FirstBytes | None = None
        self.phase = Phase.NEW
        self.connect_deadline_at = 0.0  # meaningful while CONNECTING
        self.record: SessionRecord | None = None  # made by start()

    def start(self) -> None:
        """Read the original destination, log the open, refuse loops, start the connect."""
        try:
            self._start()
        except Exception as exc:  # the session boundary
            self.fail(exc)
        # The record has the client's address now; an idle session keeps no more than it needs
        # (memory per idle session is a benchmark target).
        self._client_addr = ()

    def _start(self) -> None:
        ctx, client_sock = self._ctx, self._client_sock
        lookup_error: OSError | None = None
        try:
            dst_addr = ctx.destination(client_sock)
        except OSError as exc:  # REDIRECT mode, and conntrack knows no original destination
            dst_addr, lookup_error = client_sock.getsockname(), exc
        now = time.monotonic()
        record = self.record = SessionRecord(
            ctx.ids.next(), format_sockaddr(self._client_addr), format_sockaddr(dst_addr), now
        )
        ctx.sessions.add(self)
        ctx.opened += 1
        ctx.log.emit(SessionOpened(record.id, record.client, record.dst, ctx.active))
        if lookup_error is not None:
            detail = f"no original destination (not redirected?): {lookup_error.strerror}"
            name = errno.errorcode.get(lookup_error.errno or 0, "ENOENT")
            ctx.log.emit(UpstreamFailed(record.id, record.dst, name, detail))
            self.close(CloseReason.NO_ORIGINAL_DESTINATION)
            return
        if ctx.guard.is_self(dst_addr):
            ctx.log.emit(
                UpstreamFailed(record.id, record.dst, "ELOOP", "destination is this proxy")
            )
            self.close(CloseReason.LOOP_REFUSED)
            return
        config = ctx.config
        spoof_ip = self._client_addr[0] if config.spoof_source else None
        try:
            sock = open_upstream_socket(dst_addr[0], spoof_ip, config.mark)
        except OSError as exc:
            self._connect_failed(exc.errno or 0, exc.strerror or str(exc))
            return
        self._upstream = sock
        code = sock.connect_ex(dst_addr[:2])
        if code == 0:
            self._connected()
        elif code == errno.EINPROGRESS:
            # No timer per connection (it would cost more than the rest of accepting): the
            # server's sweep enforces this deadline.
            self.connect_deadline_at = now + config.connect_timeout_s
            self.phase = Phase.CONNECTING
            ctx.poller.add_writer(sock.fileno(), self)
        else:
            self._connect_failed(code, os.strerror(code))

    def on_writable(self) -> None:
        """The upstream connect finished, one way or the other."""
        try:
            self._stop_connecting()
            assert self._upstream is not None
            code = self._upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._connect_failed(code, os.strerror(code))
            else:
                self._connected()
        except Exception as exc:
            self.fail(exc)

    def sweep(self, now: float) -> None:
        """Enforce this session's deadlines at `now` (monotonic); the server's sweep calls it."""
        if self.phase is Phase.CONNECTING:
            if now >= self.connect_deadline_at:
                self._stop_connecting()
                timeout_s = self._ctx.config.connect_timeout_s
                self._connect_failed(errno.ETIMEDOUT, f"no answer within {timeout_s:g} s")
        elif self.phase is Phase.RELAYING:
            record = self.record
            assert record is not None
            reason = expired_reason(
                record.last_activity_at, record.half_closed_at, now, self._ctx.config.timeouts
            )
            if reason is not None:
                self.close(reason)

    def _stop_connecting(self) -> None:
        if self.phase is Phase.CONNECTING:
            assert self._upstream is not None
            self._ctx.poller.remove_writer(self._upstream.fileno())

    def _connect_failed(self, code: int, detail: str) -> None:
        record = self.record
        assert record is not None
        name = errno.errorcode.get(code, str(code))
        self._ctx.log.emit(UpstreamFailed(record.id, record.dst, name, detail))
        self.close(_CONNECT_FAILURE_REASONS.get(code, CloseReason.UPSTREAM_FAILED))

    def _connected(self) -> None:
        ctx, record, upstream = self._ctx, self.record, self._upstream
        assert record is not None and upstream is not None
        connect_ms = round((time.monotonic() - record.opened_at) * 1000, 3)
        source = format_sockaddr(upstream.getsockname())
        ctx.log.emit(UpstreamConnected(record.id, record.dst, source, connect_ms))
        self.phase = Phase.RELAYING
        self.connect_deadline_at = 0.0  # past; and no float kept per idle session
        pool = ctx.pipes if ctx.config.relay is RelayKind.SPLICE else None
        # What the session is, read from its first bytes as they pass (no wait: no rule needs
        # the facts before connecting yet).
        self._sniffer = FirstBytes()
        self._relay = Relay(ctx.poller, self._client_sock, upstream, record, pool=pool,
                            on_end=self._relay_ended, on_error=self.fail,
                            spawn=ctx.spawn, tap=self._sniffer)  # fmt: skip

    def _relay_ended(self, reason: CloseReason) -> None:
        # A clean end leaves both sockets open for close() to send the last FINs; after a reset
        # the relay has already reset them. Either way the relay is done: nothing to stop.
        self._relay = None
        self.close(reason, abort=False)

    def fail(self, exc: BaseException) -> None:
        """The session boundary: an unexpected error ends this session only, logged."""
        if self.phase is not Phase.CLOSED:
            session_id = "-" if self.record is None else self.record.id
            self._ctx.log.emit(SessionFailed(session_id, f"{type(exc).__name__}: {exc}"))
            self.close(CloseReason.ERROR)

    def close(self, reason: CloseReason, *, abort: bool = True) -> None:
        """End the session (once): stop what runs, reset both sides (`abort`, the default) or
        close them with a FIN, write `session_close` with `reason`."""
        if self.phase is Phase.CLOSED:
            return
        self._stop_connecting()
        self.phase = Phase.CLOSED
        if self._relay is not None:
            self._relay.stop()
        ctx = self._ctx
        for sock in (self._client_sock, self._upstream):
            if sock is None:
                continue
            if sock.fileno() >= 0:
                ctx.poller.forget(sock.fileno())
            if abort:
                abort_socket(sock)
            else:
                sock.close()
        record = self.record
        if record is None:  # failed before the open was logged: nothing to close in the log
            return
        if self._sniffer is not None:
            record.sniffed = self._sniffer.final()
            self._sniffer = None
        ctx.sessions.discard(self)
        ctx.closed_bytes_up += record.bytes_up
        ctx.closed_bytes_down += record.bytes_down
        ctx.pipes.trim(ctx.active)
        ctx.log.emit(
            SessionClosed(
                record.id,
                record.client,
                record.dst,
                record.bytes_up,
                record.bytes_down,
                round(time.monotonic() - record.opened_at, 6),
                reason,
                ctx.active,
                record.relay,
                record.spliced_bytes,
                *(() if record.sniffed is None else record.sniffed.event_fields()),
            )
        )
