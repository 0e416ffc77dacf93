"""The HTTP CONNECT client handshake: the exact request, real proxies' replies cut at every
offset, every kind of status, escaped reasons, the 16 KiB bound, and random bytes."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.upstream_harness import feed
from tproxy.policy.model import HostPort, UpstreamProxy
from tproxy.upstream.handshake import (
    NEED_MORE,
    Answer,
    Established,
    HTTPConnectHandshake,
    NeedMore,
    ProxyHandshake,
    Refused,
    Send,
    handshake_for,
)
from tproxy.upstream.http_connect import MAX_HEAD_BYTES, MAX_REASON_CHARS

PROXY = UpstreamProxy("http", HostPort("198.18.2.2", 8888))
WITH_CREDENTIALS = UpstreamProxy("http", HostPort("198.18.2.2", 8888), "alice", "s3cret")

TINYPROXY_OK = b"HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n"
SQUID_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"
BARE_OK = b"HTTP/1.1 200\r\n\r\n"
WITH_LENGTH_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nConnection: keep-alive\r\n\r\n"
OKS = {"tinyproxy": TINYPROXY_OK, "squid": SQUID_OK, "bare": BARE_OK, "length": WITH_LENGTH_OK}
TINYPROXY_403 = (
    b"HTTP/1.0 403 Access violation\r\nServer: tinyproxy/1.11.1\r\nContent-Type: text/html\r\n"
    b"Connection: close\r\n\r\n<html><body>The administrator of this proxy has not configured it"
    b" to service requests to your host.</body></html>"
)
DETAIL = re.compile(r"[\x20-\x7e]{1,200}")


def fresh(
    proxy: UpstreamProxy = PROXY, host: str = "198.18.2.2", port: int = 443
) -> ProxyHandshake:
    handshake = handshake_for(proxy, host, port)
    handshake.start()
    return handshake


# --- what we send ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "authority"),
    [
        ("198.18.2.2", 443, "198.18.2.2:443"),
        ("2001:db8:2::2", 80, "[2001:db8:2::2]:80"),
        ("2001:DB8:2:0::2", 8443, "[2001:db8:2::2]:8443"),
        ("www.example.test", 8080, "www.example.test:8080"),
    ],
)
def test_the_connect_request(host: str, port: int, authority: str) -> None:
    expected = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
    assert handshake_for(PROXY, host, port).start() == expected


def test_credentials_go_in_proxy_authorization_basic() -> None:
    token = base64.b64encode(b"alice:s3cret").decode()
    assert token == "YWxpY2U6czNjcmV0"
    assert handshake_for(WITH_CREDENTIALS, "198.18.2.2", 443).start() == (
        b"CONNECT 198.18.2.2:443 HTTP/1.1\r\nHost: 198.18.2.2:443\r\n"
        b"Proxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n"
    )


def test_credentials_are_utf8_and_a_password_may_hold_anything() -> None:
    proxy = UpstreamProxy("http", HostPort("198.18.2.2", 8888), "jürgen", "a:b\r\nX: y")
    request = handshake_for(proxy, "198.18.2.2", 443).start()
    token = base64.b64encode("jürgen:a:b\r\nX: y".encode()).decode()
    assert f"Proxy-Authorization: Basic {token}\r\n".encode() in request
    assert request.count(b"\r\n") == 4  # no line came from the password


def test_a_username_with_a_colon_cannot_be_sent() -> None:
    proxy = UpstreamProxy("http", HostPort("198.18.2.2", 8888), "a:b", "c")
    with pytest.raises(ValueError, match="':'"):
        handshake_for(proxy, "198.18.2.2", 443)


@pytest.mark.parametrize("host", ["evil\r\nX-Injected: 1", "a b", "a\nb", "", "x" * 256])
def test_a_host_that_would_break_the_request_is_refused_before_connecting(host: str) -> None:
    with pytest.raises(ValueError):
        handshake_for(PROXY, host, 443)


def test_handshake_for_gives_an_http_connect_handshake() -> None:
    assert isinstance(handshake_for(PROXY, "198.18.2.2", 80), HTTPConnectHandshake)


# --- replies -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", OKS)
def test_every_proper_prefix_needs_more_and_the_head_establishes(name: str) -> None:
    head = OKS[name]
    for end in range(len(head)):
        assert fresh().receive(head[:end]) is NEED_MORE, end
    assert fresh().receive(head) == Established()


@pytest.mark.parametrize("name", OKS)
@pytest.mark.parametrize("tail", [b"", b"SSH-2.0-OpenSSH_9.2\r\n", b"HTTP/1.1 200 OK\r\n\r\n"])
def test_a_reply_cut_at_every_offset_gives_the_same_answer(name: str, tail: bytes) -> None:
    data = OKS[name] + tail
    assert fresh().receive(data) == Established(tail)
    for cut in range(len(data) + 1):
        answer, rest = feed(fresh(), data, [cut])
        assert isinstance(answer, Established), cut
        assert answer.leftover + rest == tail, cut
    answer, rest = feed(fresh(), data, list(range(len(data))))
    assert answer == Established() and rest == tail


@settings(max_examples=200)
@given(name=st.sampled_from(sorted(OKS)), tail=st.binary(max_size=64), data=st.data())
def test_any_chunking_keeps_the_leftover(name: str, tail: bytes, data: st.DataObject) -> None:
    reply = OKS[name] + tail
    cuts = data.draw(st.lists(st.integers(0, len(reply)), max_size=16))
    answer, rest = feed(fresh(), reply, cuts)
    assert isinstance(answer, Established)
    assert answer.leftover + rest == tail


def test_a_content_length_on_a_2xx_reply_is_not_a_body() -> None:
    assert fresh().receive(WITH_LENGTH_OK + b"\x16\x03\x03") == Established(b"\x16\x03\x03")


@pytest.mark.parametrize("code", [200, 201, 204, 299])
def test_any_2xx_establishes(code: int) -> None:
    assert fresh().receive(f"HTTP/1.1 {code} Whatever\r\n\r\n".encode()) == Established()


@pytest.mark.parametrize(
    ("head", "detail"),
    [
        (TINYPROXY_403, "HTTP 403 Access violation"),
        (b"HTTP/1.1 407 Proxy Authentication Required\r\n"
         b'Proxy-Authenticate: Basic realm="proxy"\r\n\r\n',
         "HTTP 407 Proxy Authentication Required"),
        (b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n", "HTTP 502 Bad Gateway"),
        (b"HTTP/1.1 503\r\n\r\n", "HTTP 503"),
        (b"HTTP/1.1 300 Multiple Choices\r\n\r\n", "HTTP 300 Multiple Choices"),
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", "HTTP 101 Switching Protocols"),
        (b"HTTP/1.1 404 Not \x80\xffFound\\\r\n\r\n", "HTTP 404 Not \\x80\\xffFound\\x5c"),
    ],
)  # fmt: skip
def test_other_statuses_refuse_with_code_and_reason(head: bytes, detail: str) -> None:
    assert fresh().receive(head) == Refused(detail)
    for cut in range(len(head)):
        assert feed(fresh(), head, [cut])[0] == Refused(detail), cut


def test_a_long_reason_is_cut() -> None:
    answer = fresh().receive(b"HTTP/1.1 403 " + b"x" * 5000 + b"\r\n\r\n")
    assert answer == Refused("HTTP 403 " + "x" * MAX_REASON_CHARS)
    assert len(answer.detail) <= 200


@pytest.mark.parametrize("interim", [100, 102, 103])
def test_interim_responses_are_skipped(interim: int) -> None:
    data = f"HTTP/1.1 {interim} Wait\r\nX: y\r\n\r\n".encode() + SQUID_OK + b"first"
    assert fresh().receive(data) == Established(b"first")
    answer, rest = feed(fresh(), data, list(range(len(data))))
    assert answer == Established() and rest == b"first"


@pytest.mark.parametrize(
    "start",
    [b"\x05", b"\x00", b"SSH-", b"http/", b"HTTP/1.1 20\r", b"HTTP/1.1 200 OK\n",
     b"HTTP/1.1 200 OK\r\nBad Header\r\n", b"HTTP/1.1 200 OK\r\n: empty\r\n"],
)  # fmt: skip
def test_nonsense_refuses_as_soon_as_it_shows(start: bytes) -> None:
    answer = fresh().receive(start)
    assert isinstance(answer, Refused) and not answer.refused, answer
    assert DETAIL.fullmatch(answer.detail)


def test_not_http_is_answered_at_the_first_byte() -> None:
    assert fresh().receive(b"\x05") == Refused("not an HTTP response", refused=False)
    assert fresh().receive(b"HTTP/") is NEED_MORE
    assert fresh().receive(b"HTTPS") == Refused("not an HTTP response", refused=False)


def test_a_head_of_16_kib_is_accepted_and_one_byte_more_is_too_long() -> None:
    start = b"HTTP/1.1 200 OK\r\nX-Padding: "
    fill = MAX_HEAD_BYTES - len(start) - 4
    at_limit = start + b"a" * fill + b"\r\n\r\n"
    assert len(at_limit) == MAX_HEAD_BYTES
    assert fresh().receive(at_limit + b"after") == Established(b"after")
    over = start + b"a" * (fill + 1) + b"\r\n\r\n"
    too_long = Refused("reply header too long", refused=False)
    assert fresh().receive(over) == too_long
    answer, _ = feed(fresh(), over, list(range(0, len(over), 997)))
    assert answer == too_long


def test_interim_heads_count_towards_the_bound() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    data = interim * (MAX_HEAD_BYTES // len(interim) + 1) + SQUID_OK
    assert fresh().receive(data) == Refused("reply header too long", refused=False)


def test_an_endless_header_refuses_at_16_kib_not_later() -> None:
    handshake = fresh()
    assert handshake.receive(b"HTTP/1.1 200 OK\r\nX: ") is NEED_MORE
    answers = [handshake.receive(b"a" * 1024) for _ in range(16)]
    assert answers[-1] == Refused("reply header too long", refused=False)
    assert all(a is NEED_MORE for a in answers[:-1])


@pytest.mark.parametrize("final", [SQUID_OK, TINYPROXY_403])
def test_after_the_end_nothing_more_is_read(final: bytes) -> None:
    handshake = fresh()
    assert handshake.receive(final) is not NEED_MORE
    answer = handshake.receive(SQUID_OK)
    assert isinstance(answer, Refused) and not answer.refused


# --- random bytes ------------------------------------------------------------------------------


def check(answer: Answer) -> None:
    assert isinstance(answer, Established | Refused | NeedMore)
    assert not isinstance(answer, Send)  # CONNECT has a single request
    if isinstance(answer, Refused):
        assert DETAIL.fullmatch(answer.detail), answer.detail


@settings(max_examples=500)
@given(chunks=st.lists(st.binary(max_size=64), max_size=8))
def test_random_bytes_never_raise(chunks: list[bytes]) -> None:
    handshake = fresh(WITH_CREDENTIALS, "www.example.test")
    for chunk in chunks:
        answer = handshake.receive(chunk)
        check(answer)
        if answer is not NEED_MORE:
            break


@settings(max_examples=300)
@given(data=st.binary(min_size=1, max_size=200))
def test_random_replies_end_in_need_more_or_refused(data: bytes) -> None:
    answer = fresh().receive(data)
    check(answer)
    assert isinstance(answer, NeedMore | Refused)


@settings(max_examples=300)
@given(
    name=st.sampled_from([*sorted(OKS), "403"]),
    edits=st.lists(
        st.tuples(st.sampled_from(["replace", "insert", "delete"]), st.integers(0), st.binary()),
        min_size=1,
        max_size=8,
    ),
)
def test_mutated_replies_never_raise(name: str, edits: list[tuple[str, int, bytes]]) -> None:
    head = bytearray(OKS.get(name, TINYPROXY_403))
    for kind, where, what in edits:
        at = where % (len(head) + 1)
        if kind == "insert":
            head[at:at] = what
        elif kind == "replace":
            head[at : at + len(what)] = what
        else:
            del head[at : at + 1 + len(what)]
    check(fresh().receive(bytes(head)))
