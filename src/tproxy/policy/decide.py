"""The verdict for a session, from what is known of it: pure, no I/O, no clock.

Rules are tried in order and the first match decides. Address keys (`client`, `dst`, `ports`)
are known at accept; the other keys (`proto`, `sni`, `host`, `sni_or_host`) only once the first
bytes are sniffed. Before then, a rule whose address keys fail is skipped (it could never match),
and a rule whose address keys match but which needs sniffed facts stops the walk with "need
facts": a later rule must not decide a session this one might still claim. So rules that match
on addresses alone and come first decide without any wait. Once the facts are known, a fact that
is absent (no SNI, no Host) matches no pattern.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from tproxy.policy.model import (
    Action,
    Default,
    HostPort,
    NamePattern,
    Policy,
    Rule,
    TLSMode,
    UpstreamProxy,
    normalize_name,
)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class SniffedFacts:
    """What sniffing found: `proto` (`tls`, `http`, `ssh`, `unknown`, `silent`), the TLS server
    name and the HTTP Host, None when the session has none."""

    proto: str
    sni: str | None = None
    http_host: str | None = None


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What is known of a session when it is decided.

    Args:
        client: the client's address.
        dst: the original destination's address.
        dst_port: the original destination's port.
        sniffed: the sniffed facts; None while not sniffed yet.
    """

    client: IPAddress
    dst: IPAddress
    dst_port: int
    sniffed: SniffedFacts | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    """A policy's answer for a session.

    Args:
        action: what to do; None when `need_facts` (nothing is decided yet).
        rule: the deciding rule's name; None for the default (and for "need facts").
        need_facts: wait for the client's first bytes (at most the policy's sniff_timeout_s),
            sniff them, and ask again with the facts.
        waiting_for: the rule that needs the facts, when `need_facts`.
        to: where `redirect` connects.
        via: the upstream proxy `via` connects through.
        remote_name: `via` asks the upstream proxy for the sniffed name.
        capture: capture the session (the rule's `capture`).
        tls: the rule's `tls`: INTERCEPT decrypts the session when it is TLS (a session that
            turns out not to be is relayed as the action says, untouched); PASSTHROUGH or None
            leaves it encrypted.
        upstream_verify: with INTERCEPT, verify the upstream's certificate for the SNI (for the
            original destination's IP without one); False accepts any.
        passthrough_on_client_reject: with INTERCEPT, a client that rejects the forged
            certificate has its next connections to the same name passed through.
    """

    action: Action | None
    rule: str | None = None
    need_facts: bool = False
    waiting_for: str | None = None
    to: HostPort | None = None
    via: UpstreamProxy | None = None
    remote_name: bool = False
    capture: bool = False
    tls: TLSMode | None = None
    upstream_verify: bool = True
    passthrough_on_client_reject: bool = False

    @property
    def intercepts(self) -> bool:
        """Whether the session is to be decrypted (when it is TLS)."""
        return self.tls is TLSMode.INTERCEPT


def needs_facts(policy: Policy) -> bool:
    """Whether any rule matches on sniffed facts; if not, no session ever waits for them."""
    return any(rule.needs_facts for rule in policy.rules)


def _plain(ip: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d) as the IPv4 address it is."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _address_mismatch(rule: Rule, facts: SessionFacts) -> str | None:
    """The first address key that fails, or None when they all match (or none is given). An
    IPv4-mapped IPv6 address matches as the IPv4 address it is."""
    if rule.client is not None:
        client = _plain(facts.client)
        if not any(client in net for net in rule.client):
            return "client"
    if rule.dst is not None:
        dst = _plain(facts.dst)
        if not any(dst in net for net in rule.dst):
            return "dst"
    if rule.ports is not None and not any(facts.dst_port in r for r in rule.ports):
        return "ports"
    return None


def _names_match(patterns: Sequence[NamePattern], names: Sequence[str | None]) -> bool:
    for name in names:
        if name is None:
            continue
        plain = normalize_name(name)
        if any(p.matches(plain) for p in patterns):
            return True
    return False


def _fact_mismatch(rule: Rule, sniffed: SniffedFacts) -> str | None:
    """The first sniffed-fact key that fails, or None when they all match."""
    if rule.proto is not None and sniffed.proto not in rule.proto:
        return "proto"
    if rule.sni is not None and not _names_match(rule.sni, [sniffed.sni]):
        return "sni"
    if rule.host is not None and not _names_match(rule.host, [sniffed.http_host]):
        return "host"
    if rule.name_any is not None and not _names_match(
        rule.name_any, [sniffed.sni, sniffed.http_host]
    ):
        return "sni_or_host"
    return None


def verdict_of(rule: Rule) -> Verdict:
    """What `rule` does to a session it matches (also the compiled matcher's answer)."""
    return Verdict(
        action=rule.action,
        rule=rule.name,
        to=rule.to,
        via=rule.via,
        remote_name=rule.remote_name,
        capture=rule.capture,
        tls=rule.tls,
        upstream_verify=rule.upstream_verify,
        passthrough_on_client_reject=rule.passthrough_on_client_reject,
    )


def _default_verdict(policy: Policy) -> Verdict:
    return Verdict(Action.ALLOW if policy.default is Default.ALLOW else Action.RESET)


def trace(policy: Policy, facts: SessionFacts) -> tuple[Verdict, list[str]]:
    """The verdict and, rule by rule, why each rule tried did or did not decide (for
    `tproxy policy explain`)."""
    why: list[str] = []
    for rule in policy.rules:
        failed = _address_mismatch(rule, facts)
        if failed is not None:
            why.append(f"rule {rule.name!r}: {failed} does not match")
            continue
        if rule.needs_facts:
            if facts.sniffed is None:
                why.append(f"rule {rule.name!r}: addresses match, needs sniffed facts")
                return Verdict(None, need_facts=True, waiting_for=rule.name), why
            failed = _fact_mismatch(rule, facts.sniffed)
            if failed is not None:
                why.append(f"rule {rule.name!r}: {failed} does not match")
                continue
        why.append(f"rule {rule.name!r}: matches")
        return verdict_of(rule), why
    why.append(f"no rule matches: default {policy.default.value}")
    return _default_verdict(policy), why


def decide(policy: Policy, facts: SessionFacts) -> Verdict:
    """The verdict for a session: the first matching rule's, else the default (rule None), or
    "need facts" when a rule that might match needs sniffed facts not known yet.

    Args:
        policy: the rules.
        facts: what is known of the session (`facts.sniffed` None: not sniffed yet).

    Returns:
        The verdict; with `need_facts` the engine sniffs and asks again with the facts.
    """
    for rule in policy.rules:
        if _address_mismatch(rule, facts) is not None:
            continue
        if rule.needs_facts:
            if facts.sniffed is None:
                return Verdict(None, need_facts=True, waiting_for=rule.name)
            if _fact_mismatch(rule, facts.sniffed) is not None:
                continue
        return verdict_of(rule)
    return _default_verdict(policy)
