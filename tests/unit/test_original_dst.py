from __future__ import annotations

import socket
import struct

import pytest

from tproxy.core.config import ConfigError, InterceptMode, build_config, parse_config_file
from tproxy.interception.original_dst import (
    destination_lookup,
    parse_sockaddr,
    redirect_destination,
)


def test_parse_sockaddr_in_as_the_kernel_returns_it() -> None:
    raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", 8080)
    raw += socket.inet_pton(socket.AF_INET, "198.18.2.2") + bytes(8)
    assert parse_sockaddr(raw) == ("198.18.2.2", 8080)


def test_parse_sockaddr_in6_as_the_kernel_returns_it() -> None:
    raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!H", 443) + bytes(4)
    raw += socket.inet_pton(socket.AF_INET6, "2001:db8:2::2") + bytes(4)
    assert parse_sockaddr(raw) == ("2001:db8:2::2", 443)


@pytest.mark.parametrize("raw", [b"", b"\x02\x00", bytes(16), struct.pack("=H", 10) + bytes(14)])
def test_parse_sockaddr_refuses_what_is_not_an_address(raw: bytes) -> None:
    with pytest.raises(ValueError):
        parse_sockaddr(raw)


def test_a_connection_that_was_not_redirected_has_no_original_destination() -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()),
    ):
        accepted, _ = server.accept()
        with accepted, pytest.raises(OSError):
            redirect_destination(accepted)


def test_each_mode_has_its_lookup() -> None:
    assert destination_lookup(InterceptMode.TPROXY) is socket.socket.getsockname
    assert destination_lookup(InterceptMode.REDIRECT) is redirect_destination


def test_spoofing_in_redirect_mode_is_an_error_not_a_no_op() -> None:
    with pytest.raises(ConfigError, match="not available in redirect mode"):
        build_config({}, {"mode": InterceptMode.REDIRECT, "spoof_source": True})
    file_values = parse_config_file('mode = "redirect"\nspoof_source = true\n')
    with pytest.raises(ConfigError, match="--mode tproxy"):
        build_config(file_values, {})
    with pytest.raises(ConfigError, match="mode must be"):
        parse_config_file('mode = "nat"\n')
