"""The TLS legs of an intercepted session, driven against each other and against Python's own
TLS peers over memory BIOs (no sockets): handshakes, ALPN and SNI end to end, verification,
client certificates, a client that refuses our CA, close_notify, garbage; and the contexts they
are made from."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import selectors
import socket
import ssl
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tproxy.core.options import ConfigError
from tproxy.sniffers.facts import TlsHello
from tproxy.sniffers.tls import sniff_tls
from tproxy.tls.ca import CA, build_ca
from tproxy.tls.contexts import (
    DEFAULT_UPSTREAM_CONTEXTS,
    LeafContexts,
    UpstreamContexts,
    load_pem_chain,
    open_keylog,
    usable_alpn,
)
from tproxy.tls.forge import ForgedLeaf, LeafForger, read_upstream_cert
from tproxy.tls.legs import (
    ClientLeg,
    LegState,
    ObservedSSLObject,
    TLSFailure,
    TLSLeg,
    UpstreamLeg,
    alert_of,
    bounded,
    client_rejected_certificate,
    open_client_leg,
    open_upstream_leg,
)
from tproxy.tls.names import UpstreamCertFacts
from tproxy.tls.passthrough import reason_to_remember

NOW = datetime.now(UTC)
UPSTREAM_NAME = "upstream.example"
UPSTREAM_IP = ipaddress.IPv4Address("192.0.2.10")


# --- certificates --------------------------------------------------------------------------


def _ca(host: str) -> CA:
    cert, key = build_ca(NOW, host)
    return CA(cert, key, Path("/nonexistent"))


@dataclass
class PKI:
    ours: CA  # the interception CA
    upstream_ca: CA  # the CA the real upstream's certificate comes from
    upstream_ca_file: Path
    upstream_pem: bytes  # key and chain: UPSTREAM_NAME and UPSTREAM_IP, by upstream_ca
    self_signed_pem: bytes
    forger: LeafForger

    @property
    def upstream_server(self) -> ssl.SSLContext:
        return server_context(self.upstream_pem)


def server_context(
    key_and_chain_pem: bytes,
    alpn: list[str] | None = None,
    *,
    client_cert: bool = False,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A real upstream's context."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_pem_chain(context, key_and_chain_pem)
    if alpn:
        context.set_alpn_protocols(alpn)
    if client_cert:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cadata=_ca("client-ca").cert_pem.decode())
    if version is not None:
        context.maximum_version = version
    return context


def _self_signed_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, UPSTREAM_NAME)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(UPSTREAM_NAME)]), False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem + cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    ours, upstream_ca = _ca("tproxy-test"), _ca("upstream-test")
    folder = tmp_path_factory.mktemp("upstream-ca")
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(upstream_ca.cert_pem)
    # The upstream's own certificate, made with the forger of its own CA (same shape).
    upstream_forger = LeafForger(upstream_ca)
    facts = UpstreamCertFacts(dns_names=(UPSTREAM_NAME,), ip_addresses=(UPSTREAM_IP,))
    leaf = upstream_forger.leaf_for(None, facts, NOW)  # without SNI: all of them
    assert isinstance(leaf, ForgedLeaf)
    return PKI(
        ours,
        upstream_ca,
        ca_file,
        upstream_forger.leaf_key_pem + leaf.chain_pem,
        _self_signed_pem(),
        LeafForger(ours),
    )


@pytest.fixture(scope="module")
def upstreams(pki: PKI) -> UpstreamContexts:
    return UpstreamContexts(str(pki.upstream_ca_file))


@pytest.fixture(scope="module")
def leaves(pki: PKI) -> LeafContexts:
    return LeafContexts(pki.forger.leaf_key_pem)


def _client_context(trust: CA | None, alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if trust is not None:
        context.load_verify_locations(cadata=trust.cert_pem.decode())
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


# --- Python's own TLS peers over memory BIOs -----------------------------------------------


class Peer:
    """A Python `SSLObject` with its BIOs: the real client or the real upstream."""

    def __init__(self, context: ssl.SSLContext, server_side: bool, name: str | None = None):
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = context.wrap_bio(
            self.incoming, self.outgoing, server_side=server_side, server_hostname=name
        )
        self.done = False
        self.error: ssl.SSLError | None = None
        self.received = b""
        self.closed = False

    def step(self) -> None:
        if self.error is not None:
            return
        try:
            if not self.done:
                self.obj.do_handshake()
                self.done = True
            while True:
                chunk = self.obj.read(1 << 16)
                if not chunk:
                    self.closed = True
                    break
                self.received += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.closed = True
        except ssl.SSLError as exc:
            self.error = exc

    def out(self) -> bytes:
        return self.outgoing.read()


def drive(leg: TLSLeg, peer: Peer, rounds: int = 12) -> bytes:
    """Move bytes both ways until nothing moves; return the plaintext the leg received."""
    received = b""
    for _ in range(rounds):
        peer.step()
        to_leg = peer.out()
        if to_leg:
            received += leg.receive(to_leg)
        to_peer = leg.data_to_send()
        if to_peer:
            peer.incoming.write(to_peer)
        if not to_leg and not to_peer:
            peer.step()
            if not peer.outgoing.pending:
                break
    return received


def _upstream_leg(
    upstreams: UpstreamContexts,
    server: ssl.SSLContext,
    sni: str | None,
    *,
    alpn: tuple[str, ...] = (),
    verify: bool = True,
    destination: str = str(UPSTREAM_IP),
) -> tuple[UpstreamLeg, Peer]:
    leg = open_upstream_leg(
        upstreams.get(verify, alpn), sni, destination, established_context=upstreams.established
    )
    assert isinstance(leg, UpstreamLeg), leg
    peer = Peer(server, server_side=True)
    drive(leg, peer)
    return leg, peer


@dataclass
class Intercepted:
    client: Peer
    client_leg: ClientLeg
    upstream_leg: UpstreamLeg
    upstream: Peer
    hello: TlsHello


def intercept(
    pki: PKI,
    upstreams: UpstreamContexts,
    leaves: LeafContexts,
    client_context: ssl.SSLContext,
    server_context: ssl.SSLContext,
    *,
    sni: str | None = UPSTREAM_NAME,
) -> Intercepted:
    """What the engine will do: sniff the client's hello, handshake with the upstream, forge,
    then handshake with the client from the held hello."""
    client = Peer(client_context, server_side=False, name=sni)
    client.step()
    held = client.out()
    hello = sniff_tls(held)
    assert isinstance(hello, TlsHello)
    upstream_leg, upstream = _upstream_leg(
        upstreams, server_context, hello.sni, alpn=usable_alpn(hello.alpn)
    )
    assert upstream_leg.state is LegState.ESTABLISHED, upstream_leg.failure
    assert upstream_leg.info is not None and upstream_leg.info.peer_cert_der is not None
    facts = read_upstream_cert(upstream_leg.info.peer_cert_der)
    assert isinstance(facts, UpstreamCertFacts)
    leaf = pki.forger.leaf_for(hello.sni, facts, NOW, UPSTREAM_IP)
    assert isinstance(leaf, ForgedLeaf), leaf
    client_leg = open_client_leg(
        leaves.get(leaf, upstream_leg.info.alpn), established_context=leaves.established
    )
    client_leg.receive(held)
    client.incoming.write(client_leg.data_to_send())
    drive(client_leg, client)
    return Intercepted(client, client_leg, upstream_leg, upstream, hello)


# --- end to end ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_alpn", "server_alpn", "expected"),
    [
        (["h2", "http/1.1"], ["h2", "http/1.1"], "h2"),
        (["h2", "http/1.1"], ["http/1.1"], "http/1.1"),
        (["http/1.1"], ["h2", "http/1.1"], "http/1.1"),
        (None, ["h2", "http/1.1"], None),
        (["h2", "http/1.1"], None, None),
    ],
)
def test_interception_end_to_end_with_the_alpn_the_upstream_chose(  # noqa: PLR0917 (pytest gives them)
    pki: PKI,
    upstreams: UpstreamContexts,
    leaves: LeafContexts,
    client_alpn: list[str] | None,
    server_alpn: list[str] | None,
    expected: str | None,
) -> None:
    server = server_context(pki.upstream_pem, server_alpn)
    seen_sni: list[str | None] = []
    server.sni_callback = lambda obj, name, ctx: seen_sni.append(name)
    run = intercept(pki, upstreams, leaves, _client_context(pki.ours, client_alpn), server)
    assert run.client.error is None and run.client.done
    assert run.client_leg.state is LegState.ESTABLISHED
    assert seen_sni == [UPSTREAM_NAME]
    assert run.upstream.obj.selected_alpn_protocol() == expected
    assert run.upstream_leg.info is not None and run.upstream_leg.info.alpn == expected
    assert run.client.obj.selected_alpn_protocol() == expected
    assert run.client_leg.info is not None and run.client_leg.info.alpn == expected
    # The client sees our leaf, issued by our CA, for the name it asked.
    shown = x509.load_der_x509_certificate(run.client.obj.getpeercert(binary_form=True) or b"")
    assert shown.issuer == pki.ours.cert.subject
    san = shown.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert UPSTREAM_NAME in san.get_values_for_type(x509.DNSName)
    # Plaintext both ways through the two legs.
    run.client.obj.write(b"GET / HTTP/1.1\r\n\r\n")
    request = run.client_leg.receive(run.client.out())
    assert request == b"GET / HTTP/1.1\r\n\r\n"
    run.upstream_leg.send(request)
    run.upstream.incoming.write(run.upstream_leg.data_to_send())
    run.upstream.step()
    assert run.upstream.received == request
    run.upstream.obj.write(b"HTTP/1.1 200 OK\r\n\r\n")
    response = run.upstream_leg.receive(run.upstream.out())
    run.client_leg.send(response)
    run.client.incoming.write(run.client_leg.data_to_send())
    run.client.step()
    assert run.client.received == b"HTTP/1.1 200 OK\r\n\r\n"


def test_what_both_legs_negotiated_is_told(
    pki: PKI, upstreams: UpstreamContexts, leaves: LeafContexts
) -> None:
    run = intercept(pki, upstreams, leaves, _client_context(pki.ours), pki.upstream_server)
    up, down = run.upstream_leg.info, run.client_leg.info
    assert up is not None and down is not None
    assert (up.version, down.version) == ("TLSv1.3", "TLSv1.3")
    assert up.cipher.startswith("TLS_") and down.cipher.startswith("TLS_")
    assert up.verified and not down.verified
    assert up.peer_subject == f"O=tproxy,CN={UPSTREAM_NAME}"
    assert up.peer_issuer is not None and "upstream-test" in up.peer_issuer
    assert down.peer_cert_der is None and down.peer_subject is None


def test_the_upstream_may_speak_first_while_the_client_still_handshakes(
    pki: PKI, upstreams: UpstreamContexts, leaves: LeafContexts
) -> None:
    client = Peer(_client_context(pki.ours), server_side=False, name=UPSTREAM_NAME)
    client.step()
    held = client.out()
    up, upstream = _upstream_leg(upstreams, pki.upstream_server, UPSTREAM_NAME)
    upstream.obj.write(b"* OK IMAP4rev1 ready\r\n")
    banner = up.receive(upstream.out())
    assert banner == b"* OK IMAP4rev1 ready\r\n"
    assert up.info is not None
    leaf = pki.forger.leaf_for(UPSTREAM_NAME, None, NOW)
    assert isinstance(leaf, ForgedLeaf)
    down = open_client_leg(leaves.get(leaf, None), established_context=leaves.established)
    down.send(banner)  # before its handshake: kept
    assert not down.handshake_done and not down.data_to_send()
    down.receive(held)
    client.incoming.write(down.data_to_send())
    drive(down, client)
    assert down.state is LegState.ESTABLISHED
    assert client.received == b"* OK IMAP4rev1 ready\r\n"


# --- verifying the upstream ----------------------------------------------------------------


def test_a_self_signed_upstream_fails_with_the_verification_error(
    pki: PKI, upstreams: UpstreamContexts
) -> None:
    leg, _ = _upstream_leg(upstreams, server_context(pki.self_signed_pem), UPSTREAM_NAME)
    assert leg.state is LegState.FAILED
    assert leg.failure is not None
    assert leg.failure.reason == "upstream_cert_invalid"
    assert "self-signed certificate" in leg.failure.detail
    assert "verify code 18" in leg.failure.detail
    assert leg.failure.in_handshake
    assert leg.receive(b"more") == b""  # a failed leg ignores what comes after


def test_upstream_verify_false_accepts_it_and_says_so(
    pki: PKI, upstreams: UpstreamContexts
) -> None:
    leg, _ = _upstream_leg(
        upstreams, server_context(pki.self_signed_pem), UPSTREAM_NAME, verify=False
    )
    assert leg.state is LegState.ESTABLISHED
    assert leg.info is not None and not leg.info.verified
    assert leg.info.peer_subject == f"CN={UPSTREAM_NAME}"


def test_a_certificate_for_another_name_fails_naming_the_sni_escaped(
    pki: PKI, upstreams: UpstreamContexts
) -> None:
    leg, _ = _upstream_leg(upstreams, pki.upstream_server, "other.example")
    assert leg.failure is not None
    assert leg.failure.reason == "upstream_cert_invalid"
    assert "Hostname mismatch" in leg.failure.detail
    assert "other.example" in leg.failure.detail


def test_without_sni_the_destination_ip_is_verified(pki: PKI, upstreams: UpstreamContexts) -> None:
    leg, peer = _upstream_leg(upstreams, pki.upstream_server, None)
    assert leg.state is LegState.ESTABLISHED, leg.failure
    assert peer.obj.server_hostname is None  # no SNI went out for an IP address
    mapped, _ = _upstream_leg(
        upstreams, pki.upstream_server, None, destination=f"::ffff:{UPSTREAM_IP}"
    )
    assert mapped.state is LegState.ESTABLISHED, mapped.failure
    other, _ = _upstream_leg(upstreams, pki.upstream_server, None, destination="192.0.2.99")
    assert other.failure is not None and other.failure.reason == "upstream_cert_invalid"
    assert "192.0.2.99" in other.failure.detail


@pytest.mark.parametrize("sni", ["*.example", "a..example", "caf\\xc3\\xa9.example", "x" * 300])
def test_an_sni_that_is_not_a_host_name_is_not_sent_on(
    upstreams: UpstreamContexts, sni: str
) -> None:
    leg = open_upstream_leg(upstreams.get(True, ()), sni, str(UPSTREAM_IP))
    assert isinstance(leg, TLSFailure)
    assert leg.reason == "upstream_tls_failed"
    assert len(leg.detail) <= 200 and leg.detail.isascii()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_an_upstream_asking_for_a_client_certificate_is_recognized(
    pki: PKI, upstreams: UpstreamContexts, version: ssl.TLSVersion
) -> None:
    server = server_context(pki.upstream_pem, client_cert=True, version=version)
    leg, _ = _upstream_leg(upstreams, server, UPSTREAM_NAME)
    assert leg.state is LegState.FAILED
    assert leg.failure is not None
    assert leg.failure.reason == "upstream_wants_client_cert"
    # TLS 1.3 asks before its Certificate and is believed once the handshake is done; TLS 1.2
    # asks after its Certificate and signed ServerKeyExchange, and refuses during it.
    tls12 = version is ssl.TLSVersion.TLSv1_2
    assert (leg.failure.alert == "handshake_failure") is tls12
    assert isinstance(leg._obj, ObservedSSLObject)
    assert leg._obj.certificate_received and leg._obj.certificate_requested
    assert leg._obj.requested_after_certificate is tls12


@pytest.mark.parametrize("record_version", [b"\x03\x03", b"\x03\x01"], ids=["1.2", "1.0"])
def test_alert_certificate_required_before_anything_is_authenticated_fails_closed(
    upstreams: UpstreamContexts, record_version: bytes
) -> None:
    """Anyone can answer our ClientHello with a bare alert 116: it proves nothing, and believing
    it would pass the name through for every client (review rv3, finding 1)."""
    leg = open_upstream_leg(upstreams.get(True, ()), "www.bank.example", "203.0.113.9")
    assert isinstance(leg, UpstreamLeg)
    assert leg.data_to_send()
    leg.receive(b"\x15" + record_version + b"\x00\x02\x02\x74")  # fatal certificate_required
    assert leg.failure is not None
    assert leg.failure.alert == "certificate_required"
    assert leg.failure.reason == "upstream_tls_failed"
    assert reason_to_remember(leg.failure, "upstream", on_client_reject=False) is None


def _records(flight: bytes) -> list[bytes]:
    records = []
    while flight:
        size = 5 + int.from_bytes(flight[3:5], "big")
        records.append(flight[:size])
        flight = flight[size:]
    return records


def test_a_certificate_request_then_eof_before_the_certificate_fails_closed(
    pki: PKI, upstreams: UpstreamContexts
) -> None:
    """TLS 1.3: a CertificateRequest comes before the upstream's Certificate; an upstream that
    stops after it authenticated nothing (review rv3, finding 1)."""
    leg = open_upstream_leg(upstreams.get(True, ()), UPSTREAM_NAME, str(UPSTREAM_IP))
    assert isinstance(leg, UpstreamLeg)
    server = Peer(server_context(pki.upstream_pem, client_cert=True), server_side=True)
    server.incoming.write(leg.data_to_send())
    server.step()
    # ServerHello, ChangeCipherSpec, EncryptedExtensions, CertificateRequest (then Certificate,
    # CertificateVerify, Finished: not delivered).
    records = _records(server.out())
    assert len(records) == 7
    leg.receive(b"".join(records[:4]))
    assert leg.state is LegState.HANDSHAKING
    assert isinstance(leg._obj, ObservedSSLObject) and leg._obj.certificate_requested
    leg.receive_eof()
    assert leg.failure is not None and leg.failure.peer_eof
    assert leg.failure.reason == "upstream_tls_failed"


def _rsa_upstream_pem(pki: PKI) -> bytes:
    forger = LeafForger(pki.upstream_ca, leaf_key=rsa.generate_private_key(65537, 2048))
    facts = UpstreamCertFacts(dns_names=(UPSTREAM_NAME,))
    leaf = forger.leaf_for(UPSTREAM_NAME, facts, NOW)
    assert isinstance(leaf, ForgedLeaf)
    return forger.leaf_key_pem + leaf.chain_pem


def test_an_upstream_with_rsa_key_exchange_only_fails_even_when_it_asks_for_a_certificate(
    pki: PKI, upstreams: UpstreamContexts
) -> None:
    """Without a signed ServerKeyExchange, a TLS 1.2 CertificateRequest after a (replayed)
    Certificate proves nothing: such upstreams are not offered TLS 1.2 suites at all."""
    server = server_context(
        _rsa_upstream_pem(pki), client_cert=True, version=ssl.TLSVersion.TLSv1_2
    )
    server.set_ciphers("AES128-GCM-SHA256:AES256-GCM-SHA384")  # RSA key exchange
    leg, _ = _upstream_leg(upstreams, server, UPSTREAM_NAME)
    assert leg.failure is not None
    assert leg.failure.reason == "upstream_tls_failed"
    assert leg.failure.in_handshake
    assert isinstance(leg._obj, ObservedSSLObject) and not leg._obj.certificate_requested
    for context in (upstreams.get(True, ()), upstreams.get(False, ()), upstreams.established):
        tls12 = [c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12 and all(name.startswith("ECDHE-") for name in tls12)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_an_unverified_upstream_asking_for_a_certificate_is_not_believed(
    pki: PKI, upstreams: UpstreamContexts, version: ssl.TLSVersion
) -> None:
    """With `upstream_verify = false` the upstream proved nothing: the session fails, and the
    name is not passed through for everyone."""
    server = server_context(pki.self_signed_pem, client_cert=True, version=version)
    leg, _ = _upstream_leg(upstreams, server, UPSTREAM_NAME, verify=False)
    assert leg.failure is not None
    assert leg.failure.reason == "upstream_tls_failed"


def test_alert_certificate_required_alone_is_recognized(pki: PKI) -> None:
    """Without the handshake observer (a Python without the private API), TLS 1.3's alert 116
    after our handshake still names the reason."""
    context = UpstreamContexts(str(pki.upstream_ca_file))
    plain = context.get(True, ())
    plain._msg_callback = None  # type: ignore[attr-defined]
    leg = open_upstream_leg(plain, UPSTREAM_NAME, str(UPSTREAM_IP))
    assert isinstance(leg, UpstreamLeg)
    peer = Peer(server_context(pki.upstream_pem, client_cert=True), server_side=True)
    drive(leg, peer)
    assert leg.failure is not None
    assert leg.failure.reason == "upstream_wants_client_cert"
    assert leg.failure.alert == "certificate_required"
    assert not leg.failure.in_handshake


# --- a client that refuses our certificate -------------------------------------------------


def test_a_client_without_our_ca_is_classified_as_rejecting_it(
    pki: PKI, upstreams: UpstreamContexts, leaves: LeafContexts
) -> None:
    run = intercept(pki, upstreams, leaves, _client_context(None), pki.upstream_server)
    assert run.client.error is not None  # the client's own view: verify failed
    assert run.client_leg.state is LegState.FAILED
    failure = run.client_leg.failure
    assert failure is not None
    assert (failure.reason, failure.alert) == ("client_tls_failed", "unknown_ca")
    assert failure.certificate_sent
    assert client_rejected_certificate(failure) == "the client sent alert unknown_ca"


def test_a_client_that_hangs_up_after_our_certificate_rejects_it(
    pki: PKI, leaves: LeafContexts
) -> None:
    client = Peer(_client_context(pki.ours), server_side=False, name=UPSTREAM_NAME)
    client.step()
    leaf = pki.forger.leaf_for(UPSTREAM_NAME, None, NOW)
    assert isinstance(leaf, ForgedLeaf)
    leg = open_client_leg(leaves.get(leaf, None))
    leg.receive(client.out())
    assert leg.data_to_send()  # ServerHello .. Certificate .. Finished
    leg.receive_eof()
    assert leg.failure is not None and leg.failure.peer_eof and leg.failure.certificate_sent
    assert client_rejected_certificate(leg.failure) == (
        "the client closed the connection after our certificate"
    )


def test_a_client_that_hangs_up_before_our_certificate_rejects_nothing(
    pki: PKI, leaves: LeafContexts
) -> None:
    client = Peer(_client_context(pki.ours), server_side=False, name=UPSTREAM_NAME)
    client.step()
    hello = client.out()
    leaf = pki.forger.leaf_for(UPSTREAM_NAME, None, NOW)
    assert isinstance(leaf, ForgedLeaf)
    leg = open_client_leg(leaves.get(leaf, None))
    leg.receive(hello[:40])  # a hello cut short
    leg.receive_eof()
    assert leg.failure is not None and leg.failure.peer_eof
    assert not leg.failure.certificate_sent
    assert client_rejected_certificate(leg.failure) is None


@pytest.mark.parametrize(
    ("failure", "rejected"),
    [
        (TLSFailure("client_tls_failed", "", alert="bad_certificate"), True),
        (TLSFailure("client_tls_failed", "", alert="certificate_unknown"), True),
        (TLSFailure("client_tls_failed", "", alert="unknown_ca"), True),
        (TLSFailure("client_tls_failed", "", alert="handshake_failure"), False),
        (TLSFailure("client_tls_failed", "", alert="protocol_version"), False),
        (TLSFailure("client_tls_failed", "", peer_eof=True, certificate_sent=True), True),
        (TLSFailure("client_tls_failed", "", peer_eof=True), False),
        (TLSFailure("client_tls_failed", "", in_handshake=False, peer_eof=True,
                    certificate_sent=True), False),
        (TLSFailure("upstream_tls_failed", "", alert="unknown_ca"), False),
    ],
)  # fmt: skip
def test_the_rejection_classifier(failure: TLSFailure, rejected: bool) -> None:
    assert (client_rejected_certificate(failure) is not None) is rejected


def test_alert_names_come_from_openssl_reasons() -> None:
    def error(reason: str) -> ssl.SSLError:
        exc = ssl.SSLError(1, "x")
        exc.reason = reason
        return exc

    assert alert_of(error("TLSV1_ALERT_UNKNOWN_CA")) == "unknown_ca"
    assert alert_of(error("SSLV3_ALERT_BAD_CERTIFICATE")) == "bad_certificate"
    assert alert_of(error("TLSV13_ALERT_CERTIFICATE_REQUIRED")) == "certificate_required"
    assert alert_of(error("CERTIFICATE_VERIFY_FAILED")) is None
    assert alert_of(ValueError("x")) is None


# --- closing -------------------------------------------------------------------------------


def test_close_notify_both_ways(pki: PKI, upstreams: UpstreamContexts) -> None:
    leg, peer = _upstream_leg(upstreams, pki.upstream_server, UPSTREAM_NAME)
    leg.close()
    assert leg.sent_close
    peer.incoming.write(leg.data_to_send())
    peer.step()
    assert peer.closed  # our close_notify arrived
    # Half-closed: the peer may still send until its own close_notify.
    peer.obj.write(b"last words")
    assert leg.receive(peer.out()) == b"last words"
    with contextlib.suppress(ssl.SSLError):  # waits for our close_notify: it came already
        peer.obj.unwrap()
    assert leg.receive(peer.out()) == b""
    assert leg.peer_closed and not leg.truncated
    assert leg.state is LegState.CLOSED
    leg.close()  # idempotent
    assert leg.data_to_send() == b""


def test_eof_without_close_notify_ends_the_stream_truncated(
    pki: PKI, upstreams: UpstreamContexts
) -> None:
    leg, peer = _upstream_leg(upstreams, pki.upstream_server, UPSTREAM_NAME)
    peer.obj.write(b"body")
    leg.receive(peer.out())
    leg.receive_eof()
    assert leg.peer_closed and leg.truncated and leg.failure is None
    assert leg.state is LegState.CLOSED


def test_eof_during_the_handshake_fails_the_leg(upstreams: UpstreamContexts) -> None:
    leg = open_upstream_leg(upstreams.get(True, ()), UPSTREAM_NAME, str(UPSTREAM_IP))
    assert isinstance(leg, UpstreamLeg)
    assert leg.data_to_send()[:1] == b"\x16"  # our ClientHello
    leg.receive_eof()
    assert leg.failure is not None
    assert (leg.failure.reason, leg.failure.peer_eof) == ("upstream_tls_failed", True)


# --- garbage -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00",
        b"\x16\x03\x01\xff\xff" + b"\x00" * 100,
        b"\x15\x03\x03\x00\x02\x02\x28",  # an alert
        bytes(range(256)),
    ],
)
def test_garbage_fails_a_leg_cleanly(
    pki: PKI, upstreams: UpstreamContexts, leaves: LeafContexts, data: bytes
) -> None:
    leaf = pki.forger.leaf_for(UPSTREAM_NAME, None, NOW)
    assert isinstance(leaf, ForgedLeaf)
    down = open_client_leg(leaves.get(leaf, None))
    up = open_upstream_leg(upstreams.get(True, ()), UPSTREAM_NAME, str(UPSTREAM_IP))
    assert isinstance(up, UpstreamLeg)
    for leg in (down, up):
        assert leg.receive(data) == b""
        leg.receive_eof()
        assert leg.state is LegState.FAILED
        assert leg.failure is not None
        assert leg.failure.detail.isascii() and len(leg.failure.detail) <= 200
        leg.send(b"x")
        leg.close()


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(st.binary(max_size=300), max_size=6),
    eof=st.booleans(),
    prefix=st.booleans(),
)
def test_random_bytes_never_raise(  # noqa: PLR0917 (hypothesis gives them)
    pki: PKI,
    upstreams: UpstreamContexts,
    leaves: LeafContexts,
    chunks: list[bytes],
    eof: bool,
    prefix: bool,
) -> None:
    leaf = pki.forger.leaf_for(UPSTREAM_NAME, None, NOW)
    assert isinstance(leaf, ForgedLeaf)
    down = open_client_leg(leaves.get(leaf, None))
    up = open_upstream_leg(upstreams.get(True, ()), UPSTREAM_NAME, str(UPSTREAM_IP))
    assert isinstance(up, UpstreamLeg)
    if prefix:  # a real hello first, then noise
        client = Peer(_client_context(pki.ours), server_side=False, name=UPSTREAM_NAME)
        client.step()
        down.receive(client.out())
    for leg in (down, up):
        for chunk in chunks:
            leg.receive(chunk)
            leg.data_to_send()
        if eof:
            leg.receive_eof()
            assert leg.state in (LegState.FAILED, LegState.CLOSED)
        leg.close()
        leg.data_to_send()


def test_a_real_hello_cut_at_every_offset_never_raises(pki: PKI, leaves: LeafContexts) -> None:
    client = Peer(_client_context(pki.ours, ["h2"]), server_side=False, name=UPSTREAM_NAME)
    client.step()
    hello = client.out()
    leaf = pki.forger.leaf_for(UPSTREAM_NAME, None, NOW)
    assert isinstance(leaf, ForgedLeaf)
    context = leaves.get(leaf, None)
    for cut in range(0, len(hello), 7):
        leg = open_client_leg(context)
        leg.receive(hello[:cut])
        assert leg.failure is None
        leg.receive_eof()
        assert leg.state is LegState.FAILED


# --- contexts ------------------------------------------------------------------------------


def test_contexts_are_made_once_per_leaf_and_alpn(pki: PKI) -> None:
    contexts = LeafContexts(pki.forger.leaf_key_pem, capacity=2)
    a = pki.forger.leaf_for("a.example", None, NOW)
    b = pki.forger.leaf_for("b.example", None, NOW)
    assert isinstance(a, ForgedLeaf) and isinstance(b, ForgedLeaf)
    first = contexts.get(a, "h2")
    assert contexts.get(a, "h2") is first
    assert contexts.get(a, None) is not first
    assert contexts.made == 2
    assert contexts.get(a, "h2") is first  # now (a, None) is the least recently used
    contexts.get(b, None)  # and goes
    assert len(contexts) == 2
    assert contexts.get(a, "h2") is first
    contexts.get(a, None)
    assert contexts.made == 4


def test_upstream_contexts_per_verification_and_alpn(pki: PKI) -> None:
    contexts = UpstreamContexts(str(pki.upstream_ca_file))
    made = contexts.made  # one at construction: the bundle is checked at once
    h2 = contexts.get(True, ("h2", "http/1.1"))
    assert contexts.get(True, ("h2", "http/1.1")) is h2
    assert contexts.get(False, ("h2", "http/1.1")) is not h2
    assert contexts.made == made + 2
    assert h2.verify_mode == ssl.CERT_REQUIRED and h2.check_hostname
    for context in (h2, contexts.established):
        assert context.options & ssl.OP_NO_RENEGOTIATION
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_an_upstream_ca_file_that_holds_no_ca_fails_at_once(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificates here\n")
    with pytest.raises(ssl.SSLError):
        UpstreamContexts(str(empty))
    with pytest.raises(OSError):
        UpstreamContexts(str(tmp_path / "missing.pem"))


def test_the_system_store_is_the_default() -> None:
    contexts = UpstreamContexts()
    assert contexts.get(True, ()).cert_store_stats()["x509_ca"] > 0


@pytest.mark.parametrize(
    ("offered", "usable"),
    [
        (("h2", "http/1.1"), ("h2", "http/1.1")),
        (("http/1.1", "h2"), ("http/1.1", "h2")),  # the client's order
        (("h2", "h2", "x\\x00y", "", "caf\u00e9", "http/1.0"), ("h2", "http/1.0")),
        (("acme-tls/1",), ()),
        (("spdy/3.1", "H2", "http/1.1"), ("http/1.1",)),
        ((*(f"p{i}" for i in range(40)), "h2"), ("h2",)),
        (("a" * 256,), ()),
    ],
)
def test_usable_alpn(offered: tuple[str, ...], usable: tuple[str, ...]) -> None:
    assert usable_alpn(offered) == usable


def test_no_alpn_list_a_client_sends_makes_a_context_or_evicts_one(pki: PKI) -> None:
    """Each new list used to make a verifying context (the trust store loaded on the event
    loop) and push the common ones out (review rv3, finding 4): every list a client can send
    now maps to one of a few, all of which the cache holds."""
    contexts = UpstreamContexts(str(pki.upstream_ca_file))
    common = {
        verify: contexts.get(verify, usable_alpn(("h2", "http/1.1"))) for verify in (True, False)
    }
    made = contexts.made
    for i in range(100):
        contexts.get(True, usable_alpn((f"x{i}",)))
        contexts.get(True, usable_alpn((f"x{i}", "h2", f"y{i}", "http/1.1")))
    assert contexts.made == made  # () was made at construction, ("h2", "http/1.1") above
    protocols = ["h2", "http/1.1", "http/1.0"]
    every = {tuple(p) for n in range(4) for p in itertools.permutations([*protocols, "junk"], n)}
    for offered in every:
        for verify in (True, False):
            contexts.get(verify, usable_alpn(offered))
    assert contexts.made <= DEFAULT_UPSTREAM_CONTEXTS
    for verify in (True, False):
        assert contexts.get(verify, ("h2", "http/1.1")) is common[verify]


def test_bounded_escapes_and_cuts() -> None:
    assert bounded("caf\u00e9\n") == "caf\\xe9\\n"
    assert len(bounded("x" * 1000)) == 200


# --- cost ----------------------------------------------------------------------------------


def test_repeated_interceptions_reuse_their_contexts(
    pki: PKI, upstreams: UpstreamContexts, leaves: LeafContexts
) -> None:
    """A context made per session would cost about 0.6 ms more per leg (the legs' docstring
    has the costs): twenty interceptions of one name make one context each way."""
    client_context, server = _client_context(pki.ours), pki.upstream_server
    before = (upstreams.made, leaves.made)
    for _ in range(20):
        run = intercept(pki, upstreams, leaves, client_context, server)
        assert run.client_leg.state is LegState.ESTABLISHED
    made = (upstreams.made - before[0], leaves.made - before[1])
    assert made[0] <= 1 and made[1] <= 1, made


# --- real tools on loopback ----------------------------------------------------------------


def _accept_port(stream: IO[bytes]) -> int:
    for line in stream:
        match = re.match(rb"ACCEPT 127\.0\.0\.1:(\d+)", line)
        if match:
            return int(match[1])
    raise AssertionError("openssl s_server ended without saying which port it listens on")


def _proxy_one(
    listener: socket.socket,
    upstream_port: int,
    pki: PKI,
    upstreams: UpstreamContexts,
    leaves: LeafContexts,
) -> tuple[ClientLeg | None, UpstreamLeg]:
    """What the engine will do, with blocking sockets and one selector: accept one client,
    sniff its hello, handshake with the upstream, then with the client, relay until both legs
    are closed (or a deadline)."""
    deadline = time.monotonic() + 20
    client_sock, _ = listener.accept()
    with client_sock, socket.create_connection(("127.0.0.1", upstream_port)) as upstream_sock:
        held = b""
        hello = sniff_tls(held)
        while not isinstance(hello, TlsHello):
            chunk = client_sock.recv(65536)
            assert chunk, "the client left before its hello"
            held += chunk
            hello = sniff_tls(held)
        up = open_upstream_leg(
            upstreams.get(True, usable_alpn(hello.alpn)), hello.sni, "127.0.0.1",
            established_context=upstreams.established,
        )  # fmt: skip
        assert isinstance(up, UpstreamLeg), up
        upstream_sock.sendall(up.data_to_send())
        while up.state is LegState.HANDSHAKING and time.monotonic() < deadline:
            data = upstream_sock.recv(65536)
            up.receive(data) if data else up.receive_eof()
            with contextlib.suppress(OSError):  # an upstream that hung up after its alert
                upstream_sock.sendall(up.data_to_send())
        if up.info is None:
            return None, up
        facts = read_upstream_cert(up.info.peer_cert_der or b"")
        assert isinstance(facts, UpstreamCertFacts)
        leaf = pki.forger.leaf_for(hello.sni, facts, NOW)
        assert isinstance(leaf, ForgedLeaf)
        down = open_client_leg(
            leaves.get(leaf, up.info.alpn), established_context=leaves.established
        )
        plaintext = down.receive(held)
        legs = {client_sock: (down, up, upstream_sock), upstream_sock: (up, down, client_sock)}
        open_socks = {client_sock, upstream_sock}
        with selectors.DefaultSelector() as selector:
            for sock in open_socks:
                selector.register(sock, selectors.EVENT_READ)
            client_sock.sendall(down.data_to_send())
            while open_socks and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=0.5):
                    ready = key.fileobj
                    assert isinstance(ready, socket.socket)
                    sock = ready
                    leg, other, other_sock = legs[sock]
                    try:
                        data = sock.recv(65536)
                    except ConnectionResetError:
                        data = b""
                    plaintext = leg.receive(data) if data else leg.receive_eof()
                    other.send(plaintext)
                    if leg.peer_closed or leg.state is LegState.FAILED or not data:
                        other.close()
                        selector.unregister(sock)
                        open_socks.discard(sock)
                    for out_leg, out_sock in ((leg, sock), (other, other_sock)):
                        pending = out_leg.data_to_send()
                        if pending:
                            with contextlib.suppress(OSError):
                                out_sock.sendall(pending)
                    if other.sent_close:
                        with contextlib.suppress(OSError):
                            other_sock.shutdown(socket.SHUT_WR)
        return down, up


@pytest.fixture
def stdin_file(tmp_path: Path) -> Iterator[Callable[[bytes], IO[bytes]]]:
    """Files for a tool's stdin (s_client reads its input, then EOF), closed after the test."""
    opened: list[IO[bytes]] = []

    def make(data: bytes) -> IO[bytes]:
        path = tmp_path / f"stdin{len(opened)}"
        path.write_bytes(data)
        opened.append(path.open("rb"))
        return opened[-1]

    yield make
    for file in opened:
        file.close()


