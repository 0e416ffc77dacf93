"""The HTTP/1 request-head sniffer: real heads cut at every offset and in random chunks, random
bytes and mutations, the early answers for other protocols, and the bounds."""

from __future__ import annotations

import re

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.sniffers import http
from tproxy.sniffers.facts import MAX_SNIFF_BYTES, NEED_MORE, HttpRequest, NeedMore, NotThis
from tproxy.sniffers.http import MAX_HOST_CHARS, MAX_PATH_CHARS, sniff_http

CURL = b"GET / HTTP/1.1\r\nHost: www.example.test\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"
BROWSER = (
    b"GET /search?q=tproxy&lang=en HTTP/1.1\r\n"
    b"Host: www.example.test\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=0123456789abcdef; theme=dark\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"Sec-Fetch-Dest: document\r\n"
    b"Sec-Fetch-Mode: navigate\r\n"
    b"Sec-Fetch-Site: none\r\n"
    b"Sec-Fetch-User: ?1\r\n"
    b"Priority: u=0, i\r\n"
    b"\r\n"
)
HTTP10_NO_HOST = b"GET /index.html HTTP/1.0\r\nUser-Agent: Wget/1.21.3\r\nAccept: */*\r\n\r\n"
ABSOLUTE_FORM = (
    b"GET http://www.example.test/a/b?c=d HTTP/1.1\r\n"
    b"Host: www.example.test\r\n"
    b"Proxy-Connection: Keep-Alive\r\n"
    b"\r\n"
)
HOST_WITH_PORT = b"GET /api HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\n\r\n"
IPV6_HOST = b"HEAD / HTTP/1.1\r\nHost: [2001:DB8::1]:80\r\n\r\n"
UPPERCASE_HOST = b"GET / HTTP/1.1\r\nHost: WWW.Example.TEST.\r\n\r\n"
NON_ASCII_HOST = b"GET / HTTP/1.1\r\nHost: b\xc3\xbccher.example\r\n\r\n"
POST_WITH_BODY = (
    b"POST /form HTTP/1.1\r\nHost: forms.example\r\n"
    b"Content-Type: application/x-www-form-urlencoded\r\n"
    b"Content-Length: 7\r\n\r\n"
)

HEADS = {
    "curl": (CURL, HttpRequest("GET", "www.example.test", "/")),
    "browser": (BROWSER, HttpRequest("GET", "www.example.test", "/search?q=tproxy&lang=en")),
    "http10-no-host": (HTTP10_NO_HOST, HttpRequest("GET", None, "/index.html")),
    "absolute-form": (
        ABSOLUTE_FORM,
        HttpRequest("GET", "www.example.test", "http://www.example.test/a/b?c=d"),
    ),
    "host-with-port": (HOST_WITH_PORT, HttpRequest("GET", "example.com", "/api")),
    "ipv6-host": (IPV6_HOST, HttpRequest("HEAD", "2001:db8::1", "/")),
    "uppercase-host": (UPPERCASE_HOST, HttpRequest("GET", "www.example.test", "/")),
    "non-ascii-host": (NON_ASCII_HOST, HttpRequest("GET", "b\\xc3\\xbccher.example", "/")),
    "post": (POST_WITH_BODY, HttpRequest("POST", "forms.example", "/form")),
}
# Printable ASCII without the backslash, or one escape: what a sniffed name may contain.
PRINTABLE = re.compile(r"(?:[\x20-\x5b\x5d-\x7e]|\\x[0-9a-f]{2})*")

Answer = HttpRequest | NeedMore | NotThis


def sniff_in_chunks(data: bytes, cuts: list[int]) -> tuple[Answer, int]:
    """Feed `data` as the engine does: the bytes so far after each chunk, until an answer."""
    ends = [*sorted(set(cuts)), len(data)]
    for end in ends:
        answer = sniff_http(data[:end])
        if answer is not NEED_MORE:
            return answer, end
    return NEED_MORE, len(data)


@pytest.mark.parametrize("name", HEADS)
def test_every_prefix_of_a_head_needs_more_and_the_whole_gives_its_facts(name: str) -> None:
    head, facts = HEADS[name]
    for end in range(len(head)):
        assert sniff_http(head[:end]) is NEED_MORE, (name, end)
    assert sniff_http(head) == facts


