"""The session runner: one accepted client connection, from original destination to close event.

The one catch at the session boundary lives here: whatever goes wrong inside one session is
logged with its id, ends that session with a reset both ways, and never reaches the accept loop.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from dataclasses import dataclass

from tproxy.core.config import ProxyConfig
from tproxy.core.endpoint import Endpoint
from tproxy.core.session import SessionRecord
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
}


@dataclass
class SessionContext:
    """What every session of one proxy shares: the configuration, the log, the live count."""

    config: ProxyConfig
    log: EventLog
    guard: SelfConnectGuard
    active: int = 0
    next_id: int = 1


class _ConnectError(Exception):
    def __init__(self, reason: str, error: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.error = error
        self.detail = detail


async def run_session(ctx: SessionContext, client_sock: socket.socket, client: Endpoint) -> None:
    """Serve one intercepted connection to the end; never raises (cancellation aside)."""
    dst = Endpoint.from_sockaddr(client_sock.getsockname())
    record = SessionRecord(ctx.next_id, client, dst, time.monotonic())
    ctx.next_id += 1
    ctx.active += 1
    ctx.log.emit(SessionOpened(record.id, str(client), str(dst), ctx.active))
    upstream: socket.socket | None = None
    reason = "error"
    try:
        if ctx.guard.is_self(dst):
            reason = "loop_refused"
            ctx.log.emit(
                UpstreamFailed(record.id, str(dst), "ELOOP", "destination is this proxy itself")
            )
            abort_socket(client_sock)
            return
        try:
            upstream = await _connect_upstream(ctx.config, ctx.log, record)
        except _ConnectError as failed:
            reason = failed.reason
            ctx.log.emit(UpstreamFailed(record.id, str(dst), failed.error, failed.detail))
            abort_socket(client_sock)
            return
        reason = await relay(client_sock, upstream, record)
    except asyncio.CancelledError:
        reason = "cancelled"
        raise
    except Exception as exc:  # the session boundary: log, count, end this session only
        reason = "error"
        ctx.log.emit(SessionFailed(record.id, f"{type(exc).__name__}: {exc}"))
    finally:
        if reason in ("error", "cancelled"):
            abort_socket(client_sock)
            if upstream is not None:
                abort_socket(upstream)
        else:
            client_sock.close()
            if upstream is not None:
                upstream.close()
        ctx.active -= 1
        ctx.log.emit(
            SessionClosed(
                record.id,
                str(client),
                str(dst),
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
        raise _ConnectError("upstream_failed", _errno_name(exc), _detail(exc)) from None
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
