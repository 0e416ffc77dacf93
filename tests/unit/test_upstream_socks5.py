"""The SOCKS5 client handshake (RFC 1928, RFC 1929): exact bytes we send, every reply code,
every reply cut at every offset, leftover, lying lengths, bounds, and random bytes."""

from __future__ import annotations

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
    NeedMore,
    ProxyHandshake,
    Refused,
    Send,
    Socks5Handshake,
    handshake_for,
)
from tproxy.upstream.socks5 import REPLY_CODES

PROXY = UpstreamProxy("socks5", HostPort("198.18.2.2", 1080))
WITH_CREDENTIALS = UpstreamProxy("socks5", HostPort("198.18.2.2", 1080), "alice", "s3cret")

NO_AUTH = b"\x05\x00"
USER_PASS = b"\x05\x02"
AUTH_OK = b"\x01\x00"
REPLY_V4 = b"\x05\x00\x00\x01\xc6\x12\x02\x02\x9c\x41"  # bound to 198.18.2.2:40001
V6_SERVER = bytes.fromhex("20010db8000200000000000000000002")  # 2001:db8:2::2
REPLY_V6 = b"\x05\x00\x00\x04" + V6_SERVER + b"\x9c\x41"
REPLY_NAME = b"\x05\x00\x00\x03\x0bproxy.local\x9c\x41"
REPLIES = {"ipv4": REPLY_V4, "ipv6": REPLY_V6, "name": REPLY_NAME}
DETAIL = re.compile(r"[\x20-\x7e]{1,200}")


def connected(
    proxy: UpstreamProxy = PROXY, host: str = "198.18.2.2", port: int = 80
) -> ProxyHandshake:
    """A handshake past the method selection: the next bytes are the CONNECT reply."""
    handshake = handshake_for(proxy, host, port)
    handshake.start()
    assert isinstance(handshake.receive(NO_AUTH), Send)
    return handshake


def check_detail(answer: Answer) -> None:
    if isinstance(answer, Refused):
        assert DETAIL.fullmatch(answer.detail), answer.detail


# --- what we send ----------------------------------------------------------------------------


def test_greeting_offers_no_auth_only_without_credentials() -> None:
    assert handshake_for(PROXY, "198.18.2.2", 80).start() == b"\x05\x01\x00"


def test_greeting_offers_user_pass_too_with_credentials() -> None:
    assert handshake_for(WITH_CREDENTIALS, "198.18.2.2", 80).start() == b"\x05\x02\x00\x02"


@pytest.mark.parametrize(
    ("host", "port", "connect"),
    [
        ("198.18.2.2", 80, b"\x05\x01\x00\x01\xc6\x12\x02\x02\x00\x50"),
        ("2001:db8:2::2", 443, b"\x05\x01\x00\x04" + V6_SERVER + b"\x01\xbb"),
        ("2001:DB8:2:0::2", 65535, b"\x05\x01\x00\x04" + V6_SERVER + b"\xff\xff"),
        ("www.example.test", 8080, b"\x05\x01\x00\x03\x10www.example.test\x1f\x90"),
        ("Example.TEST.", 1, b"\x05\x01\x00\x03\x0dExample.TEST.\x00\x01"),
    ],
)  # fmt: skip
def test_connect_request_bytes(host: str, port: int, connect: bytes) -> None:
    handshake = handshake_for(PROXY, host, port)
    handshake.start()
    assert handshake.receive(NO_AUTH) == Send(connect)


def test_user_pass_subnegotiation_then_connect() -> None:
    handshake = handshake_for(WITH_CREDENTIALS, "198.18.2.2", 80)
    handshake.start()
    assert handshake.receive(USER_PASS) == Send(b"\x01\x05alice\x06s3cret")
    assert handshake.receive(AUTH_OK) == Send(b"\x05\x01\x00\x01\xc6\x12\x02\x02\x00\x50")
    assert handshake.receive(REPLY_V4 + b"hello") == Established(b"hello")


def test_credentials_are_utf8_and_an_absent_password_is_empty() -> None:
    proxy = UpstreamProxy("socks5", HostPort("198.18.2.2", 1080), "jürgen", None)
    handshake = handshake_for(proxy, "198.18.2.2", 80)
    handshake.start()
    assert handshake.receive(USER_PASS) == Send(b"\x01\x07j\xc3\xbcrgen\x00")


