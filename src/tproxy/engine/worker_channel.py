"""A worker's end of its channel with the supervisor: heartbeats out, requests in, replies out,
and the TLS passthrough memory shared both ways.

The channel lives on the worker's event loop as one reader and one timer: a heartbeat with the
worker's counters every `HEARTBEAT_INTERVAL_S` (and one at once, when serving starts), and each
request answered by the handler registered for its command in `HANDLERS`. A new command (kill,
metrics, readiness) is one function and one entry there. `reload` is the one answered later:
the worker reloads off its loop as on SIGHUP (`ProxyServer.reload_off_loop`) and replies once
that is done.

Passthrough sharing: while the channel runs it is the worker's `PassthroughMemory.on_remember`,
so each entry this worker remembers goes to the supervisor as a `Learned` message, which passes
it on to the other workers; a `Learned` that arrives (another worker's entries, or the
supervisor's whole copy when this worker starts) is `merge`d, which tells no one (no echo).

Nothing here may stop the worker: a message that cannot be sent at once (the supervisor is not
reading) is dropped (a learned entry dropped so is counted, and said in a notice at most every
`DROPS_REPORT_EVERY_S`: the other workers learn that name for themselves, at the cost of one
more failed session each), a malformed request is answered with an error. When the supervisor goes
away (the channel reads EOF) the worker stops as if told to: it sends itself SIGTERM, drains and
exits, rather than serve on unsupervised.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tproxy.core.reasons import CloseReason
from tproxy.core.worker_protocol import (
    HEARTBEAT_INTERVAL_S,
    MAX_MESSAGE_BYTES,
    Drops,
    Heartbeat,
    Learned,
    MessageError,
    Reloaded,
    Reply,
    Request,
    decode,
    encode,
)
from tproxy.engine.session import SessionContext
from tproxy.observability.events import Notice
from tproxy.tls.passthrough import PassthroughReason

# A listing names at most this many sessions (and says when it stopped short).
LISTING_LIMIT = 1000
# A heartbeat larger than this goes without its metrics (a policy of thousands of long rule
# names): a channel's datagram cannot be larger than its send buffer, which the kernel caps at
# twice net.core.wmem_max (416 KiB by default), and the heartbeat is what proves a worker alive.
HEARTBEAT_MAX_BYTES = 256 * 1024

Handler = Callable[[SessionContext, dict[str, Any]], dict[str, Any]]
Reloader = Callable[[], Awaitable[Reloaded]]
"""The worker's reload (`ProxyServer.reload_off_loop`)."""


def list_sessions(ctx: SessionContext, args: dict[str, Any]) -> dict[str, Any]:
    """`sessions`: this worker's live sessions, oldest first: id, client, original destination,
    SNI (once sniffed), the deciding rule, the relay, bytes each way, age and idle seconds."""
    live = sorted((s for s in ctx.sessions if s.record is not None),
                  key=lambda s: s.record.id)  # type: ignore[union-attr]  # fmt: skip
    now = time.monotonic()
    listed = []
    for session in live[:LISTING_LIMIT]:
        record = session.record
        assert record is not None
        sniffed = session.sniffed_so_far
        listed.append({
            "id": record.id, "client": record.client, "dst": record.dst,
            "sni": None if sniffed is None else sniffed.sni, "rule": record.rule,
            "relay": record.relay, "bytes_up": record.bytes_up, "bytes_down": record.bytes_down,
            "age_s": round(now - record.opened_at, 3),
            "idle_s": round(now - record.last_activity_at, 3),
        })  # fmt: skip
    return {"active": len(live), "sessions": listed, "truncated": len(listed) < len(live)}


def kill_session(ctx: SessionContext, args: dict[str, Any]) -> dict[str, Any]:
    """`kill`: reset the live session `args["id"]` on both sides (reason `killed`), if it is
    this worker's."""
    wanted = args.get("id")
    for session in list(ctx.sessions):
        if session.record is not None and session.record.id == wanted:
            session.close(CloseReason.KILLED)
            return {"killed": True}
    return {"killed": False}


HANDLERS: dict[str, Handler] = {"sessions": list_sessions, "kill": kill_session}


def heartbeat_of(ctx: SessionContext, worker: int, pid: int) -> Heartbeat:
    """The worker's counters now (with its metrics' snapshot, when it keeps them)."""
    bytes_up, bytes_down = ctx.closed_bytes_up, ctx.closed_bytes_down
    live: dict[str | None, list[int]] = {}
    for session in ctx.sessions:
        record = session.record
        if record is not None:
            bytes_up += record.bytes_up
            bytes_down += record.bytes_down
            if record.bytes_up or record.bytes_down:
                moved = live.get(record.rule)
                if moved is None:
                    moved = live[record.rule] = [0, 0]
                moved[0] += record.bytes_up
                moved[1] += record.bytes_down
    metrics = None if ctx.metrics is None else ctx.metrics.snapshot(live)
    return Heartbeat(worker, pid, ctx.active, ctx.opened, bytes_up, bytes_down, metrics)