@pytest.fixture
def upstream_files(pki: PKI, tmp_path: Path) -> Path:
    path = tmp_path / "upstream.pem"
    path.write_bytes(pki.upstream_pem)
    return path


@pytest.fixture
def our_ca_file(pki: PKI, tmp_path: Path) -> Path:
    path = tmp_path / "ours.pem"
    path.write_bytes(pki.ours.cert_pem)
    return path


@pytest.mark.parametrize("version", ["-tls1_3", "-tls1_2"])
def test_openssl_s_client_through_both_legs_to_openssl_s_server(  # noqa: PLR0917 (pytest gives them)
    pki: PKI,
    upstreams: UpstreamContexts,
    leaves: LeafContexts,
    upstream_files: Path,
    our_ca_file: Path,
    stdin_file: Callable[[bytes], IO[bytes]],
    version: str,
) -> None:
    """Real TLS on loopback: s_client (trusting only our CA) -> the legs -> s_server (a
    certificate of the upstream CA), HTTP/1.0 through, ALPN http/1.1 chosen by the server."""
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", str(upstream_files),
         "-naccept", "1", "-www", "-alpn", "http/1.1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    listener = socket.create_server(("127.0.0.1", 0))
    client = None
    try:
        assert server.stdout is not None
        port = _accept_port(server.stdout)
        client = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{listener.getsockname()[1]}",
             "-servername", UPSTREAM_NAME, "-verify_hostname", UPSTREAM_NAME, "-CAfile",
             str(our_ca_file), "-verify_return_error", "-alpn", "h2,http/1.1", version,
             "-brief", "-ign_eof"],
            stdin=stdin_file(b"GET / HTTP/1.0\r\n\r\n"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        down, up = _proxy_one(listener, port, pki, upstreams, leaves)
        output = client.communicate(timeout=30)[0].decode()
        assert down is not None and down.info is not None and up.info is not None
        assert client.returncode == 0, output
        assert "Verification: OK" in output
        assert f"Verified peername: {UPSTREAM_NAME}" in output
        assert "HTTP/1.0 200 ok" in output  # s_server answered through both legs
        assert (up.info.alpn, down.info.alpn) == ("http/1.1", "http/1.1")
        assert up.info.version == "TLSv1.3"  # the upstream leg offers what it can
        assert down.info.version == ("TLSv1.3" if "3" in version else "TLSv1.2")
        assert up.info.verified
    finally:
        listener.close()
        for process in (server, client):
            if process is not None:
                process.kill()
                process.wait()
                if process.stdout is not None:
                    process.stdout.close()


def test_openssl_s_client_renegotiating_is_refused_and_ends_nothing_else(  # noqa: PLR0917
    pki: PKI,
    upstreams: UpstreamContexts,
    leaves: LeafContexts,
    upstream_files: Path,
    our_ca_file: Path,
    stdin_file: Callable[[bytes], IO[bytes]],
) -> None:
    """TLS 1.2 renegotiation from the client ("R" to s_client): our leg refuses it (a
    no_renegotiation alert); s_client then aborts the connection, which fails only this leg,
    with nothing raised and nothing blamed on our certificate."""
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", str(upstream_files),
         "-naccept", "1", "-www", "-tls1_2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    listener = socket.create_server(("127.0.0.1", 0))
    client = None
    try:
        assert server.stdout is not None
        port = _accept_port(server.stdout)
        client = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{listener.getsockname()[1]}",
             "-servername", UPSTREAM_NAME, "-CAfile", str(our_ca_file), "-tls1_2"],
            stdin=stdin_file(b"R\n"),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        down, _ = _proxy_one(listener, port, pki, upstreams, leaves)
        output = client.communicate(timeout=30)[0].decode()
        assert "RENEGOTIATING" in output, output
        assert down is not None and down.info is not None  # the handshake had completed
        # OpenSSL's client gives up on the refusal (its own choice), with an alert of its own
        assert "no renegotiation" in output
        assert down.failure is not None and not down.failure.in_handshake
        assert (down.failure.reason, down.failure.alert) == ("client_tls_failed",
                                                             "handshake_failure")  # fmt: skip
        assert client_rejected_certificate(down.failure) is None  # not about our certificate
    finally:
        listener.close()
        for process in (server, client):
            if process is not None:
                process.kill()
                process.wait()
                if process.stdout is not None:
                    process.stdout.close()


