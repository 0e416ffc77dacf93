"""The session: one accepted client connection, from original destination to close event.

A session is callbacks on the event loop, not a task: connect upstream without blocking (the
socket becomes writable when the connect completes, a timer enforces the connect timeout), then
hand both sockets to a `Relay`. Whatever goes wrong inside one session is caught here, at the
session boundary: logged with its id, both sides reset, only this session ended. A session can
also be cut from outside (`Session.cut`: a timeout, the end of a drain); it then closes with
that reason and resets both sides.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from tproxy.core.config import ProxyConfig, RelayKind
from tproxy.core.session import SessionRecord, format_sockaddr
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

# How a failed upstream connect is named in the close reason.
_CONNECT_FAILURE_REASONS = {
    errno.ECONNREFUSED: "upstream_refused",
    errno.EHOSTUNREACH: "upstream_unreachable",
    errno.ENETUNREACH: "upstream_unreachable",
    errno.ETIMEDOUT: "upstream_timeout",
    errno.EMFILE: "out_of_descriptors",
    errno.ENFILE: "out_of_descriptors",
}


@dataclass
class SessionContext:
    """What every session of one proxy shares: the configuration, the log, the live sessions.

    `config` is replaced on reload; a session reads it when it starts.
    """

    config: ProxyConfig
    log: EventLog
    guard: SelfConnectGuard
    spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]
    # The accepted socket's original destination: getsockname() for TPROXY, conntrack for
    # REDIRECT (`interception.original_dst`).
    destination: Destination = socket.socket.getsockname
    poller: Poller = field(init=False)  # set when the server starts serving
    pipes: PipePool = field(default_factory=PipePool)
    sessions: set[Session] = field(default_factory=set)
    next_id: int = 1

    @property
    def active(self) -> int:
        return len(self.sessions)


class Session:
    """One intercepted connection: starts when created, ends by itself or by `cut`."""

    __slots__ = ("_client_sock", "_ctx", "_relay", "_upstream", "connecting", "record")

    def __init__(
        self, ctx: SessionContext, client_sock: socket.socket, client_addr: tuple[Any, ...]
    ) -> None:
        self._ctx = ctx
        self._client_sock = client_sock
        self._upstream: socket.socket | None = None
        # True while the upstream connect is in flight; the server's sweep enforces the
        # connect timeout (a timer per connection would cost more than the rest of accepting).
        self.connecting = False
        self._relay: Relay | None = None
        lookup_error: OSError | None = None
        try:
            dst_addr = ctx.destination(client_sock)
        except OSError as exc:  # REDIRECT mode, and conntrack knows no original destination
            dst_addr, lookup_error = client_sock.getsockname(), exc
        record = self.record = SessionRecord(
            ctx.next_id, format_sockaddr(client_addr), format_sockaddr(dst_addr), time.monotonic()
        )
        ctx.next_id += 1
        ctx.sessions.add(self)
        ctx.log.emit(SessionOpened(record.id, record.client, record.dst, ctx.active))
        if lookup_error is not None:
            detail = f"no original destination (not redirected?): {lookup_error.strerror}"
            name = errno.errorcode.get(lookup_error.errno or 0, "ENOENT")
            ctx.log.emit(UpstreamFailed(record.id, record.dst, name, detail))
            self._end("no_original_destination", abort=True)
            return
        try:
            self._start(client_addr[0], dst_addr)
        except Exception as exc:  # the session boundary
            self._fail(exc)

    def _start(self, client_ip: str, dst_addr: tuple[Any, ...]) -> None:
        ctx, record = self._ctx, self.record
        if ctx.guard.is_self(dst_addr):
            ctx.log.emit(
                UpstreamFailed(record.id, record.dst, "ELOOP", "destination is this proxy")
            )
            self._end("loop_refused", abort=True)
            return
        config = ctx.config
        spoof_ip = client_ip if config.spoof_source else None
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
            ctx.poller.add_writer(sock.fileno(), self)
            self.connecting = True
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
            self._fail(exc)

    def connect_timed_out(self) -> None:
        """The sweep found the upstream connect still in flight after the connect timeout."""
        self._stop_connecting()
        timeout_s = self._ctx.config.connect_timeout_s
        self._connect_failed(errno.ETIMEDOUT, f"no answer within {timeout_s:g} s")

    def _stop_connecting(self) -> None:
        if self.connecting:
            self.connecting = False
            assert self._upstream is not None
            self._ctx.poller.remove_writer(self._upstream.fileno())

    def _connect_failed(self, code: int, detail: str) -> None:
        record = self.record
        name = errno.errorcode.get(code, str(code))
        self._ctx.log.emit(UpstreamFailed(record.id, record.dst, name, detail))
        self._end(_CONNECT_FAILURE_REASONS.get(code, "upstream_failed"), abort=True)

    def _connected(self) -> None:
        ctx, record = self._ctx, self.record
        upstream = self._upstream
        assert upstream is not None
        connect_ms = round((time.monotonic() - record.opened_at) * 1000, 3)
        source = format_sockaddr(upstream.getsockname())
        ctx.log.emit(UpstreamConnected(record.id, record.dst, source, connect_ms))
        pool = ctx.pipes if ctx.config.relay is RelayKind.SPLICE else None
        self._relay = Relay(ctx.poller, self._client_sock, upstream, record, pool=pool,
                            on_end=self._relay_ended, on_error=self._fail,
                            spawn=ctx.spawn)  # fmt: skip

    def _relay_ended(self, reason: str) -> None:
        self._end(reason, abort=False)  # the relay has already reset the sockets if it had to

    def cut(self, reason: str) -> None:
        """End the session now: both sides are reset and the close says `reason`."""
        if self in self._ctx.sessions:
            self._stop_connecting()
            if self._relay is not None:
                self._relay.stop()
            self._end(reason, abort=True)

    def _fail(self, exc: BaseException) -> None:
        """The session boundary: an unexpected error ends this session only, logged."""
        if self in self._ctx.sessions:
            self._stop_connecting()
            if self._relay is not None:
                self._relay.stop()
            self._ctx.log.emit(SessionFailed(self.record.id, f"{type(exc).__name__}: {exc}"))
            self._end("error", abort=True)

    def _end(self, reason: str, *, abort: bool) -> None:
        for sock in (self._client_sock, self._upstream):
            if sock is None:
                continue
            if sock.fileno() >= 0:
                self._ctx.poller.forget(sock.fileno())
            if abort:
                abort_socket(sock)
            else:
                sock.close()
        ctx, record = self._ctx, self.record
        ctx.sessions.discard(self)
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
            )
        )
