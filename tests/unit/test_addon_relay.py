"""Claimed sessions (issue 12, step 3): the engine passes their bytes through the claiming addons'
byte hooks, in order, on loopback sockets with fake addons. Only claiming addons see bytes; eof
hooks flush before the FIN; what `session_start` sends goes first; `close()` sends what is queued
and a FIN both ways, `reset()` resets both; a hook that raises or returns no bytes resets only
its session; an async hook holds only its own direction; a slow reader, or an addon sending to
one, stops the reading side (the relay contract suite runs the addon relay too:
test_relay_contract.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from tests.unit.relay_harness import read_until_end, relay, tcp_pair
from tests.unit.test_relay_contract import IDENTITY
from tests.unit.test_session_addons import _addon, _reset_seen, _with
from tests.unit.test_session_phases import _phase, _until
from tests.unit.test_session_policy import (
    ALLOWED_REQUEST,
    PolicyHarness,
    _accepted,
    _recv_all,
    _run,
)
from tproxy.addons import api
from tproxy.addons.loader import Addon, Hook
from tproxy.core.reasons import CloseReason
from tproxy.core.session import SessionRecord
from tproxy.engine.addon_relay import INJECTED_LIMIT_BYTES
from tproxy.engine.pump import COPY_CHUNK_BYTES
from tproxy.engine.session import Phase, Session
from tproxy.interception.sockopts import abort_socket

RESPONSE = b"HTTP/1.1 204 No Content\r\n\r\n"


def _claim(session: api.Session) -> None:
    session.claim()


async def _ends(sock: socket.socket) -> tuple[bytes, str]:
    async with asyncio.timeout(10):
        return await read_until_end(sock)


def test_a_claimed_session_goes_through_the_claiming_addons_hooks_in_order() -> None:
    never: list[bytes] = []
    config = _with(
        _addon("a.py", session_start=_claim, client_data=lambda s, d: d.upper(),
               server_data=lambda s, d: d.replace(b"204", b"200")),
        _addon("b.py", session_start=_claim, client_data=lambda s, d: d.replace(b"E", b"3")),
        # Has byte hooks but claims nothing: never sees a byte.
        _addon("c.py", session_start=lambda s: None, client_data=lambda s, d: never.append(d)),
    )  # fmt: skip

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        conn = await _accepted(h)
        h.client.send(ALLOWED_REQUEST)
        expected_up = ALLOWED_REQUEST.upper().replace(b"E", b"3")  # a.py first, then b.py
        assert await _recv_all(conn, len(expected_up)) == expected_up
        conn.send(RESPONSE)
        expected_down = RESPONSE.replace(b"204", b"200")
        assert await _recv_all(h.client, len(expected_down)) == expected_down
        conn.close()
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        close = h.events()[-1]
        assert (close["reason"], close["relay"], close["addons"], close["spliced_bytes"]) == (
            "closed", "addon", ["a.py", "b.py"], 0,
        )  # fmt: skip
        assert (close["bytes_up"], close["bytes_down"]) == (len(expected_up), len(expected_down))
        assert close["http_host"] == "www.example.test"  # sniffed as the bytes passed
        assert never == []

    _run(scenario, config)


def test_what_session_start_sends_goes_first_and_eof_hooks_flush_before_the_fin() -> None:
    def start(session: api.Session) -> None:
        session.claim()
        session.send_to_upstream(b"HELLO\n")
        session.state["held"] = b""

    def hold(session: api.Session, data: bytes) -> bytes:
        session.state["held"] += data
        return b""  # everything held until the client's FIN

    def flush(session: api.Session) -> bytes:
        held: bytes = session.state["held"]
        return b"%d bytes: " % len(held) + held

    config = _with(_addon("hold.py", session_start=start, client_data=hold, client_eof=flush))

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        conn = await _accepted(h)
        h.client.sendall(b"one ")
        await asyncio.sleep(0.05)
        h.client.sendall(b"two")
        h.client.shutdown(socket.SHUT_WR)
        conn.setblocking(False)
        assert await _ends(conn) == (b"HELLO\n7 bytes: one two", "eof")
        conn.close()
        assert await _ends(h.client) == (b"", "eof")
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        assert h.events()[-1]["reason"] == "closed"

    _run(scenario, config)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (ValueError("no\nway"), "ValueError: no\\x0away"),
        (None, "TypeError: client_data returned NoneType: return the bytes"),
        ("text", "TypeError: client_data returned str"),
    ],
)
def test_a_byte_hook_that_raises_or_returns_no_bytes_resets_only_its_session(
    answer: object, error: str
) -> None:
    ends: list[str | None] = []
    calls = {"n": 0}

    def bad(session: api.Session, data: bytes) -> object:
        calls["n"] += 1
        if calls["n"] > 1:  # only the first session's first chunk
            return data
        if isinstance(answer, Exception):
            raise answer
        return answer

    config = _with(_addon("bad.py", session_start=_claim, client_data=bad,
                          session_end=lambda s: ends.append(s.reason)))  # fmt: skip

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        conn = await _accepted(h)
        h.client.send(ALLOWED_REQUEST)
        await _reset_seen_both(h, conn)
        events = h.events()
        failed = [e for e in events if e["event"] == "session_error"]
        assert [(f["addon"], f["hook"]) for f in failed] == [("bad.py", "client_data")]
        assert failed[0]["error"].startswith(error), failed
        assert events[-1]["reason"] == "addon_error" and ends == ["addon_error"]
        h2 = PolicyHarness(h.ctx.config)  # the next session runs normally
        try:
            h2.session.start()
            conn2 = await _accepted(h2)
            h2.client.send(ALLOWED_REQUEST)
            assert await _recv_all(conn2, len(ALLOWED_REQUEST)) == ALLOWED_REQUEST
            conn2.close()
        finally:
            h2.close()

    _run(scenario, config)


async def _reset_seen_both(h: PolicyHarness, conn: socket.socket) -> None:
    """Both peers see a reset (nothing the client sent reached the upstream)."""
    await _until(lambda: _phase(h.session) is Phase.CLOSED)
    conn.setblocking(False)
    h.client.setblocking(False)
    assert await _ends(conn) == (b"", "reset")
    assert (await _ends(h.client))[1] == "reset"
    conn.close()


def test_close_sends_what_is_queued_then_a_fin_both_ways_without_resetting_a_sender() -> None:
    def server_data(session: api.Session, data: bytes) -> bytes:
        session.send_to_client(b"[cut]")
        session.close()
        return data  # queued after what the hook sent: the client gets "[cut]" first

    config = _with(_addon("cut.py", session_start=_claim, server_data=server_data))

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        conn = await _accepted(h)
        conn.setblocking(False)
        h.client.setblocking(False)
        conn.send(RESPONSE)
        upstream_end = asyncio.ensure_future(_ends(conn))
        got = await _recv_all(h.client, 5 + len(RESPONSE))
        assert got == b"[cut]" + RESPONSE
        # The client goes on sending after the close: read and dropped, no reset.
        h.client.send(b"more, unread")
        await asyncio.sleep(0.05)
        h.client.shutdown(socket.SHUT_WR)
        assert await _ends(h.client) == (b"", "eof")
        assert await upstream_end == (b"", "eof")  # its FIN; nothing of the client's after it
        conn.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        assert h.events()[-1]["reason"] == "addon_close"

    _run(scenario, config)


def test_reset_resets_both_sides_and_drops_what_the_hook_returns() -> None:
    def client_data(session: api.Session, data: bytes) -> bytes:
        session.reset()
        return data

    config = _with(_addon("rst.py", session_start=_claim, client_data=client_data))

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        conn = await _accepted(h)
        h.client.send(ALLOWED_REQUEST)
        await _reset_seen_both(h, conn)
        assert h.events()[-1]["reason"] == "addon_reset"

    _run(scenario, config)


def test_reset_in_session_start_is_a_reset_verdict_and_close_there_an_error() -> None:
    def start(session: api.Session) -> None:
        session.reset()

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await _reset_seen(h)
        close = h.events()[-1]
        assert (close["reason"], close["rule"]) == ("policy_reset", "addon:r.py")

    _run(scenario, _with(_addon("r.py", session_start=start)))

    def closing(session: api.Session) -> None:
        session.close()

    async def scenario2(h: PolicyHarness) -> None:
        h.session.start()
        await _reset_seen(h)
        failed = next(e for e in h.events() if e["event"] == "session_error")
        assert "return reset()" in failed["error"]

    _run(scenario2, _with(_addon("c.py", session_start=closing)))


def test_an_async_byte_hook_holds_only_its_own_direction() -> None:
    async def slow_up(session: api.Session, data: bytes) -> bytes:
        await asyncio.sleep(0.3)
        return data

    config = _with(_addon("slow.py", session_start=_claim, client_data=slow_up))

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        conn = await _accepted(h)
        h.client.send(ALLOWED_REQUEST)
        began = time.monotonic()
        conn.send(RESPONSE)  # the other direction does not wait for the hook
        assert await _recv_all(h.client, len(RESPONSE)) == RESPONSE
        assert time.monotonic() - began < 0.2
        assert await _recv_all(conn, len(ALLOWED_REQUEST)) == ALLOWED_REQUEST
        assert time.monotonic() - began >= 0.25
        conn.close()
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        assert h.events()[-1]["reason"] == "closed"

    _run(scenario, config)


def _counting(name: str, seen: dict[str, int], answer: bytes = b"") -> Addon:
    """An identity addon counting what its hooks see (`seen`: "up", "down" bytes, "calls" of
    client_data); with `answer`, it also sends that to the client for every client chunk."""

    def server_data(session: api.Session, data: bytes) -> bytes:
        seen["down"] += len(data)
        return data

    def client_data(session: api.Session, data: bytes) -> bytes:
        seen["up"] += len(data)
        seen["calls"] += 1
        if answer:
            session.send_to_client(answer)
        return data

    hooks = {"client_data": client_data, "server_data": server_data}
    return Addon(name, name, tuple(Hook(name, k, fn, False) for k, fn in hooks.items()))


async def _stuff(sock: socket.socket, total: int) -> int:
    """Send up to `total` bytes for at most a second; how many the kernel took."""
    sent = 0
    block = b"x" * 65536
    deadline = time.monotonic() + 1.0
    while sent < total and time.monotonic() < deadline:
        try:
            sent += sock.send(block)
        except BlockingIOError:
            await asyncio.sleep(0.01)
    return sent


@dataclass
class Relaying:
    """An addon relay running between two peers (the client program, the upstream server)."""

    peer_client: socket.socket
    peer_upstream: socket.socket
    record: SessionRecord
    task: asyncio.Task[CloseReason]


async def _relaying(
    *addons: Addon,
    session_start: Callable[[api.Session], None] | None = None,
    big_client_buffers: bool = False,
) -> Relaying:
    """Start the addon relay, claimed by `addons`; `big_client_buffers` lets the client's side
    take 4 MiB at once."""
    peer_client, proxy_client = await tcp_pair()
    proxy_upstream, peer_upstream = await tcp_pair()
    if big_client_buffers:
        for sock in (peer_client, proxy_client):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    record = SessionRecord("t", "127.0.0.1:1", "127.0.0.1:2", time.monotonic())
    task = asyncio.ensure_future(relay(proxy_client, proxy_upstream, record, None,
                                       addons=addons, session_start=session_start))  # fmt: skip
    return Relaying(peer_client, peer_upstream, record, task)


def test_a_claimed_session_behind_a_slow_reader_holds_at_most_one_chunk() -> None:
    """The client reads nothing while the upstream sends 32 MiB: the relay has read no more
    than it wrote on plus one chunk, TCP holds the upstream back, and once the client reads,
    every byte arrives."""
    seen = {"up": 0, "down": 0, "calls": 0}
    addon = _counting("count.py", seen)

    async def scenario() -> None:
        r = await _relaying(addon)
        try:
            sent = await _stuff(r.peer_upstream, 32 << 20)
            assert sent < 32 << 20, "nothing held the upstream back"
            held_in_proxy = seen["down"] - r.record.bytes_down
            assert 0 <= held_in_proxy <= COPY_CHUNK_BYTES, (seen, r.record)
            r.peer_upstream.shutdown(socket.SHUT_WR)
            got, end = await _ends(r.peer_client)
            assert (len(got), end) == (sent, "eof") and r.record.bytes_down == sent
            r.peer_client.shutdown(socket.SHUT_WR)
            assert await r.task == "closed"
        finally:
            for sock in (r.peer_client, r.peer_upstream):
                sock.close()

    asyncio.run(scenario())


def test_an_addon_sending_to_a_client_that_does_not_read_stops_reading_the_client() -> None:
    """Each client chunk is answered with 100 KB (`send_to_client`); the client never reads:
    the relay stops reading the client once that queue is past `INJECTED_LIMIT_BYTES`, so what
    it holds stays bounded however much the client tries to send."""
    seen = {"up": 0, "down": 0, "calls": 0}
    answer = b"a" * 100_000
    addon = _counting("answer.py", seen, answer)

    async def scenario() -> None:
        r = await _relaying(addon)
        try:
            sent = await _stuff(r.peer_client, 64 << 20)
            assert sent < 64 << 20, "nothing held the client back"
            queued = seen["calls"] * len(answer) - r.record.bytes_down
            assert queued <= INJECTED_LIMIT_BYTES + len(answer), (seen, r.record)
        finally:
            r.task.cancel()
            for sock in (r.peer_client, r.peer_upstream):
                abort_socket(sock)

    asyncio.run(scenario())


# --- what the review of the addon relay found -------------------------------------------------


def test_an_upstream_reset_during_an_upload_still_delivers_the_answer_a_hook_holds() -> None:
    """The upstream answers early and resets while the client still uploads (a server closing
    with unread bytes); the answer sits in an async server_data when the client's next write
    meets the reset. The client gets the answer, then the reset (as with the copy relay)."""

    async def delay(session: api.Session, data: bytes) -> bytes:
        await asyncio.sleep(0.2)
        return data

    async def scenario() -> None:
        r = await _relaying(_addon("delay.py", server_data=delay))
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_sendall(r.peer_client, b"POST / (a big upload)")
            await asyncio.sleep(0.05)
            r.peer_upstream.send(b"HTTP/1.1 413 Too Large\r\n\r\n")
            abort_socket(r.peer_upstream)
            reads = asyncio.ensure_future(_ends(r.peer_client))
            for _ in range(20):  # the client keeps uploading meanwhile
                try:
                    r.peer_client.send(b"x" * 1000)
                except OSError:
                    break
                await asyncio.sleep(0.01)
            assert await reads == (b"HTTP/1.1 413 Too Large\r\n\r\n", "reset")
            assert await r.task == "upstream_reset"
        finally:
            r.peer_client.close()

    asyncio.run(scenario())


def test_a_session_that_waited_for_its_first_bytes_hands_the_client_over_to_the_relay(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sniffed first bytes go into an async client_data: the relay takes the client's poller
    registration over at once, so more bytes from the client meanwhile do not make the poller
    call the session again and again (a busy loop for as long as the hook runs)."""
    calls = {"n": 0}
    real = Session.on_readable

    def counting(self: Session) -> None:
        calls["n"] += 1
        real(self)

    monkeypatch.setattr(Session, "on_readable", counting)

    async def slow(session: api.Session, data: bytes) -> bytes:
        await asyncio.sleep(0.3)
        return data

    sniffing = _with(_addon("slow.py", sniff=True, session_start=_claim, client_data=slow))

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        h.client.send(ALLOWED_REQUEST)
        conn = await _accepted(h)
        await asyncio.sleep(0.01)
        calls["n"] = 0
        h.client.send(b"body")  # while the first chunk is in the hook
        await asyncio.sleep(0.2)
        assert calls["n"] < 5, calls
        got = await _recv_all(conn, len(ALLOWED_REQUEST) + 4)
        assert got == ALLOWED_REQUEST + b"body"
        conn.close()

    _run(scenario, sniffing)


