"""The relay contract: what every relay (splice, copy, and the addon relay with identity addons,
plain and async, and a chain that holds bytes back until the FIN), on both loops (asyncio,
uvloop), does.

Real TCP sockets on loopback, so resets are real resets. `peer_*` sockets stand for the client
program and the upstream server; the relay sits between `proxy_client` and `proxy_upstream`.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tproxy.addons.api import Session
from tproxy.addons.loader import Addon, Hook
from tproxy.core.config import RelayKind
from tproxy.core.session import SessionRecord
from tproxy.engine.pipes import Pipe, PipePool
from tproxy.engine.pump import COPY_CHUNK_BYTES, SPLICE_AFTER_BYTES
from tproxy.interception.sockopts import abort_socket, unacknowledged_bytes
from tproxy.sniffers.passive import FirstBytes

from .relay_harness import read_until_end, relay, tcp_pair

POOL = PipePool()


class ExhaustedPipePool(PipePool):
    """A pool when the process is out of descriptors: no pipe can be had."""

    def take(self) -> Pipe:
        raise OSError(errno.EMFILE, "Too many open files")


EXHAUSTED = ExhaustedPipePool()


@dataclass(frozen=True)
class Relay:
    """One relay kind on one event loop: call it like `relay()`, run scenarios with `run`.

    The splice relays splice from the first byte (`splice_after` 0) unless they are the
    "splice-auto" case, which copies the first 64 KiB of each direction as `tproxy run` does:
    the scenarios' small exchanges would otherwise never reach the splice code.
    """

    kind: RelayKind
    loop: str
    pipes: bool = True
    splice_after: int = 0
    sniffed: bool = False  # a sniffer watches the first bytes, as in every session of `run`
    addons: tuple[Addon, ...] | None = None  # the addon relay (kind COPY), claimed by these

    def __call__(
        self, client: socket.socket, upstream: socket.socket, record: SessionRecord
    ) -> Awaitable[str]:
        if self.addons is not None:
            tap = FirstBytes() if self.sniffed else None
            return relay(client, upstream, record, None, tap=tap, addons=self.addons)
        if self.kind is RelayKind.COPY:
            return relay(client, upstream, record, None)
        pool = POOL if self.pipes else EXHAUSTED
        tap = FirstBytes() if self.sniffed else None
        return relay(client, upstream, record, pool, self.splice_after, tap=tap)

    @property
    def name(self) -> str:
        """The close event's `relay` for this relay."""
        return "addon" if self.addons is not None else self.kind.value

    def before_reset(self, sent: bytes) -> bytes:
        """What a peer receives of the `sent` bytes when the sender then resets: all of them,
        but the byte an addon holds back until a FIN that never comes."""
        return sent[:-1] if self.addons is not None and HOLD_LAST_BYTE in self.addons else sent

    def spliced_all(self, record: SessionRecord) -> bool:
        """Whether `record`'s bytes moved as this relay must move them: all by splice when it
        splices from the first byte, none when it copies (or has no pipes), and everything past
        each direction's first 64 KiB for splice-auto."""
        moved = record.bytes_up + record.bytes_down
        if self.kind is RelayKind.COPY or not self.pipes:
            return record.spliced_bytes == 0
        if self.splice_after == 0:
            return record.spliced_bytes == moved
        copied_at_most = min(record.bytes_up, self.splice_after + COPY_CHUNK_BYTES) + min(
            record.bytes_down, self.splice_after + COPY_CHUNK_BYTES
        )
        return moved - copied_at_most <= record.spliced_bytes <= moved

    def run(self, scenario: Callable[[], Awaitable[None]]) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(20):
                await scenario()

        factory = uvloop.new_event_loop if self.loop == "uvloop" else asyncio.new_event_loop
        try:
            with asyncio.Runner(loop_factory=factory) as runner:
                runner.run(bounded())
        finally:
            POOL.close()


def _same(session: Session, data: bytes) -> bytes:
    return data


async def _same_later(session: Session, data: bytes) -> bytes:
    await asyncio.sleep(0)
    return data


def _hold_last_byte(key: str) -> tuple[Callable[..., bytes], Callable[..., bytes]]:
    def data_hook(session: Session, data: bytes) -> bytes:
        held: bytes = session.state.get(key, b"") + data
        session.state[key] = held[-1:]
        return held[:-1]

    def eof_hook(session: Session) -> bytes:
        held: bytes = session.state.pop(key, b"")
        return held

    return data_hook, eof_hook


