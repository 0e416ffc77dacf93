"""What `tproxy rules apply` sets up, as a validated model (no I/O)."""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from tproxy.core.config import (
    DEFAULT_DIVERT_MARK,
    DEFAULT_PROXY_MARK,
    DEFAULT_PROXY_PORT,
    InterceptMode,
)
from tproxy.core.endpoint import EndpointError, parse_port

# Our own nftables table. Not "tproxy": that is an nft keyword and would need quoting everywhere.
TABLE_NAME = "tproxy_rules"
DEFAULT_ROUTE_TABLE = 100
# The ip rule's priority: before the main table (32766), after anything an operator put first.
DEFAULT_RULE_PRIORITY = 32000
# The routing protocol number on our ip rules and routes (rtnetlink's rtm_protocol; numbers above
# RTPROT_STATIC are free for daemons). It is how `remove` finds exactly what `apply` created.
RTPROT_TPROXY = 201
# What the kernel accepts as an interface name (dev_valid_name): up to 15 bytes, no '/', ':' or
# white space, not "." or "..". The quote is ours: the name goes into the ruleset in quotes.
_IFNAME = re.compile(r'[^/:\s"]{1,15}')


class RulesError(ValueError):
    """Invalid rules input; the message is one sentence for the command line."""


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WhenDown(enum.Enum):
    """What diverted traffic does while no proxy listens on the proxy port.

    nft's `tproxy` statement lets a packet go on when no socket matches, so without a rule after it
    a stopped proxy is silently routed around (fail-open). RESET (the default) rejects new
    connections to the diverted ports with a TCP reset instead: for an interception tool, traffic
    that must be inspected or logged never leaves uninspected, and clients fail at once instead of
    waiting for a timeout.
    """

    RESET = "reset"
    PASS = "pass"


@dataclass(frozen=True)
class BridgeInfo:
    """What bridge mode needs to know about a bridge: its MAC, its ports and its addresses."""

    name: str
    mac: str
    ports: tuple[str, ...]
    ipv4: tuple[str, ...] = ()
    ipv6: tuple[str, ...] = ()


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class RulesSpec:
    """The diversion to set up.

    Args:
        ports: destination ports diverted to the proxy.
        proxy_port: the port `tproxy run` listens on.
        divert_mark: the mark that sends diverted packets through the policy-routing table.
        proxy_mark: the mark on the proxy's own upstream sockets (`tproxy run --mark`).
        route_table: the routing table holding `local default dev lo`.
        rule_priority: the priority of the `fwmark -> table` ip rule.
        when_down: what diverted traffic does while no proxy listens.
        ipv6: whether to set up the IPv6 half of the policy routing.
        mode: TPROXY (the default) or REDIRECT (NAT; no policy routing, no spoofing).
        local: also divert connections that programs on this box open (the OUTPUT hook).
        bridge: divert the TCP that crosses this Linux bridge (bridge mode), not only routed TCP.
        exclude: networks never diverted (from or to them), nor QUIC-blocked; normalized by
            `normalize_networks` (sorted, IPv4 first, overlaps and neighbours merged), as nft
            refuses overlapping elements in an interval set.
        block_quic: reject UDP to the diverted ports (QUIC), so browsers fall back to TCP,
            where the proxy sees them.
    """

    ports: tuple[PortRange, ...]
    proxy_port: int = DEFAULT_PROXY_PORT
    divert_mark: int = DEFAULT_DIVERT_MARK
    proxy_mark: int = DEFAULT_PROXY_MARK
    route_table: int = DEFAULT_ROUTE_TABLE
    rule_priority: int = DEFAULT_RULE_PRIORITY
    when_down: WhenDown = WhenDown.RESET
    ipv6: bool = True
    mode: InterceptMode = InterceptMode.TPROXY
    local: bool = False
    bridge: str | None = None
    exclude: tuple[Network, ...] = field(default=())
    block_quic: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", normalize_networks(self.exclude))
        if not self.ports:
            raise RulesError("no ports to divert: give --ports, e.g. --ports 80,443")
        if self.divert_mark == self.proxy_mark:
            raise RulesError(
                f"the divert mark and the proxy mark are both {self.divert_mark:#x}: they must "
                "differ, or the proxy's own traffic would be diverted back to it"
            )
        for name, mark in (("divert mark", self.divert_mark), ("proxy mark", self.proxy_mark)):
            if not 1 <= mark <= 0xFFFFFFFF:
                raise RulesError(f"the {name} must be from 1 to 0xffffffff, not {mark}")
        if not 1 <= self.route_table <= 0xFFFFFFFF or self.route_table in (253, 254, 255):
            raise RulesError(
                f"routing table {self.route_table} is reserved or out of range: pick a free table "
                "number such as 100"
            )
        if self.bridge is not None and (
            not _IFNAME.fullmatch(self.bridge) or self.bridge in (".", "..")
        ):
            raise RulesError(f"{self.bridge!r} is not a valid interface name for --bridge")
        if self.mode is InterceptMode.REDIRECT:
            if self.when_down is WhenDown.PASS:
                raise RulesError(
                    "--when-down pass is not available with --mode redirect: a redirected "
                    "connection is refused by the kernel while no proxy listens"
                )
            if self.bridge is not None:
                raise RulesError(
                    "--bridge needs --mode tproxy: bridge mode connects to the server as the "
                    "client, which only TPROXY can do"
                )


