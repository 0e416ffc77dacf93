"""Addons on an intercepted session's plaintext (issue 13): the claiming addons' byte hooks run
between the two TLS legs, on real loopback sockets with Python `ssl` peers (the harness of
test_tls_relay.py). The hooks see and change the plaintext both ways (any length, held back,
async), eof hooks flush before our close_notify, `send_to_*` encrypts toward that peer,
`close()` ends both TLS connections cleanly, `reset()` resets both, a raising hook ends only
its session, `session.tls` says what was negotiated, and the memory bound holds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from typing import Any

import pytest

from tests.unit.test_relay_contract import ASYNC_IDENTITY, HOLD_LAST_BYTE, IDENTITY
from tests.unit.test_session_addons import _addon
from tests.unit.test_tls_legs import PKI, _client_context, server_context
from tests.unit.test_tls_relay import (
    REQUEST,
    RESPONSE,
    _close_cleanly,
    _ends,
    _run,
    _stuff,
    intercepting,
    make_interception,
    make_pki,
)
from tproxy.addons import api
from tproxy.addons.loader import Addon
from tproxy.engine import tls_relay
from tproxy.engine.pump import COPY_CHUNK_BYTES
from tproxy.engine.tls_relay import Interception, TLSRelay
from tproxy.interception.sockopts import abort_socket


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory)


@pytest.fixture(scope="module")
def interception(pki: PKI) -> Interception:
    return make_interception(pki)


@pytest.mark.parametrize(
    "addons",
    [(IDENTITY,), (ASYNC_IDENTITY,), (HOLD_LAST_BYTE, ASYNC_IDENTITY)],
    ids=["identity", "async-identity", "holdback-chain"],
)
def test_a_mebibyte_each_way_through_claiming_addons_arrives_intact(
    pki: PKI, interception: Interception, addons: tuple[Addon, ...]
) -> None:
    up, down = bytes(range(256)) * 4096, bytes(range(255, -1, -1)) * 4096

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=addons
        ) as run:
            await run.handshakes()
            assert run.record.relay == "addon"

            async def client() -> tuple[bytes, str]:
                await run.client.send(up)
                await run.client.close_notify()
                run.client.sock.shutdown(socket.SHUT_WR)
                return await run.client.read()

            async def upstream() -> tuple[bytes, str]:
                await run.upstream.send(down)
                await run.upstream.close_notify()
                run.upstream.sock.shutdown(socket.SHUT_WR)
                return await run.upstream.read()

            # Both ways at once, each ending with close_notify: the holdback chain keeps each
            # direction's last byte until then (its eof hook flushes it).
            got_down, got_up = await asyncio.gather(client(), upstream())
            assert got_up == (up, "close_notify") and got_down == (down, "close_notify")
            assert await run.reason() == "closed"
            assert (run.record.bytes_up, run.record.bytes_down) == (len(up), len(down))

    _run(scenario)


def test_hooks_change_the_plaintext_both_ways_and_the_counts_are_what_was_sent(
    pki: PKI, interception: Interception
) -> None:
    seen: list[bytes] = []

    def up(session: api.Session, data: bytes) -> bytes:
        seen.append(data)
        return data.replace(b"GET /", b"GET /rewritten/")

    def down(session: api.Session, data: bytes) -> bytes:
        return data.replace(b"hi", b"hello, longer")

    addon = _addon("rewrite.py", client_data=up, server_data=down)

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=(addon,)
        ) as run:
            await run.handshakes()
            await run.client.send(REQUEST)
            changed_up = REQUEST.replace(b"GET /", b"GET /rewritten/")
            assert await run.upstream.read_exactly(len(changed_up)) == changed_up
            await run.upstream.send(RESPONSE)
            changed_down = RESPONSE.replace(b"hi", b"hello, longer")
            assert await run.client.read_exactly(len(changed_down)) == changed_down
            await _close_cleanly(run)
            assert (run.record.bytes_up, run.record.bytes_down) == (
                len(changed_up), len(changed_down),
            )  # fmt: skip
        assert b"".join(seen) == REQUEST  # the plaintext, never a TLS record

    _run(scenario)


def test_eof_hooks_flush_before_our_close_notify_and_a_bare_fin_stays_bare(
    pki: PKI, interception: Interception
) -> None:
    def hold(session: api.Session, data: bytes) -> bytes:
        session.state["up"] = session.state.get("up", b"") + data
        return b""

    def flush_up(session: api.Session) -> bytes:
        held: bytes = session.state.get("up", b"")
        return b"%d held: " % len(held) + held

    def flush_down(session: api.Session) -> bytes:
        return b" (the end)"

    addon = _addon("hold.py", client_data=hold, client_eof=flush_up, server_eof=flush_down)

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=(addon,)
        ) as run:
            await run.handshakes()
            await run.client.send(b"one ")
            await run.client.send(b"two")
            await run.client.close_notify()
            run.client.sock.shutdown(socket.SHUT_WR)
            assert await run.upstream.read() == (b"7 held: one two", "close_notify")
            # The upstream ends with a bare FIN: its eof hook's bytes, then the same truncation.
            await run.upstream.send(RESPONSE)
            run.upstream.sock.shutdown(socket.SHUT_WR)
            assert await run.client.read() == (RESPONSE + b" (the end)", "truncated")
            assert await run.reason() == "closed"

    _run(scenario)


def test_an_async_eof_hook_is_awaited_before_the_close_notify(
    pki: PKI, interception: Interception
) -> None:
    async def later(session: api.Session) -> bytes:
        await asyncio.sleep(0.05)
        return b" and after a while"

    addon = _addon("later.py", client_eof=later)

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=(addon,)
        ) as run:
            await run.handshakes()
            await run.client.send(REQUEST)
            await run.client.close_notify()
            run.client.sock.shutdown(socket.SHUT_WR)
            assert await run.upstream.read() == (REQUEST + b" and after a while", "close_notify")
            await run.upstream.close_notify()
            run.upstream.sock.shutdown(socket.SHUT_WR)
            assert await run.client.read() == (b"", "close_notify")
            assert await run.reason() == "closed"

    _run(scenario)


def test_what_session_start_sent_goes_first_and_hooks_may_send_both_ways(
    pki: PKI, interception: Interception
) -> None:
    def start(session: api.Session) -> None:
        session.send_to_upstream(b"FIRST UP\n")
        session.send_to_client(b"FIRST DOWN\n")

    def up(session: api.Session, data: bytes) -> bytes:
        session.send_to_client(b"(seen by the proxy)\n")
        return data

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server,
            addons=(_addon("send.py", client_data=up),), session_start=start,
        ) as run:  # fmt: skip
            await run.handshakes()
            await run.client.send(REQUEST)
            expected_up = b"FIRST UP\n" + REQUEST
            assert await run.upstream.read_exactly(len(expected_up)) == expected_up
            await run.upstream.send(RESPONSE)
            expected_down = b"FIRST DOWN\n(seen by the proxy)\n" + RESPONSE
            assert await run.client.read_exactly(len(expected_down)) == expected_down
            await _close_cleanly(run)

    _run(scenario)


def test_an_upstream_that_speaks_first_goes_through_server_data(
    pki: PKI, interception: Interception
) -> None:
    addon = _addon("banner.py", server_data=lambda s, d: d.replace(b"220", b"221"))

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=(addon,)
        ) as run:
            await run.upstream.handshake()
            await run.upstream.send(b"220 banner\r\n")  # while the client still handshakes
            await run.client.handshake()
            assert await run.client.read_exactly(12) == b"221 banner\r\n"
            await _close_cleanly(run)

    _run(scenario)


def test_session_tls_says_what_was_negotiated(pki: PKI, interception: Interception) -> None:
    seen: list[api.InterceptedTLS | None] = []

    def up(session: api.Session, data: bytes) -> bytes:
        seen.append(session.tls)
        return data

    async def scenario() -> None:
        server = server_context(pki.upstream_pem, alpn=["http/1.1"])
        client = _client_context(pki.ours)
        client.set_alpn_protocols(["h2", "http/1.1"])
        async with intercepting(
            interception, client, server, addons=(_addon("tls.py", client_data=up),)
        ) as run:
            assert run.session is not None and run.session.tls is None  # before any handshake
            await run.handshakes()
            await run.client.send(REQUEST)
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            await _close_cleanly(run)
            after = run.session.tls  # at session_end: from what the relay left in the record
        tls = seen[0]
        assert tls is not None and tls.intercepted and tls.failure is None
        assert tls.client is not None and tls.upstream is not None
        assert tls.client.alpn == tls.upstream.alpn == "http/1.1"
        assert tls.client.version == run.client.obj.version()
        assert tls.upstream_verified
        assert tls.upstream_issuer is not None and "upstream-test" in tls.upstream_issuer
        assert after is None or after == tls  # (the harness does not keep the record's outcome)

    _run(scenario)


def test_close_sends_what_the_hook_returned_then_close_notify_and_fin_both_ways(
    pki: PKI, interception: Interception
) -> None:
    def up(session: api.Session, data: bytes) -> bytes:
        if b"QUIT" in data:
            session.send_to_client(b"bye\n")
            session.close()
            return b"last words\n"
        return data

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server,
            addons=(_addon("quit.py", client_data=up),),
        ) as run:  # fmt: skip
            await run.handshakes()
            await run.client.send(b"QUIT\n")
            assert await run.upstream.read() == (b"last words\n", "close_notify")
            assert await run.client.read() == (b"bye\n", "close_notify")
            # Both peers were sent a FIN; they may still send (read and dropped) until theirs.
            await run.upstream.send(b"dropped")
            await run.upstream.close_notify()
            run.upstream.sock.shutdown(socket.SHUT_WR)
            run.client.sock.shutdown(socket.SHUT_WR)
            assert await run.reason() == "addon_close"
            assert await _ends(run.client.sock) == (b"", "eof")

    _run(scenario)


def test_reset_resets_both_peers(pki: PKI, interception: Interception) -> None:
    def up(session: api.Session, data: bytes) -> bytes:
        session.reset()
        return data

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server,
            addons=(_addon("reset.py", client_data=up),),
        ) as run:  # fmt: skip
            await run.handshakes()
            await run.client.send(REQUEST)
            assert await run.reason() == "addon_reset"
            assert await run.upstream.read() == (b"", "reset")
            assert await run.client.read() == (b"", "reset")

    _run(scenario)


@pytest.mark.parametrize("is_async", [False, True])
def test_a_hook_that_raises_ends_the_session_with_its_error(
    pki: PKI, interception: Interception, is_async: bool
) -> None:
    def broken(session: api.Session, data: bytes) -> bytes:
        raise ValueError("no")

    async def broken_later(session: api.Session, data: bytes) -> bytes:
        await asyncio.sleep(0)
        raise ValueError("no")

    addon = _addon("broken.py", server_data=broken_later if is_async else broken)

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=(addon,)
        ) as run:
            await run.handshakes()
            await run.client.send(REQUEST)  # client_data: none, passes
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            await run.upstream.send(RESPONSE)
            assert await run.reason() == "addon_error"
            [(hook, exc)] = run.hook_errors
            assert (hook.addon, hook.name, str(exc)) == ("broken.py", "server_data", "no")
            assert await run.client.read() == (b"", "reset")

    _run(scenario)


def test_an_async_hook_holds_only_its_own_direction(pki: PKI, interception: Interception) -> None:
    release = asyncio.Event()

    async def slow_up(session: api.Session, data: bytes) -> bytes:
        await release.wait()
        return data

    addon = _addon("slow.py", client_data=slow_up)

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=(addon,)
        ) as run:
            await run.handshakes()
            await run.client.send(REQUEST)  # held in the hook
            await run.upstream.send(RESPONSE)  # the other way goes on meanwhile
            assert await run.client.read_exactly(len(RESPONSE)) == RESPONSE
            assert run.record.bytes_up == 0
            release.set()
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            await _close_cleanly(run)

    _run(scenario)


def test_sending_to_a_peer_whose_tls_is_closed_raises(pki: PKI, interception: Interception) -> None:
    errors: list[str] = []

    def down(session: api.Session, data: bytes) -> bytes:
        try:
            session.send_to_upstream(b"too late")
        except RuntimeError as exc:
            errors.append(str(exc))
        return data

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server,
            addons=(_addon("late.py", server_data=down),),
        ) as run:  # fmt: skip
            await run.handshakes()
            await run.client.close_notify()
            run.client.sock.shutdown(socket.SHUT_WR)
            assert await run.upstream.read() == (b"", "close_notify")
            await run.upstream.send(RESPONSE)
            assert await run.client.read_exactly(len(RESPONSE)) == RESPONSE
            await run.upstream.close_notify()
            run.upstream.sock.shutdown(socket.SHUT_WR)
            assert await run.reason() == "closed"
        assert errors == ["the upstream's TLS has been closed: nothing more can go to it"]

    _run(scenario)


def test_behind_a_client_that_does_not_read_a_claimed_session_holds_about_one_chunk(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=(IDENTITY,)
        ) as run:
            await run.handshakes()
            sent = await _stuff(run.upstream, 64 << 20)
            assert sent < 64 << 20, "nothing held the upstream back"
            assert run.relay.down.queued <= COPY_CHUNK_BYTES + 4096, run.relay.down.queued
            got = await run.client.read_exactly(sent)
            assert len(got) == sent and run.record.bytes_down == sent

    _run(scenario)


def test_a_client_reset_mid_stream_resets_the_upstream_of_a_claimed_session(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=(ASYNC_IDENTITY,)
        ) as run:
            await run.handshakes()
            await run.client.send(REQUEST)
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            abort_socket(run.client.sock)
            assert await run.upstream.read() == (b"", "reset")
            assert await run.reason() == "client_reset"

    _run(scenario)


# --- review findings ------------------------------------------------------------------------


@pytest.mark.parametrize("is_async", [False, True])
def test_a_client_reset_runs_no_eof_hook_and_sends_nothing_after_it(
    pki: PKI, interception: Interception, is_async: bool
) -> None:
    # A reset is not the end of the client's stream: as the addon relay does, no eof hook (its
    # bytes would reach the upstream as if the client had finished).
    called: list[str] = []

    def flush(session: api.Session) -> bytes:
        called.append("client_eof")
        return b"as if the client had finished"

    async def flush_later(session: api.Session) -> bytes:
        return flush(session)

    addon = _addon("eof.py", client_eof=flush_later if is_async else flush)

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=(addon,)
        ) as run:
            await run.handshakes()
            await run.client.send(REQUEST)
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            abort_socket(run.client.sock)
            assert await run.upstream.read() == (b"", "reset")
            assert await run.reason() == "client_reset"
        assert called == []

    _run(scenario)


def test_a_hook_that_resets_on_the_first_flight_is_the_last_hook_called(
    pki: PKI, interception: Interception
) -> None:
    # The client's Finished, its request and its close_notify in one flight: the client_data
    # hook resets the session; the eof hook of a session reset is not called.
    called: list[str] = []

    def up(session: api.Session, data: bytes) -> bytes:
        called.append("client_data")
        session.reset()
        return data

    def eof(session: api.Session) -> bytes:
        called.append("client_eof")
        return b""

    addon = _addon("reset.py", client_data=up, client_eof=eof)

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, addons=(addon,)
        ) as run:
            client = run.client

            async def client_flight() -> None:
                while True:  # the handshake, but for the last flight (kept in the BIO)
                    try:
                        client.obj.do_handshake()
                    except ssl.SSLWantReadError:
                        await client.flush()
                        await client._fill()
                        continue
                    break
                client.obj.write(REQUEST)
                with contextlib.suppress(ssl.SSLWantReadError):
                    client.obj.unwrap()
                await client.flush()  # Finished, the request and close_notify: one write

            await asyncio.gather(client_flight(), run.upstream.handshake())
            assert await run.reason() == "addon_reset"
        assert called == ["client_data"]

    _run(scenario)


class _UpstreamFullOnce:
    """`os` for the TLS relay: the first write to the upstream after the addon's close() finds
    its socket full (EAGAIN), as a peer that reads slowly leaves it."""

    def __init__(self, relay: TLSRelay) -> None:
        self.relay = relay
        self.pushed_back = False

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: bytes | memoryview) -> int:
        if fd == self.relay.up.dst and self.relay.closing and not self.pushed_back:
            self.pushed_back = True
            raise BlockingIOError
        return os.write(fd, data)


def test_close_sends_close_notify_to_both_peers_when_one_socket_is_full(
    pki: PKI, interception: Interception, monkeypatch: pytest.MonkeyPatch
) -> None:
    def up(session: api.Session, data: bytes) -> bytes:
        session.close()
        return b""

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server,
            addons=(_addon("quit.py", client_data=up),),
        ) as run:  # fmt: skip
            await run.handshakes()
            full = _UpstreamFullOnce(run.relay)
            monkeypatch.setattr(tls_relay, "os", full)
            await run.client.send(b"QUIT\n")
            assert await run.upstream.read() == (b"", "close_notify")
            assert full.pushed_back
            assert await run.client.read() == (b"", "close_notify")
            run.upstream.sock.shutdown(socket.SHUT_WR)
            run.client.sock.shutdown(socket.SHUT_WR)
            assert await run.reason() == "addon_close"

    _run(scenario)