def _identity(name: str, fn: Callable[..., Any], is_async: bool) -> Addon:
    hooks = tuple(Hook(name, hook, fn, is_async) for hook in ("client_data", "server_data"))
    return Addon(name, name, hooks)


IDENTITY = _identity("identity.py", _same, is_async=False)
ASYNC_IDENTITY = _identity("async_identity.py", _same_later, is_async=True)
_up_data, _up_eof = _hold_last_byte("up")
_down_data, _down_eof = _hold_last_byte("down")
HOLD_LAST_BYTE = Addon("hold.py", "hold.py", (
    Hook("hold.py", "client_data", _up_data, False),
    Hook("hold.py", "server_data", _down_data, False),
    Hook("hold.py", "client_eof", _up_eof, False),
    Hook("hold.py", "server_eof", _down_eof, False),
))  # fmt: skip

RELAYS = [
    *(
        pytest.param(Relay(kind, loop), id=f"{kind.value}-{loop}")
        for kind in RelayKind
        for loop in ("asyncio", "uvloop")
    ),
    # As `tproxy run` splices: copy each direction's first 64 KiB, splice the rest.
    pytest.param(
        Relay(RelayKind.SPLICE, "uvloop", splice_after=SPLICE_AFTER_BYTES, sniffed=True),
        id="splice-auto-sniffed-uvloop",
    ),
    # Out of descriptors, the splice relay copies instead of failing.
    pytest.param(Relay(RelayKind.SPLICE, "uvloop", pipes=False), id="splice-without-pipes"),
    # A claimed session: the addon relay, through identity addons.
    *(
        pytest.param(
            Relay(RelayKind.COPY, loop, addons=(IDENTITY,), sniffed=True),
            id=f"addon-identity-{loop}",
        )
        for loop in ("asyncio", "uvloop")
    ),
    pytest.param(Relay(RelayKind.COPY, "uvloop", addons=(ASYNC_IDENTITY,)), id="addon-async"),
    # Each chunk's last byte held back by the first addon until the next chunk or the FIN (its
    # eof hook flushes it through the second, async, addon before the FIN goes on).
    pytest.param(
        Relay(RelayKind.COPY, "uvloop", addons=(HOLD_LAST_BYTE, ASYNC_IDENTITY)),
        id="addon-holdback-chain",
    ),
]


@dataclass
class Wiring:
    peer_client: socket.socket
    proxy_client: socket.socket
    proxy_upstream: socket.socket
    peer_upstream: socket.socket
    record: SessionRecord

    def close(self) -> None:
        for sock in (self.peer_client, self.proxy_client, self.proxy_upstream, self.peer_upstream):
            sock.close()


async def _wire() -> Wiring:
    peer_client, proxy_client = await tcp_pair()
    proxy_upstream, peer_upstream = await tcp_pair()
    record = SessionRecord("test", "127.0.0.1:1", "127.0.0.1:2", time.monotonic())
    return Wiring(peer_client, proxy_client, proxy_upstream, peer_upstream, record)