def parse_ports(text: str) -> tuple[PortRange, ...]:
    """`80,443,8000-8100` into sorted, merged port ranges.

    Raises:
        RulesError: a part is not a port or a `first-last` range with first <= last.
    """
    ranges: list[PortRange] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            raise RulesError(f"invalid port list {text!r}: empty entry")
        first_text, dash, last_text = part.partition("-")
        try:
            first = parse_port(first_text.strip())
            last = parse_port(last_text.strip()) if dash else first
        except EndpointError as exc:
            raise RulesError(f"invalid port list {text!r}: {exc}") from None
        if first > last:
            raise RulesError(f"invalid port range {part!r}: the first port is above the last")
        ranges.append(PortRange(first, last))
    ranges.sort(key=lambda r: r.first)
    merged: list[PortRange] = [ranges[0]]
    for r in ranges[1:]:
        top = merged[-1]
        if r.first <= top.last + 1:
            merged[-1] = PortRange(top.first, max(top.last, r.last))
        else:
            merged.append(r)
    return tuple(merged)


def parse_network(text: str) -> Network:
    """`198.18.2.0/24`, `2001:db8:2::/64`, or a plain address (a /32 or /128), for `--exclude`.

    Strict: a network with host bits set (`198.18.2.1/24`) is refused, with the network it
    probably meant, instead of being widened to it. An exclusion lets traffic past the proxy
    uninspected, so a typo must not silently exclude 256 addresses when one was meant (or one
    when 256 were): the operator says which.

    Raises:
        RulesError: not an IPv4 or IPv6 address or network, or host bits are set.
    """
    part = text.strip()
    try:
        if "%" in part:  # an IPv6 zone (fe80::1%eth0): nft has no place for it
            raise ValueError(part)
        return ipaddress.ip_network(part)
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(part, strict=False)
        if "%" in part:
            raise ValueError(part)
    except ValueError:
        raise RulesError(
            f"invalid network {text!r}: give an address or ADDRESS/PREFIX, e.g. 198.18.2.0/24 "
            "or 2001:db8:2::/64"
        ) from None
    address = part.partition("/")[0]
    host = 32 if loose.version == 4 else 128
    raise RulesError(
        f"invalid network {text!r}: it has host bits set; did you mean {loose} (the network) "
        f"or {address}/{host} (the one address)?"
    )


def normalize_networks(networks: Iterable[Network]) -> tuple[Network, ...]:
    """`networks` sorted, IPv4 first, with overlapping and adjacent ones merged: what nft takes
    in one interval set (it refuses overlapping elements) and then lists back."""
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    merged: list[Network] = [*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6)]
    return tuple(merged)
