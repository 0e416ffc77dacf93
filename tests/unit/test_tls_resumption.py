"""Resuming our TLS sessions with upstreams (`tls.resumption`): the store (bounded, expired by
each session's own lifetime, forgotten on failure) and, through the TLS relay on loopback with
Python `ssl` peers, a second intercepted connection to the same upstream resumes its session
(TLS 1.2 and 1.3) and still forges the right certificate; an upstream that declines gets a full
handshake; a session is never offered to another name, address, port, verify flag or ALPN
list."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import pytest

from tests.unit.test_tls_legs import (
    PKI,
    UPSTREAM_IP,
    UPSTREAM_NAME,
    _client_context,
    server_context,
)
from tests.unit.test_tls_relay import (
    REQUEST,
    _close_cleanly,
    _run,
    intercepting,
    make_interception,
    make_pki,
)
from tproxy.engine.tls_relay import Interception, _resume_key
from tproxy.tls.resumption import UpstreamSessions


@dataclass
class FakeSession:
    time: int
    timeout: int


def test_the_store_is_bounded_and_expires_sessions_by_their_own_lifetime() -> None:
    now = [1000.0]
    store: UpstreamSessions[FakeSession] = UpstreamSessions(capacity=2, clock=lambda: now[0])
    keys = [(f"n{i}.example", "192.0.2.1", 443, True, ()) for i in range(3)]
    for key in keys:
        store.put(key, FakeSession(time=1000, timeout=300))
    assert store.get(keys[0]) is None and len(store) == 2  # the oldest went
    assert store.get(keys[2]) is not None
    now[0] = 1300.0
    assert store.get(keys[2]) is None  # expired
    store.forget(keys[1])
    assert len(store) == 0


def test_the_key_holds_everything_the_session_was_made_under() -> None:
    base = _resume_key("www.example.test", "192.0.2.1", "192.0.2.1:443", True, ("h2",))
    assert base == ("www.example.test", "192.0.2.1", 443, True, ("h2",))
    others = [
        _resume_key("other.example.test", "192.0.2.1", "192.0.2.1:443", True, ("h2",)),
        _resume_key("www.example.test", "192.0.2.2", "192.0.2.2:443", True, ("h2",)),
        _resume_key("www.example.test", "192.0.2.1", "192.0.2.1:8443", True, ("h2",)),
        _resume_key("www.example.test", "192.0.2.1", "192.0.2.1:443", False, ("h2",)),
        _resume_key("www.example.test", "192.0.2.1", "192.0.2.1:443", True, ()),
    ]
    assert base not in others and len(set(others)) == len(others)
    assert _resume_key(None, "192.0.2.1", "192.0.2.1:443", True, ()) == (
        "192.0.2.1", "192.0.2.1", 443, True, (),
    )  # fmt: skip
    assert _resume_key("bad name!", "192.0.2.1", "192.0.2.1:443", True, ()) is None


OUR_CA = "tproxy interception CA (tproxy-test, created"  # the issuer shown starts so


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory)


def _one_session(
    pki: PKI, interception: Interception, server: ssl.SSLContext
) -> tuple[bool, str | None]:
    """One intercepted request through a relay: (the upstream leg resumed, the issuer the
    client was shown)."""
    result: list[tuple[bool, str | None]] = []

    async def scenario() -> None:
        async with intercepting(interception, _client_context(pki.ours), server) as run:
            await run.handshakes()
            await run.client.send(REQUEST)
            assert await run.upstream.read_exactly(len(REQUEST)) == REQUEST
            await _close_cleanly(run)
            upstream = run.relay.outcome.upstream
            assert upstream is not None
            shown = run.client.obj.getpeercert()
            assert shown is not None
            issuer = str(dict(x[0] for x in shown["issuer"]).get("commonName"))  # type: ignore[misc]
            names = [v for k, v in shown["subjectAltName"] if k == "DNS"]  # type: ignore[str-unpack]
            assert names == [UPSTREAM_NAME]  # forged for the name, from the upstream's certificate
            result.append((upstream.resumed, OUR_CA if issuer.startswith(OUR_CA) else issuer))

    _run(scenario)
    return result[0]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_second_connection_to_the_same_upstream_resumes_and_forges_as_before(
    pki: PKI, version: ssl.TLSVersion
) -> None:
    interception = make_interception(pki)  # a store of its own
    server = server_context(pki.upstream_pem, version=version)
    first = _one_session(pki, interception, server)
    assert first == (False, OUR_CA)
    assert len(interception.upstreams.sessions) == 1
    second = _one_session(pki, interception, server)
    assert second == (True, OUR_CA)
    assert interception.upstreams.sessions.offered == 1


def test_an_upstream_that_declines_the_session_gets_a_full_handshake(pki: PKI) -> None:
    interception = make_interception(pki)
    _one_session(pki, interception, server_context(pki.upstream_pem))
    # Another server context: other ticket keys, so the offered session is declined.
    resumed, issuer = _one_session(pki, interception, server_context(pki.upstream_pem))
    assert (resumed, issuer) == (False, OUR_CA)
    assert interception.upstreams.sessions.offered == 1


def test_the_destination_ip_is_the_name_without_sni() -> None:
    key = _resume_key(None, str(UPSTREAM_IP), f"{UPSTREAM_IP}:443", True, ())
    assert key is not None and key[0] == str(UPSTREAM_IP)