def test_what_session_start_sends_past_the_limit_does_not_stall_the_client() -> None:
    """300 KB sent to the client from session_start (past `INJECTED_LIMIT_BYTES`): once the
    client has read it, its request is read and reaches the upstream."""

    async def scenario() -> None:
        r = await _relaying(
            IDENTITY,
            session_start=lambda session: session.send_to_client(b"x" * 300_000),
            big_client_buffers=True,
        )
        loop = asyncio.get_running_loop()
        try:
            got = 0
            while got < 300_000:
                got += len(await loop.sock_recv(r.peer_client, 1 << 20))
            r.peer_client.send(b"request")
            async with asyncio.timeout(5):
                assert await loop.sock_recv(r.peer_upstream, 100) == b"request"
        finally:
            r.task.cancel()
            for sock in (r.peer_client, r.peer_upstream):
                abort_socket(sock)

    asyncio.run(scenario())


def test_a_hooks_task_cancelled_by_something_else_is_that_hooks_error() -> None:
    async def client_data(session: api.Session, data: bytes) -> bytes:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()  # as a library cancelling current_task() would
        await asyncio.sleep(0)
        return data

    async def scenario() -> None:
        r = await _relaying(_addon("x.py", client_data=client_data))
        try:
            r.peer_client.send(b"cancel me")
            with pytest.raises(asyncio.CancelledError, match="its task was cancelled"):
                async with asyncio.timeout(5):
                    await r.task
        finally:
            for sock in (r.peer_client, r.peer_upstream):
                abort_socket(sock)

    asyncio.run(scenario())


