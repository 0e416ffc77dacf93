"""The TLS relay (issue 13, step 3a) on real loopback sockets: a Python `ssl` client trusting our
CA, a Python `ssl` server with a certificate from its own test CA (`--upstream-ca`), and the relay
between them as a session will run it -- the client's ClientHello already held, as the sniffer
leaves it. Handshakes, SNI and ALPN end to end, plaintext both ways, the half-close and reset
matrix, handshake failures with their reasons, the handshake deadline, and bounded memory.

No timed assertions: behaviour and counts only (performance is the benchmark's)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.relay_harness import read_until_end, tcp_pair
from tests.unit.test_tls_legs import (
    NOW,
    PKI,
    UPSTREAM_IP,
    UPSTREAM_NAME,
    _ca,
    _client_context,
    _self_signed_pem,
    server_context,
)
from tproxy.addons.loader import Addon, Hook
from tproxy.core.options import ConfigError
from tproxy.core.reasons import CloseReason
from tproxy.core.session import SessionRecord
from tproxy.engine.addon_session import AddonSession
from tproxy.engine.poller import Poller
from tproxy.engine.pump import COPY_CHUNK_BYTES
from tproxy.engine.tls_relay import Interception, TLSPhase, TLSRelay, interception_for
from tproxy.interception.sockopts import abort_socket
from tproxy.sniffers.facts import TlsHello
from tproxy.sniffers.tls import sniff_tls
from tproxy.tls.ca import create_ca
from tproxy.tls.contexts import LeafContexts, UpstreamContexts, open_keylog
from tproxy.tls.forge import ForgedLeaf, LeafForger
from tproxy.tls.names import UpstreamCertFacts
from tproxy.tls.passthrough import reason_to_remember

REQUEST = b"GET / HTTP/1.1\r\nHost: upstream.example\r\n\r\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi"


def make_pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """Our CA, an upstream CA (its file for `--upstream-ca`) and its leaf for the upstream."""
    ours, upstream_ca = _ca("tproxy-test"), _ca("upstream-test")
    ca_file = tmp_path_factory.mktemp("upstream-ca") / "ca.pem"
    ca_file.write_bytes(upstream_ca.cert_pem)
    upstream_forger = LeafForger(upstream_ca)
    facts = UpstreamCertFacts(dns_names=(UPSTREAM_NAME,), ip_addresses=(UPSTREAM_IP,))
    leaf = upstream_forger.leaf_for(None, facts, NOW)  # without SNI: all of them
    assert isinstance(leaf, ForgedLeaf)
    return PKI(ours, upstream_ca, ca_file, upstream_forger.leaf_key_pem + leaf.chain_pem,
               _self_signed_pem(), LeafForger(ours))  # fmt: skip


def make_interception(pki: PKI) -> Interception:
    return Interception(
        forger=pki.forger,
        leaves=LeafContexts(pki.forger.leaf_key_pem),
        upstreams=UpstreamContexts(str(pki.upstream_ca_file)),
        handshake_timeout_s=10.0,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory)


@pytest.fixture(scope="module")
def interception(pki: PKI) -> Interception:
    return make_interception(pki)


# --- Python's TLS peers on real sockets -----------------------------------------------------


class TLSPeer:
    """A Python `SSLObject` on a non-blocking socket, driven by the event loop: the client
    program or the upstream server."""

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        name: str | None = None,
    ) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=name
        )
        self._sending = asyncio.Lock()  # a reader's flush and a writer's must not interleave

    def first_flight(self) -> bytes:
        """The client's ClientHello, as the session's sniffer holds it (never sent here)."""
        with pytest.raises(ssl.SSLWantReadError):
            self.obj.do_handshake()
        return self.outgoing.read()

    async def flush(self) -> None:
        async with self._sending:
            data = self.outgoing.read()
            if data:
                await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def _fill(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self.sock, 1 << 16)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
            except ssl.SSLWantReadError:
                await self.flush()
                await self._fill()
                continue
            await self.flush()
            return

    async def send(self, data: bytes) -> None:
        self.obj.write(data)
        await self.flush()

    async def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):  # sent; the peer's is not awaited
            self.obj.unwrap()
        await self.flush()

    async def read(self, at_least: int | None = None) -> tuple[bytes, str]:
        """Plaintext until `at_least` bytes came ("more"), or the end: "close_notify",
        "truncated" (a FIN without it), "reset", or "error <reason>"."""
        data = bytearray()
        while True:
            try:
                while at_least is None or len(data) < at_least:
                    chunk = self.obj.read(1 << 16)
                    if not chunk:
                        return bytes(data), "close_notify"
                    data += chunk
                return bytes(data), "more"
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return bytes(data), "close_notify"
            except ssl.SSLEOFError:
                return bytes(data), "truncated"
            except ssl.SSLError as exc:
                return bytes(data), f"error {exc.reason}"
            await self.flush()
            try:
                await self._fill()
            except ConnectionResetError:
                return bytes(data), "reset"

    async def read_exactly(self, n: int) -> bytes:
        data, how = await self.read(n)
        assert how == "more", (how, len(data))
        return data


# --- the relay between them ------------------------------------------------------------------


@dataclass
class Intercepting:
    client: TLSPeer
    upstream: TLSPeer
    relay: TLSRelay
    record: SessionRecord
    ended: asyncio.Future[CloseReason]
    sockets: list[socket.socket] = field(default_factory=list)
    # A claimed session's: its addons' session, and the hooks that failed (and how).
    session: AddonSession | None = None
    hook_errors: list[tuple[Hook, BaseException]] = field(default_factory=list)

    async def handshakes(self) -> None:
        await asyncio.gather(self.client.handshake(), self.upstream.handshake())

    async def reason(self) -> CloseReason:
        async with asyncio.timeout(10):
            return await self.ended


@dataclass
class Recorded:
    """A plaintext hook (`Recording`): what it was shown."""

    up: bytearray = field(default_factory=bytearray)
    down: bytearray = field(default_factory=bytearray)
    ends: list[tuple[bool, bool]] = field(default_factory=list)

    def relayed(self, from_client: bool, data: bytes | memoryview) -> bool:
        (self.up if from_client else self.down).extend(data)
        return True

    def ended(self, from_client: bool, reset: bool) -> None:
        self.ends.append((from_client, reset))


@asynccontextmanager
async def intercepting(
    interception: Interception,
    client_context: ssl.SSLContext,
    server: ssl.SSLContext,
    *,
    sni: str | None = UPSTREAM_NAME,
    verify: bool = True,
    held: bytes | None = None,
    hello: TlsHello | None = None,
    recording: Recorded | None = None,
    held_cut: int | None = None,
    pending_down: bytes = b"",
    addons: tuple[Addon, ...] | None = None,
    session_start: Callable[[AddonSession], None] | None = None,
) -> AsyncIterator[Intercepting]:
    """The client program and the upstream server connected through a TLS relay, which has
    started: the client's ClientHello is held by the relay, as the sniffer leaves it (with
    `held_cut`, only that much of it: the client sends the rest once the relay started).

    With `addons`, every one of them claims the session, after `session_start` (if given) was
    called with the addons' session; a hook's failure is noted in `hook_errors` and ends the
    run as the session would (`addon_error`, both sides reset)."""
    loop = asyncio.get_running_loop()
    peer_client, proxy_client = await tcp_pair()
    proxy_upstream, peer_upstream = await tcp_pair()
    client = TLSPeer(peer_client, client_context, server_side=False, name=sni)
    if held is None:
        held = client.first_flight()
    if hello is None:
        sniffed = sniff_tls(held)
        assert isinstance(sniffed, TlsHello)
        hello = sniffed
    rest = b""
    if held_cut is not None:
        held, rest = held[:held_cut], held[held_cut:]
    upstream = TLSPeer(peer_upstream, server, server_side=True)
    record = SessionRecord("t", "127.0.0.1:1", "192.0.2.10:443", time.monotonic())
    ended: asyncio.Future[CloseReason] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    poller = Poller(loop)

    def on_end(reason: CloseReason) -> None:
        # As the session does: the last FINs after a clean end (a reset closed them already).
        for sock in (proxy_client, proxy_upstream):
            if sock.fileno() >= 0:
                poller.forget(sock.fileno())
            sock.close()
        ended.set_result(reason)

    session = None
    hook_errors: list[tuple[Hook, BaseException]] = []
    if addons is not None:
        session = AddonSession(record, None, "allow")
        session.claimers = [addon.name for addon in addons]
        if session_start is not None:
            session_start(session)

    def on_addon_error(hook: Hook, exc: BaseException) -> None:
        hook_errors.append((hook, exc))
        for sock in (proxy_client, proxy_upstream):  # as the session's close(addon_error)
            if sock.fileno() >= 0:
                poller.forget(sock.fileno())
            abort_socket(sock)
        ended.set_result(CloseReason.ADDON_ERROR)

    relay = TLSRelay(poller, proxy_client, proxy_upstream, record, hello=hello, held=held,
                     destination=str(UPSTREAM_IP), interception=interception,
                     upstream_verify=verify, on_end=on_end,
                     on_error=ended.set_exception, spawn=spawn,
                     recording=recording, pending_down=pending_down, session=session,
                     addons=addons or (), on_addon_error=on_addon_error)  # fmt: skip
    run = Intercepting(client, upstream, relay, record, ended,
                       [peer_client, proxy_client, proxy_upstream, peer_upstream],
                       session, hook_errors)  # fmt: skip
    relay.start()
    if rest:
        await loop.sock_sendall(peer_client, rest)
    try:
        yield run
    finally:
        if not ended.done():
            relay.stop()
        poller.close()
        for sock in run.sockets:
            sock.close()


def _run(scenario: Callable[[], Awaitable[None]], loop: str = "asyncio") -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await scenario()

    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(bounded())


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


async def _ends(sock: socket.socket) -> tuple[bytes, str]:
    async with asyncio.timeout(10):
        return await read_until_end(sock)


async def _close_cleanly(run: Intercepting) -> None:
    """The client closes first (close_notify, FIN), the upstream answers the same way."""
    await run.client.close_notify()
    run.client.sock.shutdown(socket.SHUT_WR)
    assert await run.upstream.read() == (b"", "close_notify")
    await run.upstream.close_notify()
    run.upstream.sock.shutdown(socket.SHUT_WR)
    assert await run.client.read() == (b"", "close_notify")
    assert await run.reason() == "closed"


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize(
    ("client_alpn", "server_alpn", "expected"),
    [
        (["h2", "http/1.1"], ["h2", "http/1.1"], "h2"),
        (["h2", "http/1.1"], ["http/1.1"], "http/1.1"),
        (None, ["h2"], None),
    ],
)
def test_a_request_and_its_response_with_sni_and_the_alpn_the_upstream_chose(  # noqa: PLR0917 (pytest gives them)
    pki: PKI,
    interception: Interception,
    client_alpn: list[str] | None,
    server_alpn: list[str],
    expected: str | None,
    loop: str,
) -> None:
    server = server_context(pki.upstream_pem, server_alpn)
    seen_sni: list[str | None] = []
    server.sni_callback = lambda obj, name, ctx: seen_sni.append(name)
    client_context = _client_context(pki.ours, client_alpn)

    async def scenario() -> None:
        async with intercepting(interception, client_context, server) as run:
            relay = run.relay
            assert (relay.phase, relay.handshake_deadline_at is not None) == (
                TLSPhase.UPSTREAM_HANDSHAKE, True,
            )  # fmt: skip
            await run.handshakes()
            assert seen_sni == [UPSTREAM_NAME]
            assert run.upstream.obj.selected_alpn_protocol() == expected
            assert run.client.obj.selected_alpn_protocol() == expected
            # The client verified our leaf (check_hostname): issued by our CA, for its name.
            shown = x509.load_der_x509_certificate(run.client.obj.getpeercert(True) or b"")
            assert shown.issuer == pki.ours.cert.subject
            san = shown.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert UPSTREAM_NAME in san.get_values_for_type(x509.DNSName)
            await run.client.send(REQUEST)
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            await run.upstream.send(RESPONSE)
            assert await run.client.read_exactly(len(RESPONSE)) == RESPONSE
            assert run.relay.phase is TLSPhase.RELAYING
            assert run.relay.handshake_deadline_at is None
            await _close_cleanly(run)
            record, outcome = run.record, run.relay.outcome
            assert (record.relay, record.bytes_up, record.bytes_down) == (
                "tls", len(REQUEST), len(RESPONSE),
            )  # fmt: skip
            assert outcome.intercepted and outcome.failure is None and outcome.rejected is None
            assert outcome.client is not None and outcome.upstream is not None
            assert outcome.client.alpn == outcome.upstream.alpn == expected
            assert outcome.client.version == run.client.obj.version()
            assert outcome.upstream.verified and outcome.upstream_verify
            assert outcome.upstream.peer_issuer is not None
            assert "upstream-test" in outcome.upstream.peer_issuer

    _run(scenario, loop)


def _secrets(path: Path) -> set[tuple[str, str]]:
    """The (label, client random) pairs of an NSS key log file."""
    lines = path.read_text().splitlines()
    return {(line.split()[0], line.split()[1]) for line in lines if line and line[0] != "#"}


def test_the_key_log_gets_both_legs_secrets_of_every_session(pki: PKI, tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ours = create_ca(ca_dir, hostname="keylog-test")
    path = tmp_path / "keys.log"
    old = os.umask(0)  # 0600 whatever the umask
    try:
        fd, by_descriptor = open_keylog(str(path))
    finally:
        os.umask(old)
    # The peers log their own secrets apart: each of our legs must match its peer's.
    client_context = _client_context(ours, ["http/1.1"])
    client_context.keylog_filename = str(tmp_path / "client.log")
    server = server_context(pki.upstream_pem, ["http/1.1"])
    server.keylog_filename = str(tmp_path / "upstream.log")

    async def scenario() -> None:
        interception = interception_for(
            str(ca_dir), str(pki.upstream_ca_file), 10.0, keylog=by_descriptor
        )
        for _ in range(2):
            async with intercepting(interception, client_context, server) as run:
                await run.handshakes()
                await run.client.send(REQUEST)
                assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
                await _close_cleanly(run)

    try:
        _run(scenario)
    finally:
        os.close(fd)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    logged = _secrets(path)
    client_leg, upstream_leg = (
        _secrets(tmp_path / "client.log"),
        _secrets(tmp_path / "upstream.log"),
    )
    assert logged == client_leg | upstream_leg
    for label in ("CLIENT_HANDSHAKE_TRAFFIC_SECRET", "CLIENT_TRAFFIC_SECRET_0"):
        # Two sessions, two legs each: four connections, four client randoms.
        assert len({random for name, random in logged if name == label}) == 4
        assert len({random for name, random in client_leg if name == label}) == 2


def test_a_symbolic_link_as_the_key_log_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.log"
    (tmp_path / "keys.log").symlink_to(target)
    with pytest.raises(ConfigError, match="a symbolic link"):
        open_keylog(str(tmp_path / "keys.log"))
    assert not target.exists()


def test_a_mebibyte_each_way_at_once_arrives_intact(pki: PKI, interception: Interception) -> None:
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)

    async def send_all(peer: TLSPeer, data: bytes) -> None:
        for at in range(0, len(data), 50_000):  # several records, several reads
            await peer.send(data[at : at + 50_000])
        await peer.close_notify()
        peer.sock.shutdown(socket.SHUT_WR)

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            await run.handshakes()
            got_up, got_down, _, _ = await asyncio.gather(
                run.upstream.read(), run.client.read(),
                send_all(run.client, up), send_all(run.upstream, down),
            )  # fmt: skip
            assert got_up[1] == got_down[1] == "close_notify"
            assert hashlib.sha256(got_up[0]).digest() == hashlib.sha256(up).digest()
            assert hashlib.sha256(got_down[0]).digest() == hashlib.sha256(down).digest()
            assert await run.reason() == "closed"
            assert (run.record.bytes_up, run.record.bytes_down) == (len(up), len(down))

    _run(scenario)


def test_the_plaintext_hook_sees_both_directions_and_the_ends(
    pki: PKI, interception: Interception
) -> None:
    recorded = Recorded()

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, recording=recorded
        ) as run:
            await run.handshakes()
            await run.client.send(REQUEST)
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            await run.upstream.send(RESPONSE)
            assert await run.client.read_exactly(len(RESPONSE)) == RESPONSE
            await _close_cleanly(run)
        assert (bytes(recorded.up), bytes(recorded.down)) == (REQUEST, RESPONSE)
        assert recorded.ends == [(True, False), (False, False)]

    _run(scenario)


def _client_at(pki: PKI, version: ssl.TLSVersion) -> ssl.SSLContext:
    context = _client_context(pki.ours)
    context.maximum_version = version
    return context


def _name(version: ssl.TLSVersion) -> str:
    return version.name.replace("_", ".")


# --- half-close and reset --------------------------------------------------------------------


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_half_close_client_first(
    pki: PKI, interception: Interception, version: ssl.TLSVersion
) -> None:
    """The client sends its request, close_notify and FIN; the upstream still answers."""

    async def scenario() -> None:
        server = server_context(pki.upstream_pem, version=version)
        async with intercepting(interception, _client_at(pki, version), server) as run:
            await run.handshakes()
            assert run.upstream.obj.version() == run.client.obj.version() == _name(version)
            await run.client.send(REQUEST)
            await run.client.close_notify()
            run.client.sock.shutdown(socket.SHUT_WR)
            assert await run.upstream.read() == (REQUEST, "close_notify")
            await run.upstream.send(RESPONSE)
            await run.upstream.close_notify()
            run.upstream.sock.shutdown(socket.SHUT_WR)
            assert await run.client.read() == (RESPONSE, "close_notify")
            assert await run.reason() == "closed"
            assert await _ends(run.client.sock) == (b"", "eof")
            assert run.record.half_closed_at is not None

    _run(scenario)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_half_close_upstream_first(
    pki: PKI, interception: Interception, version: ssl.TLSVersion
) -> None:
    """The upstream answers and closes (close_notify, FIN); the client still sends after it."""

    async def scenario() -> None:
        server = server_context(pki.upstream_pem, version=version)
        async with intercepting(interception, _client_at(pki, version), server) as run:
            await run.handshakes()
            await run.upstream.send(RESPONSE)
            await run.upstream.close_notify()
            run.upstream.sock.shutdown(socket.SHUT_WR)
            assert await run.client.read() == (RESPONSE, "close_notify")
            await run.client.send(b"after your close")
            await run.client.close_notify()
            run.client.sock.shutdown(socket.SHUT_WR)
            assert await run.upstream.read() == (b"after your close", "close_notify")
            assert await run.reason() == "closed"
            assert await _ends(run.upstream.sock) == (b"", "eof")

    _run(scenario)


def test_a_fin_without_close_notify_is_passed_on_as_the_same_truncation(
    pki: PKI, interception: Interception
) -> None:
    """The upstream sends part of its answer and a bare FIN: the client gets what came, then a
    bare FIN too (its TLS sees the truncation, not a close_notify), so the truncated transfer
    looks to it exactly as it would have without tproxy."""

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            await run.handshakes()
            await run.upstream.send(RESPONSE[:10])
            run.upstream.sock.shutdown(socket.SHUT_WR)
            assert await run.client.read() == (RESPONSE[:10], "truncated")
            run.client.sock.shutdown(socket.SHUT_WR)
            assert await run.reason() == "closed"
            assert run.relay.outcome.failure is None  # a truncation, not a TLS failure

    _run(scenario)


def test_an_upstream_reset_mid_stream_resets_the_client_after_what_came_before(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            await run.handshakes()
            await run.upstream.send(RESPONSE)
            assert await run.client.read_exactly(len(RESPONSE)) == RESPONSE
            await run.upstream.send(b"partial")
            abort_socket(run.upstream.sock)
            assert await run.client.read() == (b"partial", "reset")
            assert await run.reason() == "upstream_reset"

    _run(scenario)


def test_a_client_reset_resets_the_upstream(pki: PKI, interception: Interception) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            await run.handshakes()
            await run.client.send(REQUEST)
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            abort_socket(run.client.sock)
            assert await run.upstream.read() == (b"", "reset")
            assert await run.reason() == "client_reset"

    _run(scenario)


def test_garbage_after_the_handshake_is_that_sides_reset_with_the_failure_told(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            await run.handshakes()
            await run.upstream.send(RESPONSE)
            assert await run.client.read_exactly(len(RESPONSE)) == RESPONSE
            run.upstream.sock.send(b"\x17\x03\x03\x00\x10" + b"\x00" * 16)  # no record of ours
            assert await run.client.read() == (b"", "reset")
            assert await run.reason() == "upstream_reset"
            outcome = run.relay.outcome
            assert outcome.intercepted and outcome.failed_side == "upstream"
            assert outcome.failure is not None and not outcome.failure.in_handshake

    _run(scenario)


# --- handshake failures ----------------------------------------------------------------------


async def _both_reset(run: Intercepting) -> None:
    """Both peers see a reset, the client before any byte of ours reached it."""
    assert await _ends(run.client.sock) == (b"", "reset")
    got, how = await _ends(run.upstream.sock)
    assert how == "reset", got


def test_a_self_signed_upstream_resets_the_client_with_upstream_cert_invalid(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.self_signed_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            upstream_tries = asyncio.ensure_future(run.upstream.handshake())
            assert await run.reason() == "upstream_cert_invalid"
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await upstream_tries
            assert await _ends(run.client.sock) == (b"", "reset")
            outcome = run.relay.outcome
            assert outcome.failure is not None and outcome.failed_side == "upstream"
            assert "self-signed" in outcome.failure.detail or "self signed" in (
                outcome.failure.detail
            )
            assert outcome.client is None and not outcome.intercepted
            assert outcome.rejected is None

    _run(scenario)


def test_upstream_verify_false_intercepts_a_self_signed_upstream(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.self_signed_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, verify=False
        ) as run:
            await run.handshakes()
            await run.client.send(REQUEST)
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            await run.upstream.send(RESPONSE)
            assert await run.client.read_exactly(len(RESPONSE)) == RESPONSE
            await _close_cleanly(run)
            outcome = run.relay.outcome
            assert outcome.intercepted and not outcome.upstream_verify
            assert outcome.upstream is not None and not outcome.upstream.verified

    _run(scenario)


def test_a_client_without_our_ca_fails_and_is_said_to_reject_our_certificate(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        stranger = _client_context(_ca("someone-else"))
        async with intercepting(interception, stranger, server) as run:
            client_tries = asyncio.ensure_future(run.client.handshake())
            await run.upstream.handshake()
            with pytest.raises(ssl.SSLCertVerificationError):
                await client_tries
            await run.client.flush()  # its alert
            assert await run.reason() == "client_tls_failed"
            outcome = run.relay.outcome
            assert outcome.failed_side == "client" and outcome.upstream is not None
            assert outcome.failure is not None and outcome.failure.alert == "unknown_ca"
            assert outcome.rejected == "the client sent alert unknown_ca"
            assert (await _ends(run.upstream.sock))[1] == "reset"

    _run(scenario)


def test_an_upstream_asking_for_a_client_certificate_cannot_be_intercepted(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem, client_cert=True)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            upstream_tries = asyncio.ensure_future(run.upstream.handshake())
            assert await run.reason() == "upstream_wants_client_cert"
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await upstream_tries
            assert await _ends(run.client.sock) == (b"", "reset")
            assert run.relay.outcome.failed_side == "upstream"

    _run(scenario)


def test_a_bare_alert_certificate_required_is_no_reason_to_pass_the_name_through(
    pki: PKI, interception: Interception
) -> None:
    """An upstream (or anyone on the path) that answers our ClientHello with alert 116 alone has
    authenticated nothing: the session fails, and nothing is remembered (review rv3)."""

    async def scenario() -> None:
        async with intercepting(
            interception, _client_context(pki.ours), pki.upstream_server, sni="www.bank.example"
        ) as run:
            loop = asyncio.get_running_loop()
            hello = await loop.sock_recv(run.upstream.sock, 65536)  # our ClientHello
            assert hello[:1] == b"\x16"
            await loop.sock_sendall(run.upstream.sock, b"\x15\x03\x03\x00\x02\x02\x74")
            assert await run.reason() == "upstream_tls_failed"
            outcome = run.relay.outcome
            assert outcome.failed_side == "upstream"
            assert outcome.failure is not None and outcome.failure.alert == "certificate_required"
            assert reason_to_remember(outcome.failure, "upstream", on_client_reject=False) is None

    _run(scenario)


def test_garbage_instead_of_a_client_hello_fails_cleanly(
    pki: PKI, interception: Interception
) -> None:
    hello = TlsHello(UPSTREAM_NAME, (), "1.3", ech=False)
    garbage = b"\x16\x03\x01\x00\x20" + b"\xff" * 32

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, held=garbage, hello=hello
        ) as run:
            upstream_tries = asyncio.ensure_future(run.upstream.handshake())
            assert await run.reason() == "client_tls_failed"
            await _both_reset(run)
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                await upstream_tries
            outcome = run.relay.outcome
            assert outcome.failure is not None and outcome.failure.in_handshake
            assert outcome.rejected is None  # nothing of ours was refused

    _run(scenario)


@pytest.mark.parametrize("cut", [1, 100, -1])
def test_a_client_hello_held_in_part_is_completed_from_the_socket(
    pki: PKI, interception: Interception, cut: int
) -> None:
    """The sniffer held only part of the ClientHello; the rest comes on the socket while the
    upstream handshakes, and is held for the client's handshake."""

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, held_cut=cut
        ) as run:
            await run.handshakes()
            await run.client.send(REQUEST)
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            await _close_cleanly(run)

    _run(scenario)


