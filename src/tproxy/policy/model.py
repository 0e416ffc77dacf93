"""The policy file: its TOML text parsed into a validated, immutable `Policy`; pure, no I/O.

Every key is read by an `OptionSpec` row through `parse_table` (the same rows and messages as the
proxy's own config file). The rules are not read through `table_list`: its messages name a rule
by index only, and an operator finds a rule by its name, so each rule's table is checked here
with `rule[INDEX] (NAME).` in front of its keys. Checks that tie keys together (`to` only with
`redirect`, `via` and `remote_name` only with `via`) run once a rule's keys are read.

The match key on "the SNI or the Host" is `sni_or_host`: issue 10 spells it `name`, but `name` is
already the rule's own name (required), and one TOML table cannot hold both.

Host names in `to` and `via` are kept as given: resolving them is I/O, done when the policy is
loaded (and reloaded) by the engine, not here.
"""

from __future__ import annotations

import enum
import ipaddress
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from tproxy.core.endpoint import EndpointError, parse_port
from tproxy.core.options import (
    SECONDS,
    SWITCH,
    ConfigError,
    OptionSpec,
    ValueType,
    choice,
    parse_table,
)

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_SNIFF_TIMEOUT_S = 60.0
"""The longest `sniff_timeout_s`: a waiting session holds its client's connection (and its
place in the sniff deadlines) for that long."""

PROTOS = ("tls", "http", "ssh", "unknown", "silent")
"""The `proto` values a rule may match (the sniffers' words)."""


class Action(enum.Enum):
    """What a verdict does with a session."""

    ALLOW = "allow"
    RESET = "reset"
    REDIRECT = "redirect"
    VIA = "via"


class TLSMode(enum.Enum):
    """What a rule does with a TLS session: decrypt it (`intercept`: TLS with the client under a
    forged certificate, TLS of our own to the upstream) or say explicitly that it stays encrypted
    (`passthrough`, which is also what a rule without `tls` does)."""

    INTERCEPT = "intercept"
    PASSTHROUGH = "passthrough"