def test_reset_ends_a_relaying_session_that_no_addon_claimed() -> None:
    box: list[api.Session] = []
    config = _with(_addon("r.py", session_start=box.append))

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        conn = await _accepted(h)
        await _until(lambda: _phase(h.session) is Phase.RELAYING)
        with pytest.raises(RuntimeError, match="for claimed sessions"):
            box[0].close()
        box[0].reset()
        await _reset_seen_both(h, conn)
        close = h.events()[-1]
        assert (close["reason"], close["relay"]) == ("addon_reset", "splice")

    _run(scenario, config)


def test_what_an_async_hook_sends_after_close_goes_before_the_fin() -> None:
    async def server_data(session: api.Session, data: bytes) -> bytes:
        session.close()
        await asyncio.sleep(0)
        session.send_to_upstream(b"[bye]")
        return data

    async def scenario() -> None:
        r = await _relaying(_addon("bye.py", server_data=server_data))
        try:
            r.peer_upstream.send(b"response")
            upstream_gets = asyncio.ensure_future(_ends(r.peer_upstream))
            assert await _ends(r.peer_client) == (b"response", "eof")
            assert await upstream_gets == (b"[bye]", "eof")
            r.peer_client.shutdown(socket.SHUT_WR)
            r.peer_upstream.shutdown(socket.SHUT_WR)
            assert await r.task == "addon_close"
        finally:
            for sock in (r.peer_client, r.peer_upstream):
                sock.close()

    asyncio.run(scenario())


