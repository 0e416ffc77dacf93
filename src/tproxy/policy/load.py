"""Reading a policy file for the proxy: the file, its host names resolved, compiled.

The edge of the policy package (file and DNS I/O); `model` and `decide` stay pure. Host names in
`to` and `via` are resolved here, once per load (at start and on every SIGHUP): a session never
waits for DNS, and a name that does not resolve fails the load with the rule's name, like any
other error in the file (the running policy is then kept).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path

from tproxy.core.options import ConfigError
from tproxy.policy.matcher import Matcher
from tproxy.policy.model import HostPort, Policy, parse_policy
from tproxy.upstream.handshake import handshake_for

Resolver = Callable[[str], str]
"""A host name to one IP address (text); raises OSError when it does not resolve."""


def resolve_host(name: str) -> str:
    """The first address `getaddrinfo` gives for `name` (the system's order: IPv6 first where it
    is preferred)."""
    infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    return str(infos[0][4][0])


def _resolved(address: HostPort, where: str, resolve: Resolver) -> HostPort:
    try:
        ipaddress.ip_address(address.host)
        return address
    except ValueError:
        pass
    try:
        return HostPort(resolve(address.host), address.port)
    except (OSError, UnicodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"{where}: cannot resolve {address.host!r}: {why}") from None


def resolve_names(policy: Policy, resolve: Resolver = resolve_host) -> Policy:
    """`policy` with every host name in `to` and `via` replaced by an address.

    Raises:
        ConfigError: a name does not resolve (the message names the rule and key).
    """
    rules = []
    for index, written in enumerate(policy.rules):
        where, rule = f"rule[{index}] ({written.name})", written
        if rule.to is not None:
            rule = dataclasses.replace(rule, to=_resolved(rule.to, f"{where}.to", resolve))
        if rule.via is not None:
            address = _resolved(rule.via.address, f"{where}.via", resolve)
            rule = dataclasses.replace(rule, via=dataclasses.replace(rule.via, address=address))
        rules.append(rule)
    return dataclasses.replace(policy, rules=tuple(rules))


def read_policy(path: str) -> Policy:
    """The policy in a file, as written (names not resolved); raises ConfigError naming the
    file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read policy {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read policy {path}: not UTF-8 text") from None
    try:
        policy = parse_policy(text)
        check_upstream_proxies(policy)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return policy


def check_upstream_proxies(policy: Policy) -> None:
    """Refuse `via` proxies whose credentials their protocol cannot carry (SOCKS5: over 255
    bytes; HTTP Basic: a username with a colon), which would otherwise fail every session.

    Raises:
        ConfigError: naming the rule.
    """
    for index, rule in enumerate(policy.rules):
        if rule.via is None:
            continue
        try:
            handshake_for(rule.via, "192.0.2.1", 80)  # any destination: the credentials matter
        except ValueError as exc:
            raise ConfigError(f"rule[{index}] ({rule.name}).via: {exc}") from None


def load_matcher(path: str, resolve: Resolver = resolve_host) -> Matcher:
    """What the proxy runs with: the file read, its names resolved, compiled.

    Raises:
        ConfigError: unreadable, invalid, or a name that does not resolve.
    """
    try:
        return Matcher(resolve_names(read_policy(path), resolve))
    except ConfigError as exc:
        if str(exc).startswith((path, "cannot read")):
            raise
        raise ConfigError(f"{path}: {exc}") from None
