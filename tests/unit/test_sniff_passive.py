"""FirstBytes: what a session is, from its first bytes as the relay passes them."""

from __future__ import annotations

import contextlib
import ssl

from hypothesis import given
from hypothesis import strategies as st

from tproxy.sniffers.classify import SILENT, UNKNOWN, Sniffed
from tproxy.sniffers.facts import MAX_SNIFF_BYTES, HttpRequest, TlsHello
from tproxy.sniffers.passive import FirstBytes


def _client_hello() -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2", "http/1.1"])
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="a.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO = _client_hello()


@given(st.lists(st.integers(1, 200), max_size=30))
def test_a_hello_in_any_reads_is_tls(cuts: list[int]) -> None:
    watcher, data, wanted = FirstBytes(), HELLO, True
    for cut in cuts:
        if not data or not wanted:
            break
        wanted = watcher.client_sent(data[:cut])
        data = data[cut:]
    if wanted and data:
        assert not watcher.client_sent(data)
    result = watcher.final()
    assert result.proto == "tls" and isinstance(result.facts, TlsHello)
    assert (result.facts.sni, result.facts.alpn) == ("a.test", ("h2", "http/1.1"))


def test_http_then_no_more_reading() -> None:
    watcher = FirstBytes()
    assert watcher.client_sent(b"GET / HTTP/1.1\r\nHo")
    assert not watcher.client_sent(b"st: a.test\r\n\r\n")
    assert watcher.final() == Sniffed("http", HttpRequest("GET", "a.test", "/"))
    assert not watcher.client_sent(b"more")  # decided: not looked at again


def test_the_upstream_speaking_first_makes_it_silent() -> None:
    watcher = FirstBytes()
    watcher.upstream_sent()
    assert watcher.final() == SILENT
    assert not watcher.client_sent(b"EHLO client.test\r\n")  # an SMTP client, after the banner
    assert watcher.final() == SILENT


def test_the_upstream_answering_a_partial_message_changes_nothing() -> None:
    watcher = FirstBytes()
    assert watcher.client_sent(HELLO[:10])
    watcher.upstream_sent()
    assert not watcher.client_sent(HELLO[10:])
    assert watcher.final().proto == "tls"


def test_nothing_sent_is_silent_and_an_unfinished_message_unknown() -> None:
    assert FirstBytes().final() == SILENT
    partial = FirstBytes()
    assert partial.client_sent(HELLO[:100])
    assert partial.final() == UNKNOWN


def test_more_than_the_sniff_limit_without_an_answer_is_unknown() -> None:
    watcher = FirstBytes()
    head = b"GET / HTTP/1.1\r\n" + b"X-Filler: " + b"a" * 100 + b"\r\n"
    wanted = watcher.client_sent(head)
    while wanted:
        wanted = watcher.client_sent(b"X-More: " + b"b" * 1000 + b"\r\n")
    assert watcher.final() == UNKNOWN
    assert watcher._buffer == b""  # nothing held after the decision
    assert MAX_SNIFF_BYTES == 16 * 1024


def test_bytes_it_cannot_see_decide_with_what_was_seen() -> None:
    blind = FirstBytes()
    blind.cannot_see()
    assert blind.final() == SILENT
    half = FirstBytes()
    half.client_sent(b"GET / HT")
    half.cannot_see()
    assert half.final() == UNKNOWN
