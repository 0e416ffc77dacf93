"""The session runner: one accepted client connection, from original destination to close event.

The one catch at the session boundary lives here: whatever goes wrong inside one session is
logged with its id, ends that session with a reset both ways, and never reaches the accept loop.
A session can also be cut from outside (`Session.cut`: a timeout, the end of a drain); it then
closes with that reason and resets both sides.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from tproxy.core.config import ProxyConfig
from tproxy.core.endpoint import Endpoint
from tproxy.core.session import SessionRecord
from tproxy.engine.pipes import PipePool
from tproxy.engine.relay import relay
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
# Reasons for which both sockets are reset rather than closed.
_ABORT_REASONS = frozenset({"error", "cancelled"})


@dataclass
class SessionContext:
    """What every session of one proxy shares: the configuration, the log, the live sessions.

    `config` is replaced on reload; a session reads it when it starts.
    """

    config: ProxyConfig
    log: EventLog
    guard: SelfConnectGuard
    spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]
    pipes: PipePool = field(default_factory=PipePool)
    sessions: set[Session] = field(default_factory=set)
    next_id: int = 1

    @property
    def active(self) -> int:
        return len(self.sessions)


class _ConnectError(Exception):
    def __init__(self, reason: str, error: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.error = error
        self.detail = detail


class Session:
    """One intercepted connection: opened by `start`, ended by itself or by `cut`."""

    __slots__ = ("_client_sock", "_ctx", "_cut_reason", "_task", "_upstream", "record")

    def __init__(self, ctx: SessionContext, client_sock: socket.socket, client: Endpoint) -> None:
        self._ctx = ctx
        self._client_sock = client_sock
        self._upstream: socket.socket | None = None
        self._cut_reason: str | None = None
        dst = Endpoint.from_sockaddr(client_sock.getsockname())
        self.record = SessionRecord(ctx.next_id, client, dst, time.monotonic())
        ctx.next_id += 1
        ctx.sessions.add(self)
        ctx.log.emit(SessionOpened(self.record.id, str(client), str(dst), ctx.active))
        self._task = ctx.spawn(self._run())

    def cut(self, reason: str) -> None:
        """End the session now: both sides are reset and the close says `reason`."""
        if self._cut_reason is None:
            self._cut_reason = reason
            self._task.cancel()

    async def _run(self) -> None:
        ctx, record = self._ctx, self.record
        reason = "error"
        try:
            reason = await self._serve()
        except asyncio.CancelledError:
            reason = self._cut_reason or "cancelled"
            if self._cut_reason is None:
                raise  # cancelled by someone else (loop shutdown): let it propagate
        except Exception as exc:  # the session boundary: log, count, end this session only
            reason = "error"
            ctx.log.emit(SessionFailed(record.id, f"{type(exc).__name__}: {exc}"))
        finally:
            self._close(reason)

    async def _serve(self) -> str:
        ctx, record = self._ctx, self.record
        if ctx.guard.is_self(record.dst):
            ctx.log.emit(
                UpstreamFailed(record.id, str(record.dst), "ELOOP", "destination is this proxy")
            )
            abort_socket(self._client_sock)
            return "loop_refused"
        try:
            self._upstream = await _connect_upstream(ctx.config, ctx.log, record)
        except _ConnectError as failed:
            ctx.log.emit(UpstreamFailed(record.id, str(record.dst), failed.error, failed.detail))
            abort_socket(self._client_sock)
            return failed.reason
        return await relay(self._client_sock, self._upstream, record, ctx.config.relay, ctx.pipes)

    def _close(self, reason: str) -> None:
        abort = reason in _ABORT_REASONS or self._cut_reason is not None
        for sock in (self._client_sock, self._upstream):
            if sock is None:
                continue
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
                str(record.client),
                str(record.dst),
                record.bytes_up,
                record.bytes_down,
                round(time.monotonic() - record.opened_at, 6),
                reason,
                ctx.active,
            )
        )


async def _connect_upstream(
    config: ProxyConfig, log: EventLog, record: SessionRecord
) -> socket.socket:
    loop = asyncio.get_running_loop()
    spoof_ip = record.client.ip if config.spoof_source else None
    try:
        sock = open_upstream_socket(record.dst, spoof_ip, config.mark)
    except OSError as exc:
        reason = _CONNECT_FAILURE_REASONS.get(exc.errno or 0, "upstream_failed")
        raise _ConnectError(reason, _errno_name(exc), _detail(exc)) from None
    started = time.monotonic()
    try:
        async with asyncio.timeout(config.connect_timeout_s):
            await loop.sock_connect(sock, record.dst.sockaddr)
    except TimeoutError:
        sock.close()
        raise _ConnectError(
            "upstream_timeout", "ETIMEDOUT", f"no answer within {config.connect_timeout_s:g} s"
        ) from None
    except OSError as exc:
        sock.close()
        reason = _CONNECT_FAILURE_REASONS.get(exc.errno or 0, "upstream_failed")
        raise _ConnectError(reason, _errno_name(exc), _detail(exc)) from None
    except BaseException:
        sock.close()
        raise
    source = Endpoint.from_sockaddr(sock.getsockname())
    connect_ms = round((time.monotonic() - started) * 1000, 3)
    log.emit(UpstreamConnected(record.id, str(record.dst), str(source), connect_ms))
    return sock


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _detail(exc: OSError) -> str:
    return exc.strerror or str(exc)