def test_after_the_peers_close_notify_we_may_still_send(
    pki: PKI, upstreams: UpstreamContexts
) -> None:
    """TLS 1.3 half-close: the upstream is done sending, the client's data still goes to it."""
    leg, peer = _upstream_leg(upstreams, pki.upstream_server, UPSTREAM_NAME)
    with contextlib.suppress(ssl.SSLWantReadError):
        peer.obj.unwrap()  # its close_notify; it waits for ours
    leg.receive(peer.out())
    assert leg.peer_closed and leg.state is LegState.CLOSED
    leg.send(b"still going")
    assert leg.failure is None
    peer.incoming.write(leg.data_to_send())
    with contextlib.suppress(ssl.SSLError):
        peer.received += peer.obj.read(100)
    assert peer.received == b"still going"


def test_after_an_eof_without_close_notify_sending_is_no_failure(
    pki: PKI, upstreams: UpstreamContexts
) -> None:
    leg, _ = _upstream_leg(upstreams, pki.upstream_server, UPSTREAM_NAME)
    leg.receive_eof()
    leg.send(b"to nobody")
    leg.close()
    assert leg.failure is None and leg.truncated


def test_openssl_s_server_renegotiating_is_refused_and_fails_only_that_leg(
    pki: PKI, upstreams: UpstreamContexts, upstream_files: Path
) -> None:
    """A TLS 1.2 upstream asking to renegotiate ("r" to s_server: a HelloRequest): our leg
    answers no_renegotiation; s_server insists with a handshake_failure alert, which fails the
    leg as `upstream_tls_failed`, after the handshake, nothing raised."""
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", "127.0.0.1:0", "-cert", str(upstream_files),
         "-naccept", "1", "-tls1_2"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert server.stdout is not None and server.stdin is not None
        port = _accept_port(server.stdout)
        leg = open_upstream_leg(upstreams.get(True, ()), UPSTREAM_NAME, "127.0.0.1",
                                established_context=upstreams.established)  # fmt: skip
        assert isinstance(leg, UpstreamLeg)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(leg.data_to_send())
            while leg.state is LegState.HANDSHAKING:
                data = sock.recv(65536)
                leg.receive(data) if data else leg.receive_eof()
                sock.sendall(leg.data_to_send())
            assert leg.info is not None and leg.info.version == "TLSv1.2"
            server.stdin.write(b"r\n")
            server.stdin.flush()
            while leg.failure is None and not leg.peer_closed:  # and the socket timeout
                data = sock.recv(65536)
                leg.receive(data) if data else leg.receive_eof()
                with contextlib.suppress(OSError):
                    sock.sendall(leg.data_to_send())
        assert leg.failure is not None
        assert (leg.failure.reason, leg.failure.alert) == ("upstream_tls_failed",
                                                           "handshake_failure")  # fmt: skip
        assert not leg.failure.in_handshake
    finally:
        server.kill()
        server.wait()
        for stream in (server.stdout, server.stdin):
            if stream is not None:
                stream.close()


