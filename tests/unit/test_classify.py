"""classify: the first sniffer that recognises the bytes wins; none left -> unknown."""

from __future__ import annotations

import contextlib
import ssl

from hypothesis import given
from hypothesis import strategies as st

from tproxy.sniffers.classify import UNKNOWN, Sniffed, classify
from tproxy.sniffers.facts import NEED_MORE, HttpRequest, SshBanner, TlsHello


def _client_hello(server_name: str) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2", "http/1.1"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server: hello is out
        tls.do_handshake()
    return outgoing.read()


HELLO = _client_hello("www.example.test")
GET = b"GET /index.html HTTP/1.1\r\nHost: Example.TEST:8080\r\nUser-Agent: curl/7.88.1\r\n\r\n"
SSH = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"


def test_each_protocol_is_recognised_with_its_facts() -> None:
    tls = classify(HELLO)
    assert isinstance(tls, Sniffed) and tls.proto == "tls"
    assert isinstance(tls.facts, TlsHello) and tls.facts.sni == "www.example.test"
    assert tls.facts.alpn == ("h2", "http/1.1")
    assert classify(GET) == Sniffed("http", HttpRequest("GET", "example.test", "/index.html"))
    assert classify(SSH) == Sniffed("ssh", SshBanner("SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3"))


def test_prefixes_wait_and_foreign_bytes_are_unknown() -> None:
    assert classify(b"") is NEED_MORE
    for whole in (HELLO, GET, SSH):
        for cut in range(1, len(whole)):
            assert classify(whole[:cut]) is NEED_MORE, cut
    assert classify(b"\x00\x01binary protocol") == UNKNOWN
    assert classify(b"EHLO mail.example.test\r\n") == UNKNOWN  # a client that speaks SMTP


@given(st.binary(max_size=4096))
def test_random_bytes_never_raise(data: bytes) -> None:
    assert classify(data) is NEED_MORE or isinstance(classify(data), Sniffed)
