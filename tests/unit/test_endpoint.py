from __future__ import annotations

import ipaddress
import re

import pytest

from tproxy.core.endpoint import Endpoint, EndpointError, parse_endpoint, parse_port


@pytest.mark.parametrize(
    ("text", "printed"),
    [
        ("0.0.0.0:1800", "0.0.0.0:1800"),
        ("198.18.1.2:80", "198.18.1.2:80"),
        ("[::]:1800", "[::]:1800"),
        ("[2001:db8::1]:443", "[2001:db8::1]:443"),
        ("[2001:0db8:0::1]:443", "[2001:db8::1]:443"),
    ],
)
def test_parse_and_print_round_trip(text: str, printed: str) -> None:
    endpoint = parse_endpoint(text)
    assert str(endpoint) == printed
    assert parse_endpoint(str(endpoint)) == endpoint


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("1.2.3:80", "is not an IP address"),
        ("example.com:80", "is not an IP address"),
        ("1.2.3.4", "expected HOST:PORT"),
        (":80", "expected HOST:PORT"),
        ("2001:db8::1:80", "write IPv6 addresses as [IPv6]:PORT"),
        ("[2001:db8::1]", "expected [IPv6]:PORT"),
        ("1.2.3.4:0", "out of range"),
        ("1.2.3.4:65536", "out of range"),
        ("1.2.3.4:http", "invalid port"),
        ("[1.2.3.4]:80", "brackets are for IPv6 only"),
    ],
)
def test_bad_endpoints_are_one_sentence(text: str, fragment: str) -> None:
    with pytest.raises(EndpointError, match=re.escape(fragment)):
        parse_endpoint(text)


def test_ipv4_mapped_addresses_log_as_ipv4() -> None:
    endpoint = Endpoint.from_sockaddr(("::ffff:198.18.1.2", 5000, 0, 0))
    assert endpoint == Endpoint(ipaddress.ip_address("198.18.1.2"), 5000)
    assert str(endpoint) == "198.18.1.2:5000"


def test_scope_ids_are_dropped() -> None:
    assert str(Endpoint.from_sockaddr(("fe80::1%eth0", 80, 0, 2))) == "[fe80::1]:80"


def test_parse_port_bounds() -> None:
    assert parse_port("1") == 1
    assert parse_port("65535") == 65535
    with pytest.raises(EndpointError):
        parse_port("-1")
