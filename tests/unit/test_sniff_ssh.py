"""The SSH identification-line sniffer: real banners cut at every offset, line ends, bounds,
other protocols and random bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.sniffers.facts import NEED_MORE, NeedMore, NotThis, SshBanner
from tproxy.sniffers.ssh import MAX_BANNER_BYTES, sniff_ssh

BANNERS = {
    b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n": "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3",
    b"SSH-2.0-PuTTY_Release_0.81\r\n": "SSH-2.0-PuTTY_Release_0.81",
    b"SSH-2.0-Go\r\n": "SSH-2.0-Go",
    b"SSH-2.0-dropbear_2022.83\n": "SSH-2.0-dropbear_2022.83",  # a bare LF (RFC 4253 4.2)
    b"SSH-1.99-OpenSSH_3.9p1\r\n": "SSH-1.99-OpenSSH_3.9p1",
    b"SSH-2.0-evil\x1b[31m\x00\\\r\n": "SSH-2.0-evil\\x1b[31m\\x00\\x5c",
}


@pytest.mark.parametrize("line", BANNERS)
def test_every_prefix_needs_more_and_the_line_gives_the_banner(line: bytes) -> None:
    for end in range(len(line)):
        assert sniff_ssh(line[:end]) is NEED_MORE, end
    assert sniff_ssh(line) == SshBanner(BANNERS[line])


@pytest.mark.parametrize("line", BANNERS)
@given(tail=st.binary(max_size=64))
def test_the_key_exchange_after_the_line_changes_nothing(line: bytes, tail: bytes) -> None:
    assert sniff_ssh(line + tail) == SshBanner(BANNERS[line])


def test_a_line_of_255_bytes_is_read_and_one_of_256_is_not() -> None:
    prefix = b"SSH-2.0-"
    longest = prefix + b"v" * (MAX_BANNER_BYTES - len(prefix) - 2) + b"\r\n"
    assert len(longest) == MAX_BANNER_BYTES
    assert sniff_ssh(longest) == SshBanner(longest[:-2].decode())
    too_long = prefix + b"v" * (MAX_BANNER_BYTES - len(prefix) - 1) + b"\r\n"
    assert sniff_ssh(too_long[: MAX_BANNER_BYTES - 1]) is NEED_MORE
    assert sniff_ssh(too_long) == NotThis("line too long")


def test_an_escaped_banner_stays_bounded() -> None:
    line = b"SSH-2.0-" + b"\xff" * 240 + b"\r\n"
    answer = sniff_ssh(line)
    assert isinstance(answer, SshBanner)
    assert len(answer.banner) <= MAX_BANNER_BYTES
    assert answer.banner.startswith("SSH-2.0-\\xff") and answer.banner.endswith("\\xff")


@pytest.mark.parametrize(
    "start",
    [
        b"\x16",  # a TLS record
        b"G",  # HTTP
        b"s",
        b"SSH-1.5-",  # SSH 1 only
        b"SSH-2.1",
        b"SSH-2.0 ",
        b"\r\nSSH-2.0-x\r\n",  # only a server may send lines before its identification
    ],
)
def test_anything_else_is_not_this_at_once(start: bytes) -> None:
    assert isinstance(sniff_ssh(start), NotThis)


@given(st.binary(max_size=300))
def test_random_bytes_never_raise(data: bytes) -> None:
    answer = sniff_ssh(data)
    assert isinstance(answer, SshBanner | NeedMore | NotThis)
    if isinstance(answer, SshBanner):
        assert answer.banner.isascii() and answer.banner.isprintable()
        assert len(answer.banner) <= MAX_BANNER_BYTES
