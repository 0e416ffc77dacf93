"""The policy compiled for the engine: the same verdicts as `decide`, in a few microseconds.

`decide` is the reference (readable, used by `tproxy policy explain`); it walks `ipaddress`
objects and costs about 0.7 µs per rule, which a 50-rule policy pays twice per sniffed session.
`Matcher` is built once per policy load and answers from plain integers and bit sets (bit i =
rule i), so a session's cost depends on the number of distinct prefix lengths in the policy,
not on the number of rules before the one that decides:

- addresses are (version, int) pairs, parsed from the socket's text without `ipaddress`;
- for `dst` and for `client`, per IP version, one table per prefix length used anywhere in the
  policy maps each network to the rules that name it: an address's rules are the union of one
  masked lookup per prefix length, plus the rules without that key (remembered per address, up
  to `ADDRESS_MEMO_MAX`);
- the port line is cut into intervals where the same rules allow the port (a rule without
  `ports` allows every port), each with its bit set (up to `PARTITION_MAX_RULES` rules; a bigger
  policy checks ports rule by rule);
- the rules whose addresses and port match are the AND of the three; the lowest decides, or the
  walk waits there for the sniffed facts: `first()` says where (`first_of()`, the same from
  the socket's address text, remembers its answers), and `resume()` (or `with_facts()`) goes on
  from there (the rules before it could not match) with the rules that `first()` left, ANDed
  with the rules
  the facts allow: per fact key, the rules without it, plus those it names -- one lookup for the
  protocol, and for a name one for the name itself and one per `.suffix` of it (a glob
  `*.example.com` is the suffix `.example.com`, and matches only names longer than it).
  The rules the facts allow depend on the facts alone, not on the session: they are remembered
  by the facts as sniffed (up to `FACTS_MEMO_MAX`), so a name seen before costs one lookup.

A property test drives `Matcher` and `decide` with random policies and sessions and requires
the same verdict.
"""

from __future__ import annotations

import bisect
import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from tproxy.policy.decide import SniffedFacts, Verdict, verdict_of
from tproxy.policy.model import Action, Default, NamePattern, Policy, Rule, normalize_name

Address = tuple[int, int]
"""An IP address as (version 4 or 6, its integer value)."""

# Per IP version: (mask, network values) per prefix length; None = key not given (matches all);
# an empty tuple = given, but nothing of this version (matches none).
_Nets = tuple[tuple[int, frozenset[int]], ...] | None
_Names = tuple[frozenset[str], tuple[str, ...]] | None

# The port partition holds up to (2 × port ranges + 1) intervals, each a bit set of the rules:
# bounded here.
PARTITION_MAX_RULES = 1024
# Each address index remembers the bit sets of the addresses it was last asked about (one dict
# lookup instead of one per prefix length: a proxy sees the same clients and destinations again
# and again); it starts over when it holds this many.
ADDRESS_MEMO_MAX = 1024
# `first_of` remembers its answers by (client IP, destination IP, port) as the socket gives them,
# up to this many (then it starts over): a client opens many connections to the same place.
FIRST_MEMO_MAX = 2048
# `resume` remembers which rules the sniffed facts allow, by the facts as sniffed (protocol, SNI,
# Host), up to this many (then it starts over): clients name the same sites again and again.
# Measured on the benchmark's 50-rule policy: 3 µs less per sniffed session (the lookups and
# the name normalization, 0.8 µs in a tight loop, cost more among a session's other work).
FACTS_MEMO_MAX = 2048


def parse_address(text: str) -> Address:
    """(version, value) of an IP address as a socket gives it; IPv4-mapped IPv6 counts as IPv4.

    Raises:
        OSError: not an IP address.
    """
    if ":" in text:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, text.partition("%")[0]), "big")
        if value >> 32 == 0xFFFF:  # ::ffff:a.b.c.d
            return 4, value & 0xFFFFFFFF
        return 6, value
    return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")