def test_a_sink_reset_wakes_the_other_way_waiting_for_room_and_ends_the_session() -> None:
    """session_start sent 8 MiB toward an upstream that does not read (the client's side waits
    for room); the upstream answers and resets: the answer reaches the client, then the reset."""

    async def scenario() -> None:
        r = await _relaying(
            IDENTITY, session_start=lambda session: session.send_to_upstream(b"x" * (8 << 20))
        )
        try:
            await asyncio.sleep(0.2)
            r.peer_upstream.send(b"HTTP/1.1 413 Too Large\r\n\r\n")
            abort_socket(r.peer_upstream)
            assert await _ends(r.peer_client) == (b"HTTP/1.1 413 Too Large\r\n\r\n", "reset")
            assert await r.task == "upstream_reset"
        finally:
            r.peer_client.close()

    asyncio.run(scenario())


def test_after_a_sink_reset_the_other_ways_fin_still_delivers_everything_before_the_reset() -> None:
    """The upstream sent its FIN (an async server_eof flushes 1 MiB for 0.3 s), then reset; the
    client's next bytes meet the reset. The client, reading late, gets all of it, then the
    reset."""
    tail = b"T" * (1 << 20)

    async def server_eof(session: api.Session) -> bytes:
        await asyncio.sleep(0.3)
        return tail

    async def scenario() -> None:
        r = await _relaying(_addon("tail.py", server_eof=server_eof))
        try:
            r.peer_client.send(b"upload")
            await asyncio.sleep(0.05)
            r.peer_upstream.send(b"resp")
            r.peer_upstream.shutdown(socket.SHUT_WR)
            await asyncio.sleep(0.05)
            abort_socket(r.peer_upstream)
            await asyncio.sleep(0.02)
            r.peer_client.send(b"more")  # meets the reset
            await asyncio.sleep(0.5)  # the client reads only now
            got, how = await _ends(r.peer_client)
            assert (len(got), got[:4], how) == (4 + len(tail), b"resp", "reset")
            assert await r.task == "upstream_reset"
        finally:
            r.peer_client.close()

    asyncio.run(scenario())


def test_reset_from_elsewhere_while_an_async_session_start_runs_ends_the_session() -> None:
    """a.py allows (a verdict) and resets from a task of its own while b.py's async
    session_start still runs: nothing connects, the session ends at once."""
    box: list[api.Session] = []

    def a_start(session: api.Session) -> api.Verdict:
        box.append(session)
        return api.allow()

    async def b_start(session: api.Session) -> None:
        await asyncio.sleep(0.5)

    config = _with(_addon("a.py", session_start=a_start), _addon("b.py", session_start=b_start))

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await asyncio.sleep(0.05)
        assert _phase(h.session) is Phase.ADDONS
        box[0].reset()
        await _reset_seen(h)
        assert h.events()[-1]["reason"] == "addon_reset"

    _run(scenario, config)