class Default(enum.Enum):
    """What happens to a session no rule matches."""

    ALLOW = "allow"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class HostPort:
    """A `to` target or an upstream proxy's address: an IP literal or a host name (not resolved
    yet), and a port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class UpstreamProxy:
    """A SOCKS5 or HTTP CONNECT proxy that a `via` rule connects through."""

    scheme: str
    address: HostPort
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        """The URL without the password (it is logged)."""
        user = f"{self.username}@" if self.username is not None else ""
        return f"{self.scheme}://{user}{self.address}"


@dataclass(frozen=True, slots=True)
class NamePattern:
    """A name as rules write it: exact (`example.com`) or a suffix glob (`*.example.com`: any
    name under example.com, not example.com itself). Lower case, without a trailing dot."""

    name: str
    glob: bool = False

    def matches(self, name: str) -> bool:
        """Whether `name` (already lower case, without a trailing dot) is one this pattern names."""
        if self.glob:
            return name.endswith(self.name) and len(name) > len(self.name)
        return name == self.name

    def __str__(self) -> str:
        return "*" + self.name if self.glob else self.name


@dataclass(frozen=True, slots=True)
class PortRange:
    """Ports `first` to `last`, both included."""

    first: int
    last: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.first <= port <= self.last

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True, slots=True)
class Rule:
    """One `[[rule]]`: match keys (None: not given; each a non-empty tuple matching if any item
    does; all the given keys must match) and the action with its arguments.

    Args:
        name: unique in the policy; logged on every session the rule decides.
        action: what a matching session gets.
        client, dst: networks the client's address / the original destination must be in.
        ports: ranges the original destination port must be in.
        proto: sniffed protocols (`PROTOS`).
        sni, host, name_any: name patterns for the TLS SNI, the HTTP Host, either of them
            (file key `sni_or_host`).
        to: where `redirect` connects instead.
        via: the upstream proxy `via` connects through.
        remote_name: `via` asks the upstream proxy for the sniffed name, not the IP.
        capture: capture the sessions it decides (`tproxy.capture`); any action that connects.
        tls: `intercept` or `passthrough` (None: not given, which leaves TLS as it is, as
            `passthrough` does); any action that connects.
        upstream_verify: with `intercept`, verify the upstream's certificate (False: accept any,
            logged on every session).
        passthrough_on_client_reject: with `intercept`, a client that rejects the forged
            certificate has its next connections to that name passed through for a while.
    """

    name: str
    action: Action
    client: tuple[IPNetwork, ...] | None = None
    dst: tuple[IPNetwork, ...] | None = None
    ports: tuple[PortRange, ...] | None = None
    proto: tuple[str, ...] | None = None
    sni: tuple[NamePattern, ...] | None = None
    host: tuple[NamePattern, ...] | None = None
    name_any: tuple[NamePattern, ...] | None = None
    to: HostPort | None = None
    via: UpstreamProxy | None = None
    remote_name: bool = False
    capture: bool = False
    tls: TLSMode | None = None
    upstream_verify: bool = True
    passthrough_on_client_reject: bool = False

    @property
    def intercepts(self) -> bool:
        """Whether the rule decrypts the TLS sessions it decides (`tls = "intercept"`)."""
        return self.tls is TLSMode.INTERCEPT

    @property
    def needs_facts(self) -> bool:
        """Whether the rule needs what sniffing finds: it matches on it (proto, sni, host,
        sni_or_host), asks its upstream proxy for the sniffed name (remote_name), or intercepts
        TLS (the ClientHello's SNI and ALPN are what the upstream is asked for)."""
        return (
            self.remote_name
            or self.tls is TLSMode.INTERCEPT
            or self.proto is not None
            or self.sni is not None
            or self.host is not None
            or self.name_any is not None
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """A whole policy file: rules in order (the first match decides) and the default."""

    rules: tuple[Rule, ...] = ()
    default: Default = Default.ALLOW
    sniff_timeout_s: float = 1.0

    @property
    def intercepting_rules(self) -> tuple[str, ...]:
        """The names of the rules with `tls = "intercept"` (they need a CA: `--ca`)."""
        return tuple(rule.name for rule in self.rules if rule.intercepts)


# --- value types ---------------------------------------------------------------------------


def _list_of(key: str, value: Any, kinds: tuple[type, ...], what: str) -> list[Any]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, kinds) and not isinstance(v, bool) for v in value)
    ):
        raise ConfigError(f"{key} must be a non-empty list of {what}")
    return value


def _networks_from_file(key: str, value: Any) -> tuple[IPNetwork, ...]:
    networks = []
    for text in _list_of(key, value, (str,), 'CIDR strings (e.g. "10.0.0.0/8")'):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"{key}: {text!r} is not an IPv4 or IPv6 network (CIDR)") from None
    return tuple(networks)


def _port_range(key: str, item: int | str) -> PortRange:
    try:
        if isinstance(item, int):
            if not 1 <= item <= 65535:
                raise EndpointError(f"port {item} out of range: expected 1 to 65535")
            return PortRange(item, item)
        first_text, sep, last_text = item.partition("-")
        first = parse_port(first_text.strip())
        last = parse_port(last_text.strip()) if sep else first
    except EndpointError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if last < first:
        raise ConfigError(f"{key}: port range {item!r} ends before it starts")
    return PortRange(first, last)


def _ports_from_file(key: str, value: Any) -> tuple[PortRange, ...]:
    items = _list_of(key, value, (int, str), 'ports (443) or port ranges ("8000-8100")')
    return tuple(_port_range(key, item) for item in items)


def _protos_from_file(key: str, value: Any) -> tuple[str, ...]:
    protos = _list_of(key, value, (str,), "protocols")
    for proto in protos:
        if proto not in PROTOS:
            raise ConfigError(f"{key}: unknown protocol {proto!r} (known: {', '.join(PROTOS)})")
    return tuple(protos)