async def _read_all(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    data = bytearray()
    while chunk := await loop.sock_recv(sock, 1 << 16):
        data += chunk
    return bytes(data)


async def _send_chunks(sock: socket.socket, chunks: list[bytes], then_shutdown: bool) -> None:
    loop = asyncio.get_running_loop()
    for chunk in chunks:
        await loop.sock_sendall(sock, chunk)
    if then_shutdown:
        sock.shutdown(socket.SHUT_WR)


_abort = abort_socket


async def _abort_after_acknowledged(sock: socket.socket) -> None:
    """Reset only once the peer's kernel has every byte: nothing is lost on our side."""
    while unacknowledged_bytes(sock):
        await asyncio.sleep(0.001)
    _abort(sock)


async def _cancel(task: asyncio.Future[Any]) -> None:
    task.cancel()
    await asyncio.wait([task])


chunk_lists = st.lists(st.binary(min_size=1, max_size=70_000), max_size=8)


@pytest.mark.parametrize("relay", RELAYS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(up=chunk_lists, down=chunk_lists, client_closes_first=st.booleans())
def test_bytes_and_half_closes_arrive_intact(
    relay: Relay, up: list[bytes], down: list[bytes], client_closes_first: bool
) -> None:
    async def scenario() -> None:
        w = await _wire()
        try:
            relaying = asyncio.ensure_future(relay(w.proxy_client, w.proxy_upstream, w.record))
            if client_closes_first:
                # The client finishes sending first; the upstream answers only after that EOF.
                await _send_chunks(w.peer_client, up, then_shutdown=True)
                got_up = await _read_all(w.peer_upstream)
                await _send_chunks(w.peer_upstream, down, then_shutdown=True)
                got_down = await _read_all(w.peer_client)
            else:
                await _send_chunks(w.peer_upstream, down, then_shutdown=True)
                got_down = await _read_all(w.peer_client)
                await _send_chunks(w.peer_client, up, then_shutdown=True)
                got_up = await _read_all(w.peer_upstream)
            assert got_up == b"".join(up)
            assert got_down == b"".join(down)
            assert await relaying == "closed"
            assert (w.record.bytes_up, w.record.bytes_down) == (len(got_up), len(got_down))
            assert relay.spliced_all(w.record), w.record
        finally:
            w.close()

    relay.run(scenario)


@pytest.mark.parametrize("relay", RELAYS)
@pytest.mark.parametrize("ending", ["half_close", "upstream_resets"])
def test_a_bulk_transfer_moves_by_the_relays_own_path_to_the_end(relay: Relay, ending: str) -> None:
    """1 MiB each way: the splice relays really splice (all of it, or all past the first 64 KiB
    for splice-auto), the copy relays never do, and a half-close or a reset after splicing
    ends the session as the lifecycle matrix says."""
    up, down = bytes(range(256)) * 4096, bytes(reversed(range(256))) * 4096

    async def scenario() -> None:
        w = await _wire()
        try:
            relaying = asyncio.ensure_future(relay(w.proxy_client, w.proxy_upstream, w.record))
            client_reads = asyncio.ensure_future(read_until_end(w.peer_client))
            await _send_chunks(w.peer_client, [up], then_shutdown=True)
            assert await _read_all(w.peer_upstream) == up  # the client's FIN came after it
            await _send_chunks(w.peer_upstream, [down], then_shutdown=ending == "half_close")
            if ending == "half_close":
                assert await relaying == "closed"
                assert await client_reads == (down, "eof")
            else:
                await _abort_after_acknowledged(w.peer_upstream)
                assert await relaying == "upstream_reset"
                assert await client_reads == (relay.before_reset(down), "reset")
            delivered_down = down if ending == "half_close" else relay.before_reset(down)
            assert (w.record.bytes_up, w.record.bytes_down) == (len(up), len(delivered_down))
            assert relay.spliced_all(w.record), w.record
            if relay.kind is RelayKind.SPLICE and relay.pipes:
                assert w.record.spliced_bytes > len(up)
            assert w.record.relay == relay.name
        finally:
            w.close()

    relay.run(scenario)


@pytest.mark.parametrize("relay", RELAYS)
def test_upstream_reset_reaches_the_client_as_a_reset(relay: Relay) -> None:
    async def scenario() -> None:
        w = await _wire()
        try:
            relaying = asyncio.ensure_future(relay(w.proxy_client, w.proxy_upstream, w.record))
            await _send_chunks(w.peer_upstream, [b"partial response"], then_shutdown=False)
            loop = asyncio.get_running_loop()
            expected = relay.before_reset(b"partial response")
            assert await loop.sock_recv(w.peer_client, 100) == expected
            _abort(w.peer_upstream)
            assert await relaying == "upstream_reset"
            with pytest.raises(ConnectionResetError):
                await _read_all(w.peer_client)
        finally:
            w.close()

    relay.run(scenario)


@pytest.mark.parametrize("relay", RELAYS)
def test_client_reset_reaches_the_upstream_as_a_reset(relay: Relay) -> None:
    async def scenario() -> None:
        w = await _wire()
        try:
            relaying = asyncio.ensure_future(relay(w.proxy_client, w.proxy_upstream, w.record))
            await _send_chunks(w.peer_client, [b"upload start"], then_shutdown=False)
            loop = asyncio.get_running_loop()
            expected = relay.before_reset(b"upload start")
            assert await loop.sock_recv(w.peer_upstream, 100) == expected
            _abort(w.peer_client)
            assert await relaying == "client_reset"
            with pytest.raises(ConnectionResetError):
                await _read_all(w.peer_upstream)
        finally:
            w.close()

    relay.run(scenario)


@pytest.mark.parametrize("relay", RELAYS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    up=chunk_lists,
    down=st.lists(st.binary(min_size=1, max_size=300_000), max_size=6),
    ending=st.sampled_from(["both_fin", "upstream_resets", "client_resets"]),
)
def test_resets_arrive_after_every_byte_sent_before_them(
    relay: Relay, up: list[bytes], down: list[bytes], ending: str
) -> None:
    """Whatever a peer sent before its reset reaches the other peer, and then the reset does."""

    async def scenario() -> None:
        w = await _wire()
        try:
            relaying = asyncio.ensure_future(relay(w.proxy_client, w.proxy_upstream, w.record))
            client_reads = asyncio.ensure_future(read_until_end(w.peer_client))
            upstream_reads = asyncio.ensure_future(read_until_end(w.peer_upstream))
            await _send_chunks(w.peer_client, up, then_shutdown=ending != "client_resets")
            await _send_chunks(w.peer_upstream, down, then_shutdown=ending != "upstream_resets")
            # The side that resets first reads everything the other sent it, and its FIN: so
            # the other direction has ended cleanly, and only this reset is left to pass on
            # (not a race of the other direction's last write into the reset peer).
            if ending == "upstream_resets":
                assert await upstream_reads == (b"".join(up), "eof")
                await _abort_after_acknowledged(w.peer_upstream)
            elif ending == "client_resets":
                assert await client_reads == (b"".join(down), "eof")
                await _abort_after_acknowledged(w.peer_client)
            reason = await relaying
            if ending == "both_fin":
                assert reason == "closed"
                assert await client_reads == (b"".join(down), "eof")
                assert await upstream_reads == (b"".join(up), "eof")
            elif ending == "upstream_resets":
                assert reason == "upstream_reset"
                assert await client_reads == (relay.before_reset(b"".join(down)), "reset")
            else:
                assert reason == "client_reset"
                assert await upstream_reads == (relay.before_reset(b"".join(up)), "reset")
            assert relay.spliced_all(w.record), w.record
            for reader in (client_reads, upstream_reads):
                await _cancel(reader)
        finally:
            w.close()

    relay.run(scenario)


@pytest.mark.parametrize("relay", RELAYS)
def test_upstream_reset_behind_a_slow_client_loses_nothing(relay: Relay) -> None:
    """The reset must wait for bytes still queued toward a client that reads slowly."""

    async def scenario() -> None:
        w = await _wire()
        # Small buffers toward the client, so bytes are still queued in the proxy at the reset.
        w.proxy_client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        w.peer_client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        loop = asyncio.get_running_loop()
        payload = bytes(range(256)) * 512  # 128 KiB
        try:
            relaying = asyncio.ensure_future(relay(w.proxy_client, w.proxy_upstream, w.record))

            async def slow_read() -> tuple[bytes, str]:
                data = bytearray()
                try:
                    while chunk := await loop.sock_recv(w.peer_client, 4096):
                        data += chunk
                        await asyncio.sleep(0.001)
                except ConnectionResetError:
                    return bytes(data), "reset"
                return bytes(data), "eof"

            reading = asyncio.ensure_future(slow_read())
            await _send_chunks(w.peer_upstream, [payload], then_shutdown=False)
            await _abort_after_acknowledged(w.peer_upstream)
            assert await reading == (relay.before_reset(payload), "reset")
            assert await relaying == "upstream_reset"
        finally:
            w.close()

    relay.run(scenario)


@pytest.mark.parametrize("relay", RELAYS)
@pytest.mark.parametrize("gone", ["client", "upstream"])
def test_a_peer_that_resets_while_receiving_resets_the_sender(relay: Relay, gone: str) -> None:
    """The SINK_RESET cells: the side that was only receiving goes away with a reset; the side
    still sending must get a reset, not keep sending into a dead session."""

    async def scenario() -> None:
        w = await _wire()
        loop = asyncio.get_running_loop()
        if gone == "client":
            receiver, sender, other = w.peer_client, w.peer_upstream, w.peer_client
        else:
            receiver, sender, other = w.peer_upstream, w.peer_client, w.peer_upstream
        try:
            relaying = asyncio.ensure_future(relay(w.proxy_client, w.proxy_upstream, w.record))
            # The receiver finishes its own direction first, so only one pump is left.
            other.shutdown(socket.SHUT_WR)
            assert await loop.sock_recv(sender, 10) == b""
            await loop.sock_sendall(sender, b"x" * 100_000)
            assert await loop.sock_recv(receiver, 10)
            _abort(receiver)
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                while True:
                    await loop.sock_sendall(sender, b"y" * 65536)
            assert await relaying == f"{gone}_reset"
        finally:
            w.close()

    relay.run(scenario)