@pytest.mark.parametrize("name", HEADS)
@given(tail=st.binary(max_size=64))
def test_what_follows_the_head_changes_nothing(name: str, tail: bytes) -> None:
    head, facts = HEADS[name]
    assert sniff_http(head + tail) == facts


@pytest.mark.parametrize("name", HEADS)
@given(data=st.data())
def test_any_chunking_gives_the_same_facts(name: str, data: st.DataObject) -> None:
    head, facts = HEADS[name]
    cuts = data.draw(st.lists(st.integers(1, len(head) - 1), max_size=20))
    assert sniff_in_chunks(head, cuts) == (facts, len(head))


@given(st.binary(max_size=512))
def test_random_bytes_never_raise(data: bytes) -> None:
    assert isinstance(sniff_http(data), HttpRequest | NeedMore | NotThis)


@given(
    name=st.sampled_from(sorted(HEADS)),
    edits=st.lists(
        st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.integers(0), st.binary()),
        min_size=1,
        max_size=8,
    ),
)
def test_mutated_heads_never_raise_and_stay_printable(
    name: str, edits: list[tuple[str, int, bytes]]
) -> None:
    head = bytearray(HEADS[name][0])
    for kind, where, what in edits:
        at = where % (len(head) + 1)
        if kind == "insert":
            head[at:at] = what
        elif kind == "replace":
            head[at : at + len(what)] = what
        else:
            del head[at : at + 1 + len(what)]
    answer = sniff_http(bytes(head))
    assert isinstance(answer, HttpRequest | NeedMore | NotThis)
    if isinstance(answer, HttpRequest):
        assert answer.host is None or PRINTABLE.fullmatch(answer.host)
        assert PRINTABLE.fullmatch(answer.path)
        assert answer.method.isascii() and answer.method.isupper()


def test_a_tls_client_hello_is_not_http_from_its_first_byte() -> None:
    hello_start = bytes.fromhex("16030102000100")
    for end in range(1, len(hello_start) + 1):
        assert isinstance(sniff_http(hello_start[:end]), NotThis)


def test_an_ssh_banner_is_not_http_from_its_second_byte() -> None:
    banner = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"
    assert sniff_http(banner[:1]) is NEED_MORE  # "S" may still be SEARCH, SOURCE, SUBSCRIBE
    for end in range(2, len(banner) + 1):
        assert isinstance(sniff_http(banner[:end]), NotThis)


@pytest.mark.parametrize(
    "start",
    [b"\x00", b"get ", b"GETX", b"FOO ", b"GET / HTTP/1.1 \r\n", b"GET / HTTP/1.2\r\n", b"G\x16"],
)
def test_a_broken_start_is_answered_at_once(start: bytes) -> None:
    assert isinstance(sniff_http(start), NotThis)


def test_the_http2_preface_is_not_an_http1_request() -> None:
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    assert sniff_http(b"PR") is NEED_MORE  # PROPFIND, PROPPATCH
    for end in range(3, len(preface) + 1):
        assert sniff_http(preface[:end]) == NotThis("HTTP/2 prior-knowledge preface")
    assert sniff_http(b"\r\n" + preface) == NotThis("HTTP/2 prior-knowledge preface")


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"GET /\r\n\r\n", "HTTP/0.9"),
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", "HTTP/2.0"),
        (b"GET / HTTP/1.1\r\nHost: a.example\r\nhost: b.example\r\n\r\n", "several Host headers"),
    ],
)
def test_heads_that_name_no_single_http1_host_are_not_this(head: bytes, why: str) -> None:
    assert sniff_http(head) == NotThis(why)


def test_bare_lf_line_ends_are_not_accepted() -> None:
    assert isinstance(sniff_http(b"GET / HTTP/1.1\nHost: a\n\n"), NotThis)