def test_credentials_offered_but_the_proxy_picks_no_auth() -> None:
    handshake = handshake_for(WITH_CREDENTIALS, "198.18.2.2", 80)
    handshake.start()
    assert handshake.receive(NO_AUTH) == Send(b"\x05\x01\x00\x01\xc6\x12\x02\x02\x00\x50")


# --- refusals and protocol errors --------------------------------------------------------------


@pytest.mark.parametrize("proxy", [PROXY, WITH_CREDENTIALS])
def test_no_acceptable_method_is_a_refusal(proxy: UpstreamProxy) -> None:
    handshake = handshake_for(proxy, "198.18.2.2", 80)
    handshake.start()
    answer = handshake.receive(b"\x05\xff")
    assert isinstance(answer, Refused) and answer.refused
    assert answer.detail.startswith("SOCKS5: no acceptable authentication method")


@pytest.mark.parametrize("status", [1, 2, 0x80, 0xFF])
def test_rejected_credentials_are_a_refusal(status: int) -> None:
    handshake = handshake_for(WITH_CREDENTIALS, "198.18.2.2", 80)
    handshake.start()
    handshake.receive(USER_PASS)
    assert handshake.receive(bytes((1, status))) == Refused(
        f"SOCKS5: authentication failed (status {status})"
    )


def test_the_auth_status_may_carry_version_5_as_some_servers_send() -> None:
    handshake = handshake_for(WITH_CREDENTIALS, "198.18.2.2", 80)
    handshake.start()
    handshake.receive(USER_PASS)
    assert isinstance(handshake.receive(b"\x05\x00"), Send)


@pytest.mark.parametrize(
    ("proxy", "method"),
    [(PROXY, b"\x05\x02"), (PROXY, b"\x05\x01"), (WITH_CREDENTIALS, b"\x05\x01"),
     (PROXY, b"\x05\x80")],
)  # fmt: skip
def test_a_method_we_did_not_offer_is_a_protocol_error(proxy: UpstreamProxy, method: bytes) -> None:
    handshake = handshake_for(proxy, "198.18.2.2", 80)
    handshake.start()
    answer = handshake.receive(method)
    assert isinstance(answer, Refused) and not answer.refused
    assert answer.detail == f"SOCKS5: the proxy chose method 0x{method[1]:02x}, not offered"


@pytest.mark.parametrize("code", sorted(REPLY_CODES))
def test_every_reply_code_is_named(code: int) -> None:
    reply = bytes((5, code)) + REPLY_V4[2:]
    answer = connected().receive(reply)
    assert answer == Refused(f"SOCKS5: {REPLY_CODES[code]} ({code})")
    check_detail(answer)


def test_reply_code_names_are_the_rfcs() -> None:
    assert REPLY_CODES[5] == "connection refused by destination host"
    assert REPLY_CODES == {
        1: "general SOCKS server failure", 2: "connection not allowed by ruleset",
        3: "network unreachable", 4: "host unreachable",
        5: "connection refused by destination host", 6: "TTL expired",
        7: "command not supported", 8: "address type not supported",
    }  # fmt: skip


@pytest.mark.parametrize("code", [9, 0x7F, 0x80, 0xFF])
def test_unknown_reply_codes_give_their_number(code: int) -> None:
    assert connected().receive(bytes((5, code))) == Refused(f"SOCKS5: reply code {code}")


def test_a_failure_code_refuses_without_waiting_for_the_bound_address() -> None:
    handshake = connected()
    assert handshake.receive(b"\x05") is NEED_MORE
    assert handshake.receive(b"\x05") == Refused(f"SOCKS5: {REPLY_CODES[5]} (5)")


@pytest.mark.parametrize("first", [b"\x04", b"\x00", b"H", b"\x16"])
def test_not_a_socks5_reply_is_answered_at_the_first_byte(first: bytes) -> None:
    greeting = handshake_for(PROXY, "198.18.2.2", 80)
    greeting.start()
    assert greeting.receive(first) == Refused("not a SOCKS5 reply", refused=False)
    assert connected().receive(first) == Refused("not a SOCKS5 reply", refused=False)


