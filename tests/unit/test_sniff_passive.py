"""FirstBytes: what a session is, from its first bytes as the relay passes them."""

from __future__ import annotations

import contextlib
import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.sniffers import passive
from tproxy.sniffers.classify import SILENT, UNKNOWN, Sniffed, classify
from tproxy.sniffers.facts import MAX_SNIFF_BYTES, HttpRequest, TlsHello
from tproxy.sniffers.passive import FirstBytes


def _client_hello(padding: int = 0) -> bytes:
    """A real ClientHello (Python's ssl); with `padding`, a padding extension (21) of that many
    zero bytes is added and every length fixed up."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_alpn_protocols(["h2", "http/1.1"])
    tls = context.wrap_bio(ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="a.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    if not padding:
        return hello
    # record(5) handshake(4) version(2) random(32) session id, suites, compression, extensions
    body = bytearray(hello[9:])
    pos = 34
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    extensions = int.from_bytes(body[pos : pos + 2], "big") + 4 + padding
    body[pos : pos + 2] = extensions.to_bytes(2, "big")
    body += (21).to_bytes(2, "big") + padding.to_bytes(2, "big") + bytes(padding)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(handshake).to_bytes(2, "big") + handshake


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
        decided_now = not watcher.client_sent(data)
        # Up to four reads are each looked at; after that the look may wait for more bytes,
        # the upstream's answer or the end (a dribbling client must not cost a parse a byte).
        assert decided_now or len(cuts) >= 4
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


def test_a_dribbling_client_costs_a_few_parses_not_one_per_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A ClientHello of 2,000+ bytes sent a byte at a time is still read, with the parser run
    a few dozen times rather than once per byte."""
    calls: list[int] = []

    def counting(data: bytes) -> object:
        calls.append(len(data))
        return classify(data)

    monkeypatch.setattr(passive, "classify", counting)
    hello = HELLO + b""
    big = _big_hello()
    for whole in (hello, big):
        calls.clear()
        watcher = FirstBytes()
        for i in range(len(whole)):
            if not watcher.client_sent(whole[i : i + 1]):
                break
        result = watcher.final()
        assert result.proto == "tls" and isinstance(result.facts, TlsHello), len(whole)
        assert len(calls) < 30, (len(whole), len(calls))


def test_an_eager_watcher_decides_at_the_last_byte_of_a_dribbled_hello(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session waiting for its facts classifies every read: a real hello sent a byte at a
    time is decided by its last byte, not by a timeout."""
    watcher = FirstBytes(eager=True)
    for i in range(len(HELLO) - 1):
        assert watcher.client_sent(HELLO[i : i + 1]), i
    assert watcher.result is None
    assert not watcher.client_sent(HELLO[-1:])
    assert watcher.result is not None and watcher.result.proto == "tls"


def test_an_eager_watcher_parses_within_its_budget_however_the_client_dribbles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """16 KiB of 1-byte TLS records, then a byte per read: every parse walks every record, so
    parsing on each read would cost about 0.7 ms a byte; the budget bounds the total."""
    parsed: list[int] = []

    def counting(data: bytes) -> object:
        parsed.append(len(data))
        return classify(data)

    monkeypatch.setattr(passive, "classify", counting)
    body = b"\x01" + (8000).to_bytes(3, "big") + b"\x03\x03" + bytes(7996)
    records = b"".join(b"\x16\x03\x01\x00\x01" + body[i : i + 1] for i in range(len(body)))
    records = records[:MAX_SNIFF_BYTES]
    watcher = FirstBytes(eager=True)
    watcher.client_sent(records[:4096])
    for i in range(4096, len(records)):
        if not watcher.client_sent(records[i : i + 1]):
            break
    assert watcher.final() == UNKNOWN
    assert sum(parsed) <= passive._EAGER_PARSE_BUDGET + 3 * MAX_SNIFF_BYTES, len(parsed)


def test_the_upstream_answer_gets_the_held_bytes_one_more_look() -> None:
    watcher = FirstBytes()
    for i in range(len(HELLO)):  # dribbled: the last bytes may not have been parsed yet
        watcher.client_sent(HELLO[i : i + 1])
    watcher.upstream_sent()
    assert watcher.result is not None and watcher.result.proto == "tls"


def _big_hello() -> bytes:
    """A ClientHello over 2,000 bytes: the real one with a padding extension added."""
    return _client_hello(padding=2000)


def test_a_sniffer_that_raises_makes_the_session_unknown_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(data: bytes) -> object:
        raise IndexError("a sniffer bug")

    monkeypatch.setattr(passive, "classify", broken)
    watcher = FirstBytes()
    assert not watcher.client_sent(b"GET / HTTP/1.1\r\n")
    assert watcher.final() == UNKNOWN
