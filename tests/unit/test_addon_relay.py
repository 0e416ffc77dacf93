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

import pytest

from tests.unit.relay_harness import read_until_end, relay, tcp_pair
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
from tproxy.core.session import SessionRecord
from tproxy.engine.addon_relay import INJECTED_LIMIT_BYTES
from tproxy.engine.pump import COPY_CHUNK_BYTES
from tproxy.engine.session import Phase
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


async def _pairs() -> tuple[socket.socket, socket.socket, socket.socket, socket.socket]:
    peer_client, proxy_client = await tcp_pair()
    proxy_upstream, peer_upstream = await tcp_pair()
    return peer_client, proxy_client, proxy_upstream, peer_upstream


def test_a_claimed_session_behind_a_slow_reader_holds_at_most_one_chunk() -> None:
    """The client reads nothing while the upstream sends 32 MiB: the relay has read no more
    than it wrote on plus one chunk, TCP holds the upstream back, and once the client reads,
    every byte arrives."""
    seen = {"up": 0, "down": 0, "calls": 0}
    addon = _counting("count.py", seen)

    async def scenario() -> None:
        peer_client, proxy_client, proxy_upstream, peer_upstream = await _pairs()
        record = SessionRecord("t", "127.0.0.1:1", "127.0.0.1:2", time.monotonic())
        relaying = asyncio.ensure_future(relay(proxy_client, proxy_upstream, record, None,
                                               addons=(addon,)))  # fmt: skip
        try:
            sent = await _stuff(peer_upstream, 32 << 20)
            assert sent < 32 << 20, "nothing held the upstream back"
            held_in_proxy = seen["down"] - record.bytes_down
            assert 0 <= held_in_proxy <= COPY_CHUNK_BYTES, (seen, record)
            peer_upstream.shutdown(socket.SHUT_WR)
            got, end = await _ends(peer_client)
            assert (len(got), end) == (sent, "eof") and record.bytes_down == sent
            peer_client.shutdown(socket.SHUT_WR)
            assert await relaying == "closed"
        finally:
            for sock in (peer_client, peer_upstream):
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
        peer_client, proxy_client, proxy_upstream, peer_upstream = await _pairs()
        record = SessionRecord("t", "127.0.0.1:1", "127.0.0.1:2", time.monotonic())
        relaying = asyncio.ensure_future(relay(proxy_client, proxy_upstream, record, None,
                                               addons=(addon,)))  # fmt: skip
        try:
            sent = await _stuff(peer_client, 64 << 20)
            assert sent < 64 << 20, "nothing held the client back"
            queued = seen["calls"] * len(answer) - record.bytes_down
            assert queued <= INJECTED_LIMIT_BYTES + len(answer), (seen, record)
        finally:
            relaying.cancel()
            for sock in (peer_client, peer_upstream):
                abort_socket(sock)

    asyncio.run(scenario())