def normalize_name(name: str) -> str:
    """A name as rules compare it: lower case, without a trailing dot."""
    return name.lower().removesuffix(".")


def _pattern(key: str, text: str) -> NamePattern:
    name = normalize_name(text)
    glob = name.startswith("*.")
    bare = name[1:] if glob else name
    labels = bare[1:].split(".") if glob else bare.split(".")
    if (
        not bare
        or "*" in bare
        or any(not label for label in labels)
        or any(c.isspace() for c in bare)
    ):
        raise ConfigError(f"{key}: {text!r} is not a name or a *.suffix glob")
    return NamePattern(bare, glob)


def _names_from_file(key: str, value: Any) -> tuple[NamePattern, ...]:
    names = _list_of(key, value, (str,), 'names ("example.com" or "*.example.com")')
    return tuple(_pattern(key, name) for name in names)


def parse_host_port(text: str) -> HostPort:
    """`HOST:PORT` or `[IPv6]:PORT`, HOST an IP literal or a name (resolved later, not here).

    Raises:
        ConfigError: not of that form, or the port is off (the message does not name the key).
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        valid = bool(sep) and ":" in host
        if valid:
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                valid = False
    else:
        host, sep, port_text = text.rpartition(":")
        valid = bool(sep) and ":" not in host
    if not valid or not host or any(c.isspace() or c in "/@[]" for c in host):
        raise ConfigError(f"{text!r} is not HOST:PORT or [IPv6]:PORT")
    try:
        return HostPort(host, parse_port(port_text))
    except EndpointError as exc:
        raise ConfigError(f"{text!r}: {exc}") from None


def _to_from_file(key: str, value: Any) -> HostPort:
    if not isinstance(value, str):
        raise ConfigError(f'{key} must be a "HOST:PORT" string')
    try:
        return parse_host_port(value)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


VIA_SCHEMES = ("socks5", "http")


def parse_upstream_proxy(text: str) -> UpstreamProxy:
    """`socks5://[user:pass@]host:port` or `http://[user:pass@]host:port` (HTTP CONNECT).

    Raises:
        ConfigError: another scheme, or not of that form (the message does not name the key).
    """
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise ConfigError(f"{text!r} is not a proxy URL (socks5://HOST:PORT or http://HOST:PORT)")
    if scheme.lower() not in VIA_SCHEMES:
        raise ConfigError(f"unknown proxy scheme {scheme!r} in {text!r} (known: socks5, http)")
    userinfo, at, address = rest.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        if not colon or not user:
            raise ConfigError(f"{scheme}://...: credentials must be written user:password@")
        username, password = unquote(user), unquote(secret)
    address = address.removesuffix("/")
    return UpstreamProxy(scheme.lower(), parse_host_port(address), username, password)


def _via_from_file(key: str, value: Any) -> UpstreamProxy:
    if not isinstance(value, str):
        raise ConfigError(f'{key} must be a "socks5://HOST:PORT" or "http://HOST:PORT" string')
    try:
        return parse_upstream_proxy(value)
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _rule_name_from_file(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key} must be a non-empty string")
    if not value.isprintable():  # it is in every message about the rule, and in the log
        raise ConfigError(f"{key} must be printable, on one line")
    return value


def _rules_placeholder(key: str, value: Any) -> Any:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{key} must be a list of tables ([[rule]])")
    return value


def _row(name: str, kind: ValueType, help: str, key: str | None = None, **kw: Any) -> OptionSpec:
    return OptionSpec(name=name, kind=kind, help=help, file_key=key or name, **kw)


RULE_OPTIONS = (
    _row("name", ValueType(_rule_name_from_file), "unique; logged on sessions it decides",
         required=True),
    _row("action", choice(Action), "allow, reset, redirect or via", required=True),
    _row("client", ValueType(_networks_from_file), "the client's address is in one of these"),
    _row("dst", ValueType(_networks_from_file), "the original destination is in one of these"),
    _row("ports", ValueType(_ports_from_file), "the original destination port is one of these"),
    _row("proto", ValueType(_protos_from_file), "the sniffed protocol is one of these"),
    _row("sni", ValueType(_names_from_file), "the TLS server name is one of these"),
    _row("host", ValueType(_names_from_file), "the HTTP Host is one of these"),
    _row("name_any", ValueType(_names_from_file), "the SNI or the Host is one of these",
         "sni_or_host"),
    _row("to", ValueType(_to_from_file), "redirect: connect here instead"),
    _row("via", ValueType(_via_from_file), "via: the upstream proxy's URL"),
    _row("remote_name", SWITCH, "via: ask the upstream proxy for the sniffed name"),
    _row("capture", SWITCH, "capture the sessions it decides (needs --capture-dir)"),
    _row("tls", choice(TLSMode), "intercept (decrypt, needs --ca) or passthrough (leave "
         "encrypted)"),
    _row("upstream_verify", SWITCH, "intercept: verify the upstream's certificate (default "
         "true)"),
    _row("passthrough_on_client_reject", SWITCH, "intercept: pass the next connections to a "
         "name through when the client rejects our certificate"),
)  # fmt: skip
"""The keys of one `[[rule]]` table."""

POLICY_OPTIONS = (
    _row("default", choice(Default), "what happens when no rule matches"),
    _row("sniff_timeout_s", SECONDS, "longest wait for the client's first bytes"),
    _row("rules", ValueType(_rules_placeholder), "the rules, in order", "rule"),
)
"""The top-level keys of a policy file."""


def _rule_from_table(index: int, raw: Mapping[str, Any]) -> Rule:
    name = raw.get("name")
    if isinstance(name, str):
        where = f"rule[{index}] ({name if name.isprintable() else ascii(name)})."
    else:
        where = f"rule[{index}]."
    values = parse_table(RULE_OPTIONS, raw, where)
    action = values["action"]
    if action is Action.REDIRECT and "to" not in values:
        raise ConfigError(f'{where}to is required with action = "redirect"')
    if action is not Action.REDIRECT and "to" in values:
        raise ConfigError(f'{where}to is only for action = "redirect"')
    if action is Action.VIA and "via" not in values:
        raise ConfigError(f'{where}via is required with action = "via"')
    if action is not Action.VIA:
        for key in ("via", "remote_name"):
            if key in values:
                raise ConfigError(f'{where}{key} is only for action = "via"')
    if action is Action.RESET and values.get("capture"):
        raise ConfigError(f"{where}capture is only for an action that connects: a reset "
                          "relays nothing to capture")  # fmt: skip
    if action is Action.RESET and "tls" in values:
        raise ConfigError(f"{where}tls is only for an action that connects: a reset relays no "
                          "TLS to intercept or pass through")  # fmt: skip
    if values.get("tls") is not TLSMode.INTERCEPT:
        for key in ("upstream_verify", "passthrough_on_client_reject"):
            if key in values:
                raise ConfigError(f'{where}{key} is only for tls = "intercept"')
    return Rule(**values)


def parse_policy(text: str) -> Policy:
    """The policy in the TOML text of a policy file.

    Raises:
        ConfigError: not TOML, an unknown key, a value of the wrong kind, a duplicate rule name,
            or keys that do not go together; the message names the rule (index and name) and key.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    values = parse_table(POLICY_OPTIONS, raw)
    if values.get("sniff_timeout_s", 0) > MAX_SNIFF_TIMEOUT_S:
        raise ConfigError(
            f"sniff_timeout_s must be at most {MAX_SNIFF_TIMEOUT_S:g} s: a client that sends "
            "nothing holds its connection that long before anything connects"
        )
    rules = tuple(_rule_from_table(i, table) for i, table in enumerate(values.pop("rules", [])))
    seen: dict[str, int] = {}
    for index, rule in enumerate(rules):
        if rule.name in seen:
            raise ConfigError(
                f"rule[{index}] ({rule.name}).name is a duplicate of rule[{seen[rule.name]}]'s"
            )
        seen[rule.name] = index
    return Policy(rules=rules, **values)