def test_what_a_via_proxy_left_of_the_upstreams_bytes_goes_to_the_upstream_leg(
    pki: PKI, interception: Interception
) -> None:
    """An upstream proxy's answer came with bytes of the upstream's (`pending_down`): they are
    the upstream's first ciphertext (here nonsense: the upstream leg fails on them)."""

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, pending_down=b"HTTP/1.1 200 OK\r\n"
        ) as run:
            assert await run.reason() == "upstream_tls_failed"
            assert run.relay.outcome.failed_side == "upstream"
            assert await _ends(run.client.sock) == (b"", "reset")

    _run(scenario)


def test_without_sni_the_destination_ip_is_verified_and_forged_for(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        client_context = _client_context(pki.ours)
        client_context.check_hostname = False  # no name to check: it asked for an address
        async with intercepting(interception, client_context, server, sni=None) as run:
            await run.handshakes()
            shown = x509.load_der_x509_certificate(run.client.obj.getpeercert(True) or b"")
            san = shown.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            assert UPSTREAM_IP in san.get_values_for_type(x509.IPAddress)
            assert run.relay.outcome.upstream is not None
            assert run.relay.outcome.upstream.verified
            await _close_cleanly(run)

    _run(scenario)


def test_an_upstream_that_speaks_first_is_heard_once_the_client_handshake_is_done(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            await run.upstream.handshake()
            await run.upstream.send(b"220 banner\r\n")  # while the client still handshakes
            await run.client.handshake()
            assert await run.client.read_exactly(12) == b"220 banner\r\n"
            await _close_cleanly(run)

    _run(scenario)


# --- the handshake deadline and clients that leave -------------------------------------------


def test_a_client_that_stops_mid_handshake_ends_at_the_deadline(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            await run.upstream.handshake()
            # The client never answers our flight.
            await _until(lambda: run.relay.phase is TLSPhase.CLIENT_HANDSHAKE)
            deadline_at = run.relay.handshake_deadline_at
            assert deadline_at is not None and deadline_at > time.monotonic()
            run.relay.handshake_deadline_passed()  # what the sweep calls once it is past
            assert await run.reason() == "client_tls_failed"
            outcome = run.relay.outcome
            assert outcome.failure is not None and "within 10 s" in outcome.failure.detail
            assert outcome.rejected is None  # a client that is slow refused nothing
            got, how = await _ends(run.client.sock)
            assert how == "reset" and got  # it had our flight
            assert (await _ends(run.upstream.sock))[1] == "reset"
            run.relay.handshake_deadline_passed()  # once over, nothing happens

    _run(scenario)


def test_an_upstream_that_never_answers_ends_at_the_deadline(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            assert run.relay.handshake_deadline_at is not None
            run.relay.handshake_deadline_passed()
            assert await run.reason() == "upstream_tls_failed"
            assert run.relay.outcome.failed_side == "upstream"
            await _both_reset(run)

    _run(scenario)


@pytest.mark.parametrize("how", ["fin", "reset"])
def test_a_client_leaving_during_the_upstream_handshake_rejects_nothing(
    pki: PKI, interception: Interception, how: str
) -> None:
    """It gave up waiting: not a refusal of a certificate it never saw."""

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            if how == "fin":
                run.client.sock.shutdown(socket.SHUT_WR)
            else:
                abort_socket(run.client.sock)
            assert await run.reason() == "client_tls_failed"
            outcome = run.relay.outcome
            assert outcome.rejected is None and outcome.upstream is None
            assert (await _ends(run.upstream.sock))[1] == "reset"

    _run(scenario)


# --- memory ----------------------------------------------------------------------------------


async def _stuff(peer: TLSPeer, total: int) -> int:
    """Send up to `total` bytes of plaintext for at most a second; how many went."""
    sent = 0
    block = b"x" * 16384
    deadline = time.monotonic() + 1.0
    while sent < total and time.monotonic() < deadline:
        peer.obj.write(block)
        data = peer.outgoing.read()
        view = memoryview(data)
        while view and time.monotonic() < deadline:
            try:
                view = view[peer.sock.send(view) :]
            except BlockingIOError:
                await asyncio.sleep(0.01)
        if view:
            break
        sent += len(block)
        await asyncio.sleep(0)
    return sent


def test_behind_a_client_that_does_not_read_the_relay_holds_about_one_chunk(
    pki: PKI, interception: Interception
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            await run.handshakes()
            sent = await _stuff(run.upstream, 64 << 20)
            assert sent < 64 << 20, "nothing held the upstream back"
            # What the relay holds for the client: one read's worth of records, at most.
            assert run.relay.down.queued <= COPY_CHUNK_BYTES + 4096, run.relay.down.queued
            got = await run.client.read_exactly(sent)  # once it reads, everything arrives
            assert len(got) == sent and run.record.bytes_down == sent

    _run(scenario)


# --- hypothesis: any writes arrive, in order --------------------------------------------------


@settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    ups=st.lists(st.binary(min_size=1, max_size=40_000), min_size=1, max_size=4),
    downs=st.lists(st.binary(min_size=1, max_size=40_000), min_size=1, max_size=4),
)
def test_any_writes_arrive_whole_and_in_order(
    pki: PKI, interception: Interception, ups: list[bytes], downs: list[bytes]
) -> None:
    async def send_all(peer: TLSPeer, chunks: list[bytes]) -> None:
        for chunk in chunks:
            await peer.send(chunk)
        await peer.close_notify()
        peer.sock.shutdown(socket.SHUT_WR)

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            await run.handshakes()
            got_up, got_down, _, _ = await asyncio.gather(
                run.upstream.read(), run.client.read(),
                send_all(run.client, ups), send_all(run.upstream, downs),
            )  # fmt: skip
            assert got_up == (b"".join(ups), "close_notify")
            assert got_down == (b"".join(downs), "close_notify")
            assert await run.reason() == "closed"

    _run(scenario)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(held=st.binary(min_size=1, max_size=3000))
def test_random_bytes_as_the_held_client_hello_end_only_that_session_cleanly(
    pki: PKI, interception: Interception, held: bytes
) -> None:
    hello = TlsHello(UPSTREAM_NAME, ("h2",), "1.3", ech=False)

    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(
            interception, _client_context(pki.ours), server, held=held, hello=hello
        ) as run:
            upstream_tries = asyncio.ensure_future(run.upstream.handshake())
            run.client.sock.shutdown(socket.SHUT_WR)  # nothing more comes from this "client"
            assert await run.reason() == "client_tls_failed"  # never on_error
            assert run.relay.outcome.failed_side == "client"
            with contextlib.suppress(ssl.SSLError, ConnectionResetError):
                await upstream_tries

    _run(scenario)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(answer=st.binary(min_size=1, max_size=3000))
def test_random_bytes_from_the_upstream_end_only_that_session_cleanly(
    pki: PKI, interception: Interception, answer: bytes
) -> None:
    async def scenario() -> None:
        server = server_context(pki.upstream_pem)
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            upstream = run.upstream.sock
            await asyncio.get_running_loop().sock_sendall(upstream, answer)
            upstream.shutdown(socket.SHUT_WR)
            assert await run.reason() in {"upstream_tls_failed", "upstream_cert_invalid"}
            assert run.relay.outcome.failed_side == "upstream"

    _run(scenario)