def address_of(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Address:
    """The (version, value) of an `ipaddress` address (IPv4-mapped IPv6 counts as IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return 4, int(ip.ipv4_mapped)
    return ip.version, int(ip)


def _nets(
    networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] | None, version: int
) -> _Nets:
    if networks is None:
        return None
    bits = 32 if version == 4 else 128
    by_length: dict[int, set[int]] = {}
    for net in networks:
        if net.version == version:
            by_length.setdefault(net.prefixlen, set()).add(int(net.network_address))
    return tuple(
        (((1 << bits) - 1) ^ ((1 << (bits - length)) - 1), frozenset(values))
        for length, values in sorted(by_length.items())
    )


def _names(patterns: Sequence[NamePattern] | None) -> _Names:
    if patterns is None:
        return None
    exact = frozenset(p.name for p in patterns if not p.glob)
    return exact, tuple(p.name for p in patterns if p.glob)


@dataclass(frozen=True, slots=True)
class _Compiled:
    ports: tuple[tuple[int, int], ...] | None
    client: tuple[_Nets, _Nets]  # [0] for IPv4, [1] for IPv6
    dst: tuple[_Nets, _Nets]
    needs_facts: bool
    proto: frozenset[str] | None
    sni: _Names
    host: _Names
    either: _Names
    verdict: Verdict


def _compile(rule: Rule) -> _Compiled:
    return _Compiled(
        ports=None if rule.ports is None else tuple((r.first, r.last) for r in rule.ports),
        client=(_nets(rule.client, 4), _nets(rule.client, 6)),
        dst=(_nets(rule.dst, 4), _nets(rule.dst, 6)),
        needs_facts=rule.needs_facts,
        proto=None if rule.proto is None else frozenset(rule.proto),
        sni=_names(rule.sni),
        host=_names(rule.host),
        either=_names(rule.name_any),
        verdict=verdict_of(rule),
    )


def _partition(rules: Sequence[_Compiled]) -> tuple[list[int], list[int]]:
    """Interval starts over ports 0-65535 and, per interval, the bit set of the rules whose
    `ports` allow it."""
    starts = {0}
    for rule in rules:
        for first, last in rule.ports or ():
            starts.update((first, last + 1))
    bounds = sorted(p for p in starts if p <= 65535)
    allowed = []
    for start in bounds:
        bits = 0
        for index, rule in enumerate(rules):
            if rule.ports is None or any(f <= start <= last for f, last in rule.ports):
                bits |= 1 << index
        allowed.append(bits)
    return bounds, allowed


class _AddressIndex:
    """For one key (`dst` or `client`) and one IP version: which rules an address matches."""

    __slots__ = ("_always", "_memo", "_tables")

    def __init__(self, nets_per_rule: Sequence[_Nets]) -> None:
        self._always = 0  # rules without the key
        self._memo: dict[int, int] = {}  # address value -> its bit set (ADDRESS_MEMO_MAX)
        tables: dict[int, dict[int, int]] = {}
        for index, nets in enumerate(nets_per_rule):
            if nets is None:
                self._always |= 1 << index
                continue
            for mask, values in nets:  # (an empty tuple: the key names no network of ours)
                table = tables.setdefault(mask, {})
                for value in values:
                    table[value] = table.get(value, 0) | 1 << index
        self._tables = tuple(tables.items())

    def rules(self, value: int) -> int:
        tables = self._tables
        if not tables:
            return self._always
        memo = self._memo
        bits = memo.get(value)
        if bits is not None:
            return bits
        bits = self._always
        for mask, table in tables:
            found = table.get(value & mask)
            if found:
                bits |= found
        if len(memo) >= ADDRESS_MEMO_MAX:
            memo.clear()
        memo[value] = bits
        return bits


class _NameIndex:
    """For one name key (`sni`, `host`, `sni_or_host`): which rules a name matches, as a bit
    set; the rules without the key match every name, and None."""

    __slots__ = ("_exact", "_odd", "_suffixes", "without")

    def __init__(self, names_per_rule: Sequence[_Names]) -> None:
        self.without = 0
        self._exact: dict[str, int] = {}
        self._suffixes: dict[str, int] = {}  # ".example.com" -> the rules with *.example.com
        odd: list[tuple[str, int]] = []  # a glob suffix without its leading dot (none parse so)
        for index, names in enumerate(names_per_rule):
            bit = 1 << index
            if names is None:
                self.without |= bit
                continue
            exact, suffixes = names
            for name in exact:
                self._exact[name] = self._exact.get(name, 0) | bit
            for suffix in suffixes:
                if suffix.startswith("."):
                    self._suffixes[suffix] = self._suffixes.get(suffix, 0) | bit
                else:
                    odd.append((suffix, bit))
        self._odd = tuple(odd)

    @property
    def used(self) -> bool:
        """Whether any rule has the key."""
        return bool(self._exact or self._suffixes or self._odd)

    def rules(self, name: str | None) -> int:
        if name is None:
            return self.without
        bits = self.without | self._exact.get(name, 0)
        suffixes = self._suffixes
        if suffixes:
            # Every ".suffix" the name ends with, and is longer than: each dot but a leading one.
            dot = name.find(".", 1)
            while dot != -1:
                found = suffixes.get(name[dot:])
                if found:
                    bits |= found
                dot = name.find(".", dot + 1)
        for suffix, bit in self._odd:
            if len(name) > len(suffix) and name.endswith(suffix):
                bits |= bit
        return bits


class _FactIndex:
    """Which rules the sniffed facts allow, as a bit set (the rules without fact keys: all)."""

    __slots__ = ("_either", "_host", "_proto", "_proto_without", "_sni")

    def __init__(self, rules: Sequence[_Compiled]) -> None:
        self._proto_without = 0
        proto: dict[str, int] = {}
        for index, rule in enumerate(rules):
            if rule.proto is None:
                self._proto_without |= 1 << index
            else:
                for name in rule.proto:
                    proto[name] = proto.get(name, 0) | 1 << index
        self._proto = proto if proto else None
        indexes = [_NameIndex([getattr(rule, key) for rule in rules])
                   for key in ("sni", "host", "either")]  # fmt: skip
        self._sni, self._host, self._either = (i if i.used else None for i in indexes)

    def allow(self, proto: str, sni: str | None, host: str | None) -> int:
        bits = -1  # every rule
        if self._proto is not None:
            bits = self._proto_without | self._proto.get(proto, 0)
        if self._sni is not None:
            bits &= self._sni.rules(sni)
        if self._host is not None:
            bits &= self._host.rules(host)
        either = self._either
        if either is not None:
            if sni is None or host is None:
                bits &= either.rules(sni if host is None else host)
            else:
                bits &= either.rules(sni) | either.rules(host)
        return bits


@dataclass(frozen=True, slots=True)
class Waiting:
    """`Matcher.first` stopped at rule `index`, which needs sniffed facts (`rule` names it);
    `rest` is the bit set of the rules from there on whose address keys (and port, when
    partitioned) matched, so that `with_facts` resumes without looking the session up again
    (-1: look it up)."""

    index: int
    rule: str
    rest: int = field(default=-1, compare=False, repr=False)


def _ports_allow(rule: _Compiled, port: int) -> bool:
    if rule.ports is None:
        return True
    return any(first <= port <= last for first, last in rule.ports)


class Matcher:
    """A policy, compiled: `first()` at accept, `with_facts()` once sniffed (see module doc)."""

    __slots__ = (
        "_bounds", "_by_port", "_client", "_default", "_dst", "_facts", "_facts_memo",
        "_first_memo", "_rules", "needs_facts", "policy",
    )  # fmt: skip

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        rules = self._rules = tuple(_compile(rule) for rule in policy.rules)
        self._dst = (_AddressIndex([r.dst[0] for r in rules]),
                     _AddressIndex([r.dst[1] for r in rules]))  # fmt: skip
        self._client = (_AddressIndex([r.client[0] for r in rules]),
                        _AddressIndex([r.client[1] for r in rules]))  # fmt: skip
        # Without the partition (a very big policy): ports are checked rule by rule.
        self._bounds: list[int] | None = None
        self._by_port: list[int] = []
        if len(rules) <= PARTITION_MAX_RULES:
            self._bounds, self._by_port = _partition(rules)
        self._facts = _FactIndex(rules)
        self._facts_memo: dict[tuple[str, str | None, str | None], int] = {}
        self._first_memo: dict[tuple[str, str, int], Verdict | Waiting] = {}
        self._default = Verdict(Action.ALLOW if policy.default is Default.ALLOW else Action.RESET)
        self.needs_facts = any(rule.needs_facts for rule in policy.rules)

    def _candidates(self, client: Address, dst: Address, port: int) -> int:
        """The rules whose address keys (and port, when partitioned) match, as a bit set."""
        bits = self._dst[dst[0] == 6].rules(dst[1])
        if bits:
            bits &= self._client[client[0] == 6].rules(client[1])
        if bits and self._bounds is not None:
            bits &= self._by_port[bisect.bisect_right(self._bounds, port) - 1]
        return bits

    def first(self, client: Address, dst: Address, port: int) -> Verdict | Waiting:
        """The verdict from addresses alone, or where the walk waits for sniffed facts."""
        bits = self._candidates(client, dst, port)
        rules, check_ports = self._rules, self._bounds is None
        while bits:
            low = bits & -bits
            index = low.bit_length() - 1
            rule = rules[index]
            if not check_ports or _ports_allow(rule, port):
                if rule.needs_facts:
                    return Waiting(index, rule.verdict.rule or "", bits)
                return rule.verdict
            bits ^= low
        return self._default

    def first_of(self, client_ip: str, dst_ip: str, port: int) -> Verdict | Waiting:
        """`first()` from the IP addresses as a socket gives them (text), remembered.

        Raises:
            OSError: an address that is not an IP address.
        """
        key = (client_ip, dst_ip, port)
        memo = self._first_memo
        answer = memo.get(key)
        if answer is None:
            answer = self.first(parse_address(client_ip), parse_address(dst_ip), port)
            if len(memo) >= FIRST_MEMO_MAX:
                memo.clear()
            memo[key] = answer
        return answer

    def with_facts(
        self, waiting: Waiting, client: Address, dst: Address, port: int, sniffed: SniffedFacts
    ) -> Verdict:
        """The verdict once sniffed, resuming the walk where `first()` stopped (for the same
        client, destination and port: a `Waiting` from `first()` carries the rules they left,
        and then they are not looked at again)."""
        if waiting.rest < 0:
            rest = self._candidates(client, dst, port) >> waiting.index << waiting.index
            waiting = Waiting(waiting.index, waiting.rule, rest)
        return self.resume(waiting, port, sniffed.proto, sniffed.sni, sniffed.http_host)

    def resume(
        self, waiting: Waiting, port: int, proto: str, sni: str | None, http_host: str | None
    ) -> Verdict:
        """`with_facts` for a `Waiting` that `first()` made (it knows the rules left), with the
        facts as they were sniffed (names not normalized yet).

        Raises:
            ValueError: a `Waiting` without its rules (`rest`): use `with_facts`.
        """
        if waiting.rest < 0:
            raise ValueError("resume() needs the Waiting that first() made; use with_facts()")
        key = (proto, sni, http_host)
        memo = self._facts_memo
        allowed = memo.get(key)
        if allowed is None:
            allowed = self._facts.allow(
                proto,
                None if sni is None else normalize_name(sni),
                None if http_host is None else normalize_name(http_host),
            )
            if len(memo) >= FACTS_MEMO_MAX:
                memo.clear()
            memo[key] = allowed
        bits = waiting.rest & allowed
        rules = self._rules
        if self._bounds is None:  # ports not partitioned: checked here, rule by rule
            while bits:
                low = bits & -bits
                rule = rules[low.bit_length() - 1]
                if _ports_allow(rule, port):
                    return rule.verdict
                bits ^= low
            return self._default
        return rules[(bits & -bits).bit_length() - 1].verdict if bits else self._default


_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DNS_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\Z")


def remote_name(sniffed: SniffedFacts | None) -> str | None:
    """The name a `via` rule with `remote_name` asks its upstream proxy for: the SNI, else the
    HTTP Host, when it is a well-formed DNS name (the client made it up: anything else, and no
    name at all, leaves the proxy asked for the original destination's IP)."""
    if sniffed is None:
        return None
    for name in (sniffed.sni, sniffed.http_host):
        if name is not None:
            plain = normalize_name(name)
            if _DNS_NAME.match(plain) and not plain.replace(".", "").isdigit():
                return plain
    return None