def test_not_a_username_password_status() -> None:
    handshake = handshake_for(WITH_CREDENTIALS, "198.18.2.2", 80)
    handshake.start()
    handshake.receive(USER_PASS)
    answer = handshake.receive(b"\x02\x00")
    assert isinstance(answer, Refused) and not answer.refused


@pytest.mark.parametrize("atyp", [0, 2, 5, 0xFF])
def test_an_unknown_address_type_in_the_reply_is_a_protocol_error(atyp: int) -> None:
    answer = connected().receive(bytes((5, 0, 0, atyp, 0)))
    assert answer == Refused(f"SOCKS5: unknown address type {atyp} in the reply", refused=False)


def test_bytes_after_the_method_selection_are_a_protocol_error() -> None:
    handshake = handshake_for(PROXY, "198.18.2.2", 80)
    handshake.start()
    answer = handshake.receive(NO_AUTH + REPLY_V4)
    assert answer == Refused("SOCKS5: bytes after the method selection", refused=False)


def test_bytes_after_the_auth_status_are_a_protocol_error() -> None:
    handshake = handshake_for(WITH_CREDENTIALS, "198.18.2.2", 80)
    handshake.start()
    handshake.receive(USER_PASS)
    answer = handshake.receive(AUTH_OK + REPLY_V4)
    assert answer == Refused("SOCKS5: bytes after the authentication status", refused=False)


@pytest.mark.parametrize("final", [REPLY_V4, b"\x05\x05"])
def test_after_the_end_nothing_more_is_read(final: bytes) -> None:
    handshake = connected()
    assert handshake.receive(final) is not NEED_MORE
    answer = handshake.receive(REPLY_V4)
    assert isinstance(answer, Refused) and not answer.refused


def test_empty_reads_change_nothing() -> None:
    handshake = connected()
    assert handshake.receive(b"") is NEED_MORE
    assert handshake.receive(REPLY_V4) == Established()


# --- replies cut anywhere, leftover, lying lengths ------------------------------------------


@pytest.mark.parametrize("kind", REPLIES)
def test_every_proper_prefix_of_a_reply_needs_more(kind: str) -> None:
    reply = REPLIES[kind]
    for end in range(len(reply)):
        assert connected().receive(reply[:end]) is NEED_MORE, end
    assert connected().receive(reply) == Established()


@pytest.mark.parametrize("kind", REPLIES)
@pytest.mark.parametrize("tail", [b"", b"SSH-2.0-OpenSSH_9.2\r\n", b"\x05\x00\x00\x01" * 8])
def test_a_reply_cut_at_every_offset_gives_the_same_answer(kind: str, tail: bytes) -> None:
    data = REPLIES[kind] + tail
    assert connected().receive(data) == Established(tail)
    for cut in range(len(data) + 1):
        answer, rest = feed(connected(), data, [cut])
        assert isinstance(answer, Established), cut
        assert answer.leftover + rest == tail, cut
    answer, rest = feed(connected(), data, list(range(len(data))))  # byte by byte
    assert answer == Established() and rest == tail


@settings(max_examples=200)
@given(kind=st.sampled_from(sorted(REPLIES)), tail=st.binary(max_size=64), data=st.data())
def test_any_chunking_gives_the_same_answer_and_keeps_the_leftover(
    kind: str, tail: bytes, data: st.DataObject
) -> None:
    reply = REPLIES[kind] + tail
    cuts = data.draw(st.lists(st.integers(0, len(reply)), max_size=16))
    answer, rest = feed(connected(), reply, cuts)
    assert isinstance(answer, Established)
    assert answer.leftover + rest == tail


def test_a_name_length_that_lies_waits_for_the_whole_name() -> None:
    handshake = connected()
    assert handshake.receive(b"\x05\x00\x00\x03\xff" + b"a" * 200) is NEED_MORE
    assert handshake.receive(b"a" * 55 + b"\x00\x50" + b"after") == Established(b"after")


def test_a_zero_length_bound_name_is_seven_bytes() -> None:
    assert connected().receive(b"\x05\x00\x00\x03\x00\x00\x00rest") == Established(b"rest")