@pytest.mark.parametrize("value", [b"\x1b[31mred", b"a\x00b", b"a\rb", b"a\x7fb"])
def test_control_characters_in_a_header_are_not_http(value: bytes) -> None:
    assert isinstance(sniff_http(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n"), NotThis)


@pytest.mark.parametrize(
    ("value", "host"),
    [
        (b"example.com", "example.com"),
        (b"example.com:8080", "example.com"),
        (b"example.com.:8080", "example.com"),
        (b"[2001:db8::1]:80", "2001:db8::1"),
        (b"[2001:db8::1]", "2001:db8::1"),
        (b"2001:db8::1", "2001:db8::1"),  # unbracketed: invalid, kept whole
        (b"192.0.2.7:80", "192.0.2.7"),
        (b"  Example.COM\t ", "example.com"),
        (b"", None),
        (b":80", None),
        (b"a\\b", "a\\x5cb"),
        (b"a\tb", "a\\x09b"),  # the only control character llhttp lets through
    ],
)
def test_the_host_header_is_normalised(value: bytes, host: str | None) -> None:
    answer = sniff_http(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
    assert answer == HttpRequest("GET", host, "/")


@pytest.mark.parametrize(
    "head",
    [
        b"CONNECT www.example.test:443 HTTP/1.1\r\nHost: www.example.test:443\r\n\r\n",
        b"GET /chat HTTP/1.1\r\nHost: www.example.test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\n\r\n",
    ],
)
def test_upgrades_and_connect_give_their_facts(head: bytes) -> None:
    answer = sniff_http(head)
    assert isinstance(answer, HttpRequest)
    assert answer.host == "www.example.test"


def test_only_the_first_of_pipelined_requests_counts() -> None:
    second = b"DELETE /other HTTP/1.1\r\nHost: other.example\r\nHost: twice.example\r\n\r\n"
    assert sniff_http(CURL + second) == HEADS["curl"][1]


def test_a_broken_body_after_the_head_keeps_the_facts() -> None:
    head = b"POST /up HTTP/1.1\r\nHost: a.example\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert sniff_http(head + b"zz\r\n") == HttpRequest("POST", "a.example", "/up")


def test_a_head_longer_than_the_sniff_cap_is_too_large() -> None:
    start = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: "
    padded = start + b"a" * (17 * 1024) + b"\r\n\r\n"
    assert sniff_http(padded[: MAX_SNIFF_BYTES - 1]) is NEED_MORE
    assert sniff_http(padded[:MAX_SNIFF_BYTES]) == NotThis("too large")
    assert sniff_http(padded) == NotThis("too large")


def test_a_head_that_ends_exactly_at_the_cap_is_read() -> None:
    start = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Pad: "
    head = start + b"a" * (MAX_SNIFF_BYTES - len(start) - 4) + b"\r\n\r\n"
    assert len(head) == MAX_SNIFF_BYTES
    assert sniff_http(head + b"more") == HttpRequest("GET", "a.example", "/")


@pytest.mark.parametrize("label", [b"a", b"\xc3\xa9", b"\\"])
def test_a_long_host_is_bounded_without_splitting_an_escape(label: bytes) -> None:
    answer = sniff_http(b"GET / HTTP/1.1\r\nHost: " + label * 300 + b".example\r\n\r\n")
    assert isinstance(answer, HttpRequest) and answer.host is not None
    assert 250 <= len(answer.host) <= MAX_HOST_CHARS
    assert PRINTABLE.fullmatch(answer.host)


def test_a_long_path_is_bounded() -> None:
    answer = sniff_http(b"GET /" + b"p" * 5000 + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert isinstance(answer, HttpRequest)
    assert answer.path == "/" + "p" * (MAX_PATH_CHARS - 1)


def test_the_first_byte_shortcut_refuses_nothing_llhttp_could_still_parse() -> None:
    class NoCallbacks:
        pass

    accepted = set()
    for first in range(256):
        try:
            httptools.HttpRequestParser(NoCallbacks()).feed_data(bytes([first]))
        except httptools.HttpParserError:
            continue
        accepted.add(first)
    # "F" only starts RTSP's FLUSH, which llhttp refuses in an HTTP/1.x request line.
    assert accepted - {ord("F")} <= set(http._FIRST_BYTES)
    assert isinstance(sniff_http(b"FLUSH / HTTP/1.1\r\n\r\n"), NotThis)