class WorkerChannel:
    """The worker's end of a SOCK_SEQPACKET socketpair with the supervisor.

    Args:
        sock: the worker's end (made non-blocking here).
        worker: this worker's number, 1 to N.
    """

    def __init__(self, sock: socket.socket, worker: int) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._worker = worker
        self._pid = os.getpid()
        self._ctx: SessionContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.dropped = 0
        # Learned passthrough entries the supervisor could not take (counted in `dropped` too).
        self.learned_drops = Drops()
        self._said_metrics_too_large = False
        self._reload: Reloader | None = None
        self._reloads: set[asyncio.Task[None]] = set()  # `reload` requests being carried out

    def start(
        self, loop: asyncio.AbstractEventLoop, ctx: SessionContext, reload: Reloader | None = None
    ) -> None:
        """Serving has started: beat now and every second, answer requests (`reload` with
        `reload`, once it is done), share what the passthrough memory remembers."""
        self._loop, self._ctx, self._reload = loop, ctx, reload
        ctx.passthrough.on_remember = self._remembered
        loop.add_reader(self._sock.fileno(), self._on_readable)
        self._beat()

    def close(self) -> None:
        """The worker is done: no more heartbeats (the supervisor reaps it next)."""
        if self._ctx is not None:
            self._ctx.passthrough.on_remember = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _beat(self) -> None:
        assert self._loop is not None and self._ctx is not None
        beat = heartbeat_of(self._ctx, self._worker, self._pid)
        data = encode(beat)
        if len(data) > HEARTBEAT_MAX_BYTES and beat.metrics is not None:
            size, data = len(data), encode(dataclasses.replace(beat, metrics=None))
            if not self._said_metrics_too_large:
                self._said_metrics_too_large = True
                self._ctx.log.emit(Notice(
                    f"this worker's metrics ({size >> 10} KiB) are too large for its "
                    "heartbeat: the supervisor keeps their last figures (a policy with very "
                    "many or very long rule names?)"
                ))  # fmt: skip
        self._send(data)
        dropped = self.learned_drops.due(time.monotonic())
        if dropped:
            self._ctx.log.emit(
                Notice(
                    f"supervisor channel full: {dropped} passthrough entries learned here were "
                    "not shared with the other workers"
                )
            )
        self._timer = self._loop.call_later(HEARTBEAT_INTERVAL_S, self._beat)

    def _remembered(self, key: str, reason: PassthroughReason, left_s: float) -> None:
        """The passthrough memory's listener: tell the supervisor (never raises)."""
        if not self._send(encode(Learned(((key, reason.value, left_s),)))):
            self.learned_drops.add()

    def _send(self, data: bytes) -> bool:
        """Send `data` if the channel takes it at once; whether it did."""
        try:
            self._sock.send(data)
        except BlockingIOError:
            self.dropped += 1  # the supervisor is not reading: it learns we live next time
            return False
        except OSError as exc:
            if exc.errno == errno.EMSGSIZE and self._ctx is not None:  # a bug of ours: say so
                self._ctx.log.emit(
                    Notice(f"supervisor channel: a {len(data)}-byte message is too large to send")
                )
            # Otherwise the supervisor is gone: EOF on the reader says so.
            return False
        return True

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._sock.recv(MAX_MESSAGE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._supervisor_gone()
                return
            self._handle(data)

    def _handle(self, data: bytes) -> None:
        assert self._ctx is not None
        try:
            message = decode(data)
        except MessageError as exc:
            self._ctx.log.emit(Notice(f"supervisor channel: ignored a malformed message ({exc})"))
            return
        if isinstance(message, Learned):
            memory, now = self._ctx.passthrough, time.monotonic()
            for key, reason, left_s in message.entries:
                memory.merge(key, reason, left_s, now)
            return
        if not isinstance(message, Request):
            return
        if message.command == "reload" and self._reload is not None and self._loop is not None:
            task = self._loop.create_task(self._reload_then_reply(message.id, self._reload))
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)
            return
        handler = HANDLERS.get(message.command)
        if handler is None:
            reply = Reply(message.id, self._worker, error=f"unknown command {message.command!r}")
        else:
            try:
                reply = Reply(message.id, self._worker, handler(self._ctx, message.args))
            except Exception as exc:  # a handler's bug answers this request, nothing more
                reply = Reply(message.id, self._worker, error=f"{type(exc).__name__}: {exc}")
        self._send(encode(reply))

    async def _reload_then_reply(self, request_id: int, reload: Reloader) -> None:
        """`reload` (`tproxy reload`): reload as on SIGHUP, then answer whether the files were
        applied and what was said (a supervised worker logs none of it itself)."""
        try:
            applied, notices = await reload()
            reply = Reply(request_id, self._worker, {"reloaded": applied, "notices": notices})
        except Exception as exc:  # a bug of ours answers this request, nothing more
            reply = Reply(request_id, self._worker, error=f"{type(exc).__name__}: {exc}")
        self._send(encode(reply))

    def _supervisor_gone(self) -> None:
        assert self._loop is not None and self._ctx is not None
        self._loop.remove_reader(self._sock.fileno())
        self._ctx.log.emit(Notice("the supervisor is gone: stopping this worker"))
        os.kill(os.getpid(), signal.SIGTERM)
