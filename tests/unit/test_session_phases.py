"""The session's phases on real loopback sockets: nothing happens before `start()`, each phase
is entered once, deadlines are enforced by `sweep`, and every way out is one close event."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from tproxy.core.config import LogFormat, ProxyConfig
from tproxy.core.reasons import CloseReason
from tproxy.core.session_id import SessionIds, decode
from tproxy.engine.client_limits import ClientLimits
from tproxy.engine.poller import Poller
from tproxy.engine.session import Phase, Session, SessionContext
from tproxy.interception.self_connect import SelfConnectGuard
from tproxy.observability.eventlog import EventLog


class Harness:
    """A client connected to a listener standing in for the proxy, an upstream listener the
    session connects to, and a session context logging JSON into memory."""

    def __init__(self, config: ProxyConfig) -> None:
        self.log = io.StringIO()
        self.upstream = socket.create_server(("127.0.0.1", 0))
        upstream_addr = self.upstream.getsockname()
        self.ctx = SessionContext(
            config,
            EventLog(LogFormat.JSON, self.log),
            SelfConnectGuard([], lambda _ip: False),
            asyncio.ensure_future,
            SessionIds(5),
            destination=lambda _sock: upstream_addr,
        )
        self.ctx.poller = Poller(asyncio.get_running_loop())
        proxy = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(proxy.getsockname())
        accepted, addr = proxy.accept()
        accepted.setblocking(False)
        proxy.close()
        self.session = Session(self.ctx, accepted, addr)

    def events(self) -> list[dict[str, Any]]:
        self.ctx.log.flush()
        return [json.loads(line) for line in self.log.getvalue().splitlines()]

    def close(self) -> None:
        self.session.close(CloseReason.ERROR)  # a no-op if it closed: its sockets, if a test failed
        self.ctx.poller.close()
        self.client.close()
        self.upstream.close()


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


def _phase(session: Session) -> Phase:
    """The session's phase now (a call, so the type checker does not pin it between steps)."""
    return session.phase


def _run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


def test_nothing_happens_before_start_and_each_phase_comes_in_order() -> None:
    async def scenario() -> None:
        h = Harness(ProxyConfig())
        try:
            session = h.session
            assert session.phase is Phase.NEW and session.record is None
            assert h.events() == [] and h.ctx.active == 0  # the constructor did nothing
            session.start()
            assert session.phase in (Phase.CONNECTING, Phase.RELAYING)
            assert h.ctx.active == 1
            await _until(lambda: session.phase is Phase.RELAYING)
            loop = asyncio.get_running_loop()
            served, _ = h.upstream.accept()
            served.setblocking(False)
            h.client.sendall(b"ping")
            assert await loop.sock_recv(served, 4) == b"ping"
            h.client.shutdown(socket.SHUT_WR)
            assert await loop.sock_recv(served, 4) == b""  # the client's FIN, passed on
            served.close()
            await _until(lambda: session.phase is Phase.CLOSED)
            events = h.events()
            assert [e["event"] for e in events] == [
                "session_open", "upstream_connected", "session_close",
            ]  # fmt: skip
            assert session.record is not None
            assert {e["session"] for e in events} == {session.record.id}
            assert decode(events[0]["session"]).worker == 5
            assert events[-1]["reason"] == "closed" and h.ctx.active == 0
            assert events[-1]["proto"] == "unknown"  # "ping" is none of the protocols we know
        finally:
            h.close()

    _run(scenario)


def test_the_connect_deadline_is_enforced_by_sweep() -> None:
    async def scenario() -> None:
        h = Harness(ProxyConfig(connect_timeout_s=3))
        try:
            session = h.session
            session.start()
            # A non-blocking connect on loopback answers EINPROGRESS; the session stays
            # CONNECTING until the loop runs its writability callback, which this test never
            # lets happen: the sweep below sees a connect still in flight.
            assert session.phase is Phase.CONNECTING
            deadline = session.connect_deadline_at
            session.sweep(deadline - 0.001)
            assert session.phase is Phase.CONNECTING
            session.sweep(deadline)
            assert _phase(session) is Phase.CLOSED
            assert h.events()[-1]["reason"] == "upstream_timeout"
        finally:
            h.close()

    _run(scenario)


def test_idle_deadline_close_and_a_second_close_write_one_close_event() -> None:
    async def scenario() -> None:
        h = Harness(ProxyConfig(idle_timeout_s=60))
        try:
            session = h.session
            session.start()
            await _until(lambda: session.phase is Phase.RELAYING)
            record = session.record
            assert record is not None
            session.sweep(record.last_activity_at + 59.5)
            assert session.phase is Phase.RELAYING
            session.sweep(record.last_activity_at + 60.5)  # (+60 may round to 59.999...)
            assert _phase(session) is Phase.CLOSED
            session.close(CloseReason.DRAIN_TIMEOUT)
            session.fail(RuntimeError("late"))
            closes = [e for e in h.events() if e["event"] == "session_close"]
            assert [c["reason"] for c in closes] == ["idle_timeout"]
            assert [e["event"] for e in h.events()].count("session_error") == 0
        finally:
            h.close()

    _run(scenario)


def test_an_error_in_a_callback_fails_only_this_session_with_one_close() -> None:
    async def scenario() -> None:
        h = Harness(ProxyConfig())
        try:
            session = h.session
            session.start()
            session.fail(RuntimeError("boom"))
            events = h.events()
            assert [e["event"] for e in events][-2:] == ["session_error", "session_close"]
            assert events[-2]["error"] == "RuntimeError: boom"
            assert events[-1]["reason"] == "error" and h.ctx.active == 0
            assert session.phase is Phase.CLOSED
        finally:
            h.close()

    _run(scenario)


def test_a_session_releases_its_client_where_it_was_admitted_across_reloads() -> None:
    """Per-client limits turned off and on again by reloads: a session admitted before releases
    into the limits that admitted it, not into the new ones (whose count it is not in)."""

    async def scenario() -> None:
        h = Harness(ProxyConfig())
        try:
            before = ClientLimits(max_live=1, rate=None)
            h.ctx.client_limits = before
            assert before.admit("198.18.0.9", 0.0) is None
            session = Session(h.ctx, h.session._client_sock, ("198.18.0.9", 1), "198.18.0.9")
            h.ctx.client_limits = None  # a reload turns them off...
            after = ClientLimits(max_live=1, rate=None)
            h.ctx.client_limits = after  # ...and another on: a new count
            assert after.admit("198.18.0.9", 0.0) is None
            session.close(CloseReason.ERROR)
            assert after.live("198.18.0.9") == 1  # the newer session still counts
            assert after.admit("198.18.0.9", 0.0) is not None
        finally:
            h.close()

    _run(scenario)