def test_the_key_log_is_0600_and_gets_both_legs_secrets(pki: PKI, tmp_path: Path) -> None:
    keylog = tmp_path / "keys.log"
    old = os.umask(0)
    try:
        fd, by_descriptor = open_keylog(str(keylog))
    finally:
        os.umask(old)
    try:  # the descriptor stays open while contexts may be made (each opens the file by it)
        upstreams = UpstreamContexts(str(pki.upstream_ca_file), keylog=by_descriptor)
        leaves = LeafContexts(pki.forger.leaf_key_pem, keylog=by_descriptor)
        run = intercept(pki, upstreams, leaves, _client_context(pki.ours), pki.upstream_server)
    finally:
        os.close(fd)
    assert stat.S_IMODE(keylog.stat().st_mode) == 0o600
    assert run.client_leg.state is LegState.ESTABLISHED
    labels = [line.split()[0] for line in keylog.read_text().splitlines() if line[:1] != "#"]
    # TLS 1.3: five secrets per connection, two connections.
    assert labels.count("CLIENT_TRAFFIC_SECRET_0") == 2
    assert labels.count("SERVER_HANDSHAKE_TRAFFIC_SECRET") == 2


def test_a_key_log_that_others_could_read_or_reach_is_refused(tmp_path: Path) -> None:
    wide = tmp_path / "wide.log"
    wide.write_text("")
    wide.chmod(0o640)
    with pytest.raises(ConfigError, match=r"may be read by group or others \(mode 0640\)"):
        open_keylog(str(wide))
    assert stat.S_IMODE(wide.stat().st_mode) == 0o640  # left as it was: the fix is the user's
    target = tmp_path / "target.log"
    link = tmp_path / "link.log"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="a symbolic link"):
        open_keylog(str(link))
    assert not target.exists()
    with pytest.raises(ConfigError, match="no such directory"):
        open_keylog(str(tmp_path / "missing" / "keys.log"))
    with pytest.raises(ConfigError, match="cannot open it: Is a directory"):
        open_keylog(str(tmp_path))
