"""A session under a policy, on loopback sockets: it waits for its first bytes only when a rule
needs them, sends them on unchanged, carries out each verdict (reset, redirect, via an upstream
proxy), ends its wait at the sniff timeout, and decides by the policy it started with."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

from tests.unit.test_session_phases import Harness, _phase, _until
from tproxy.core.config import ProxyConfig
from tproxy.core.endpoint import parse_endpoint
from tproxy.engine.deadlines import DeadlineQueue
from tproxy.engine.session import Phase
from tproxy.interception.self_connect import SelfConnectGuard
from tproxy.interception.sockopts import LINGER_RESET
from tproxy.policy.matcher import Matcher
from tproxy.policy.model import parse_policy

HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: www.blocked.test\r\n\r\n"
ALLOWED_REQUEST = b"GET /a HTTP/1.1\r\nHost: www.example.test\r\nX: y\r\n\r\n"


def _config(policy: str) -> ProxyConfig:
    return ProxyConfig(matcher=Matcher(parse_policy(policy)))


SNIFFING = _config("""
sniff_timeout_s = 30
[[rule]]
name = "blocked"
host = ["*.blocked.test"]
action = "reset"
""")


class PolicyHarness(Harness):
    def __init__(self, config: ProxyConfig) -> None:
        super().__init__(config)
        self.deadline_errors: list[Exception] = []
        self.ctx.sniff_deadlines = DeadlineQueue(
            asyncio.get_running_loop(), lambda _w, exc: self.deadline_errors.append(exc)
        )
        self.upstream.setblocking(False)

    def upstream_accept(self) -> socket.socket | None:
        try:
            conn, _ = self.upstream.accept()
        except BlockingIOError:
            return None
        return conn

    def close(self) -> None:
        self.ctx.sniff_deadlines.close()
        super().close()
        assert not self.deadline_errors


Scenario = Callable[["PolicyHarness"], Coroutine[Any, Any, None]]


def _run(scenario: Scenario, config: ProxyConfig) -> None:
    async def main() -> None:
        h = PolicyHarness(config)
        try:
            await scenario(h)
        finally:
            h.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


async def _recv_all(sock: socket.socket, count: int) -> bytes:
    sock.setblocking(False)
    got = b""
    async with asyncio.timeout(10):
        while len(got) < count:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                await asyncio.sleep(0.005)
                continue
            if not chunk:
                break
            got += chunk
    return got


async def _accepted(h: PolicyHarness) -> socket.socket:
    box: list[socket.socket] = []

    def accepted() -> bool:
        conn = h.upstream_accept()
        if conn is not None:
            box.append(conn)
        return bool(box)

    await _until(accepted)
    return box[0]


def test_a_session_waits_for_its_first_bytes_and_sends_them_on_unchanged() -> None:
    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        assert h.session.phase is Phase.SNIFFING
        await asyncio.sleep(0.05)
        assert h.upstream_accept() is None, "connected before the policy decided"
        h.client.send(ALLOWED_REQUEST[:5])  # a request head in two segments
        await asyncio.sleep(0.02)
        assert h.session.phase is Phase.SNIFFING
        h.client.send(ALLOWED_REQUEST[5:])
        conn = await _accepted(h)
        assert await _recv_all(conn, len(ALLOWED_REQUEST)) == ALLOWED_REQUEST
        conn.close()
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        close = h.events()[-1]
        assert (close["proto"], close["http_host"], close["rule"], close["action"]) == (
            "http", "www.example.test", None, "allow",
        )  # fmt: skip
        assert close["bytes_up"] == len(ALLOWED_REQUEST)

    _run(scenario, SNIFFING)


def test_a_reset_verdict_resets_the_client_and_connects_nothing() -> None:
    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        h.client.send(HTTP_REQUEST)
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        h.client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            h.client.recv(1)
        assert h.upstream_accept() is None
        close = h.events()[-1]
        assert (close["reason"], close["rule"], close["action"], close["relay"]) == (
            "policy_reset", "blocked", "reset", None,
        )  # fmt: skip
        assert not any(e["event"] == "upstream_connected" for e in h.events())

    _run(scenario, SNIFFING)


def test_the_sniff_timeout_ends_the_wait_as_silent_and_connects() -> None:
    config = _config(
        'sniff_timeout_s = 0.1\n[[rule]]\nname = "b"\nsni = ["x.test"]\naction = "reset"'
    )

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        assert h.session.phase is Phase.SNIFFING
        conn = await _accepted(h)
        await _until(lambda: _phase(h.session) is Phase.RELAYING)
        conn.send(b"220 banner\r\n")
        assert await _recv_all(h.client, 12) == b"220 banner\r\n"
        conn.close()
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        close = h.events()[-1]
        assert (close["proto"], close["action"], close["reason"]) == ("silent", "allow", "closed")

    _run(scenario, config)


def test_a_client_that_ends_while_sniffed_has_its_bytes_and_its_fin_passed_on() -> None:
    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        h.client.send(b"\x16\x03\x01\x00")  # the start of a TLS record, then the end
        h.client.shutdown(socket.SHUT_WR)
        conn = await _accepted(h)
        assert await _recv_all(conn, 100) == b"\x16\x03\x01\x00"  # to EOF
        conn.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        close = h.events()[-1]
        assert (close["proto"], close["reason"]) == ("unknown", "closed")

    _run(scenario, SNIFFING)


def test_a_client_reset_while_sniffed_ends_the_session_and_connects_nothing() -> None:
    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        h.client.send(b"GET / HT")
        await asyncio.sleep(0.02)
        h.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        assert h.events()[-1]["reason"] == "client_reset"
        assert h.upstream_accept() is None

    _run(scenario, SNIFFING)


def test_address_rules_decide_at_once_and_sniff_as_the_bytes_pass() -> None:
    config = _config('[[rule]]\nname = "lo"\ndst = ["127.0.0.0/8"]\naction = "allow"\n'
                     '[[rule]]\nname = "b"\nsni = ["x.test"]\naction = "reset"')  # fmt: skip

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        assert h.session.phase in (Phase.CONNECTING, Phase.RELAYING)
        conn = await _accepted(h)
        h.client.send(ALLOWED_REQUEST)
        assert await _recv_all(conn, len(ALLOWED_REQUEST)) == ALLOWED_REQUEST
        conn.close()
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        close = h.events()[-1]
        assert (close["rule"], close["proto"], close["http_host"]) == (
            "lo", "http", "www.example.test",
        )  # fmt: skip

    _run(scenario, config)


def test_a_redirect_to_this_proxy_is_a_loop() -> None:
    async def scenario(h: PolicyHarness) -> None:
        # This proxy "listens" on port 1 of every local address.
        h.ctx.guard = SelfConnectGuard([parse_endpoint("0.0.0.0:1")], lambda _ip: True)
        h.session.start()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        close = h.events()[-1]
        assert (close["reason"], close["action"], close["upstream"]) == (
            "loop_refused", "redirect", "127.0.0.1:1",
        )  # fmt: skip

    _run(scenario, _config('[[rule]]\nname = "r"\naction = "redirect"\nto = "127.0.0.1:1"'))


def test_a_session_is_decided_by_the_policy_it_started_with() -> None:
    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        assert h.session.phase is Phase.SNIFFING
        h.ctx.config = ProxyConfig()  # a reload that drops the policy
        h.client.send(HTTP_REQUEST)
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        assert h.events()[-1]["reason"] == "policy_reset"

    _run(scenario, SNIFFING)


VIA = (
    'sniff_timeout_s = 5\n[[rule]]\nname = "out"\naction = "via"\nvia = "socks5://127.0.0.1:{port}"'
)


async def _fake_socks5(conn: socket.socket, reply: bytes) -> bytes:
    """Play a SOCKS5 proxy on `conn`: no-auth, then `reply` to the request; return the request."""
    greeting = await _recv_all(conn, 3)
    assert greeting == b"\x05\x01\x00"
    conn.send(b"\x05\x00")
    request = await _recv_all(conn, 10)  # IPv4: 4 + 4 + 2 bytes
    conn.send(reply)
    return request


def _via_run(scenario: Scenario) -> None:
    async def main() -> None:
        h = PolicyHarness(ProxyConfig())  # the proxy below needs the upstream's port
        port = h.upstream.getsockname()[1]
        h.ctx.config = _config(VIA.format(port=port))
        try:
            await scenario(h)
        finally:
            h.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


def test_via_relays_what_the_proxy_sent_with_its_answer_and_then_both_ways() -> None:
    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        conn = await _accepted(h)
        success = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\x38"
        request = await _fake_socks5(conn, success + b"220 banner\r\n")
        port = h.upstream.getsockname()[1]
        assert request == b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big")
        assert await _recv_all(h.client, 12) == b"220 banner\r\n"  # the tunnel's first bytes
        h.client.send(b"HELO x\r\n")
        assert await _recv_all(conn, 8) == b"HELO x\r\n"
        conn.close()
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        close = h.events()[-1]
        assert (close["action"], close["rule"], close["reason"]) == ("via", "out", "closed")
        assert close["upstream"] == f"127.0.0.1:{port}"
        assert (close["bytes_down"], close["bytes_up"]) == (12, 8)

    _via_run(scenario)


@pytest.mark.parametrize(
    ("reply", "reason", "detail"),
    [
        (b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00", "upstream_proxy_refused", "refused"),
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", "upstream_proxy_failed", "SOCKS5"),
        (b"", "upstream_proxy_failed", "closed the connection"),
    ],
)
def test_a_proxy_that_refuses_or_talks_nonsense_resets_the_client(
    reply: bytes, reason: str, detail: str
) -> None:
    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        conn = await _accepted(h)
        if reply:
            await _fake_socks5(conn, reply)
        else:
            await _recv_all(conn, 3)
            conn.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        h.client.settimeout(5)
        with pytest.raises(ConnectionResetError):
            h.client.recv(1)
        events = h.events()
        assert events[-1]["reason"] == reason
        failed = next(e for e in events if e["event"] == "upstream_failed")
        assert detail in failed["detail"] and "127.0.0.1:" in failed["detail"], failed
        conn.close()

    _via_run(scenario)


def test_a_proxy_that_never_answers_is_cut_at_the_connect_deadline() -> None:
    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        conn = await _accepted(h)
        await _until(lambda: _phase(h.session) is Phase.HANDSHAKING)
        h.session.sweep(h.session.connect_deadline_at + 0.001)
        assert _phase(h.session) is Phase.CLOSED
        assert h.events()[-1]["reason"] == "upstream_proxy_failed"
        conn.close()

    _via_run(scenario)


def test_first_bytes_already_there_are_read_at_once_without_a_wait() -> None:
    async def scenario(h: PolicyHarness) -> None:
        h.client.send(ALLOWED_REQUEST)
        await asyncio.sleep(0.02)  # in the accepted socket's buffer before start()
        h.session.start()
        assert h.session.phase in (Phase.CONNECTING, Phase.RELAYING)
        assert len(h.ctx.sniff_deadlines) == 0, "waited although the bytes were there"
        conn = await _accepted(h)
        assert await _recv_all(conn, len(ALLOWED_REQUEST)) == ALLOWED_REQUEST
        conn.close()
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        assert h.events()[-1]["http_host"] == "www.example.test"

    _run(scenario, SNIFFING)


def test_a_client_that_waited_and_sends_more_while_connecting_is_not_spun_on() -> None:
    async def scenario(h: PolicyHarness) -> None:
        # An upstream whose accept queue is full: the session's SYN is dropped, and it stays
        # CONNECTING until the kernel sends it again (a second later).
        h.upstream.listen(0)
        filler = socket.create_connection(h.upstream.getsockname())
        h.session.start()
        assert h.session.phase is Phase.SNIFFING
        assert h.ctx.poller.watched == 1  # the client, for reading
        await asyncio.sleep(0.02)
        h.client.send(ALLOWED_REQUEST)
        await _until(lambda: _phase(h.session) is Phase.CONNECTING)
        # The client's socket stayed registered (the relay takes it over), beside the upstream's.
        assert h.ctx.poller.watched == 2
        h.client.send(b"more")  # readable while connecting: taken out, not called again and again
        await _until(lambda: h.ctx.poller.watched == 1)
        await asyncio.sleep(0.05)
        assert _phase(h.session) is Phase.CONNECTING
        h.upstream.accept()[0].close()
        filler.close()
        conn = await _accepted(h)
        assert await _recv_all(conn, len(ALLOWED_REQUEST) + 4) == ALLOWED_REQUEST + b"more"
        conn.close()
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)

    _run(scenario, SNIFFING)
