from __future__ import annotations

from tproxy.core.endpoint import IPAddress, parse_endpoint
from tproxy.interception.self_connect import SelfConnectGuard

LOCAL = {"198.18.1.1", "127.0.0.1", "2001:db8:1::1", "::1"}


def _is_local(ip: IPAddress) -> bool:
    return str(ip) in LOCAL


def _guard(*listen: str) -> SelfConnectGuard:
    return SelfConnectGuard([parse_endpoint(e) for e in listen], _is_local)


def _at(text: str) -> tuple[str, int]:
    return parse_endpoint(text).sockaddr


def test_wildcard_listener_refuses_any_local_address_on_its_port() -> None:
    guard = _guard("0.0.0.0:1800", "[::]:1800")
    assert guard.is_self(_at("198.18.1.1:1800"))
    assert guard.is_self(_at("127.0.0.1:1800"))
    assert guard.is_self(_at("[2001:db8:1::1]:1800"))


def test_other_ports_and_foreign_addresses_pass() -> None:
    guard = _guard("0.0.0.0:1800", "[::]:1800")
    assert not guard.is_self(_at("198.18.1.1:80"))
    assert not guard.is_self(_at("198.18.2.2:1800"))
    assert not guard.is_self(_at("[2001:db8:2::2]:1800"))


def test_specific_listener_matches_itself_only() -> None:
    guard = _guard("127.0.0.1:1800")
    assert guard.is_self(_at("127.0.0.1:1800"))
    assert not guard.is_self(_at("198.18.1.1:1800"))
    assert not guard.is_self(_at("[::1]:1800"))