# --- what cannot be sent -----------------------------------------------------------------------


def test_a_name_of_255_bytes_is_sent_and_256_refused_before_connecting() -> None:
    name = ".".join(["a" * 63] * 4)  # 255 bytes
    handshake = handshake_for(PROXY, name, 443)
    handshake.start()
    request = handshake.receive(NO_AUTH)
    assert isinstance(request, Send) and request.data[4] == 255 and len(request.data) == 5 + 255 + 2
    with pytest.raises(ValueError, match="more than 255"):
        handshake_for(PROXY, name + "a", 443)


@pytest.mark.parametrize(
    "host",
    ["", "a b", "evil\r\nHost: x", "a\x00b", "[2001:db8::1]", "fe80::1%eth0", "bücher.example",
     "a..b", ".a", "a/b"],
)  # fmt: skip
def test_a_host_that_is_no_address_or_name_is_refused_before_connecting(host: str) -> None:
    with pytest.raises(ValueError):
        handshake_for(PROXY, host, 80)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_a_port_out_of_range_is_refused_before_connecting(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        handshake_for(PROXY, "198.18.2.2", port)


@pytest.mark.parametrize(
    ("username", "password"), [("u" * 256, "p"), ("u", "p" * 256), ("ü" * 128, "p"), ("", "p")]
)
def test_credentials_socks5_cannot_carry_are_refused_at_construction(
    username: str, password: str
) -> None:
    proxy = UpstreamProxy("socks5", HostPort("198.18.2.2", 1080), username, password)
    with pytest.raises(ValueError, match="RFC 1929"):
        handshake_for(proxy, "198.18.2.2", 80)


def test_credentials_of_255_bytes_are_sent() -> None:
    proxy = UpstreamProxy("socks5", HostPort("198.18.2.2", 1080), "u" * 255, "p" * 255)
    handshake = handshake_for(proxy, "198.18.2.2", 80)
    handshake.start()
    assert handshake.receive(USER_PASS) == Send(b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255)


def test_an_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="scheme"):
        handshake_for(UpstreamProxy("socks4", HostPort("198.18.2.2", 1080)), "198.18.2.2", 80)


def test_handshake_for_gives_a_socks5_handshake() -> None:
    assert isinstance(handshake_for(PROXY, "198.18.2.2", 80), Socks5Handshake)


# --- random bytes ------------------------------------------------------------------------------


def drive(handshake: ProxyHandshake, chunks: list[bytes]) -> list[Answer]:
    """Feed every chunk, as the engine would, until a final answer; return all answers."""
    answers: list[Answer] = []
    for chunk in chunks:
        answer = handshake.receive(chunk)
        answers.append(answer)
        check_detail(answer)
        assert isinstance(answer, Send | Established | Refused | NeedMore)
        if isinstance(answer, Established | Refused):
            break
    return answers


@settings(max_examples=500)
@given(
    proxy=st.sampled_from([PROXY, WITH_CREDENTIALS]),
    chunks=st.lists(st.binary(max_size=40), max_size=8),
)
def test_random_bytes_never_raise(proxy: UpstreamProxy, chunks: list[bytes]) -> None:
    handshake = handshake_for(proxy, "www.example.test", 443)
    handshake.start()
    drive(handshake, chunks)


@settings(max_examples=300)
@given(
    prefix=st.sampled_from([b"", b"\x05", b"\x05\x00", b"\x05\x00\x00"]),
    rest=st.binary(max_size=64),
)
def test_random_connect_replies_never_raise(prefix: bytes, rest: bytes) -> None:
    answers = drive(connected(), [prefix + rest])
    assert isinstance(answers[-1], Established | Refused | NeedMore)


@settings(max_examples=300)
@given(data=st.binary(min_size=1, max_size=64))
def test_random_replies_end_in_need_more_or_refused_unless_they_begin_like_socks5(
    data: bytes,
) -> None:
    answer = connected().receive(data)
    if data[0] != 5:
        assert answer == Refused("not a SOCKS5 reply", refused=False)
    else:
        assert isinstance(answer, NeedMore | Refused | Established)
