"""`decide`: the first matching rule wins; rules that need sniffed facts make the session wait
only when their address keys match; names are globs, case-insensitive, trailing dot ignored."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.policy.decide import SessionFacts, SniffedFacts, Verdict, decide, needs_facts, trace
from tproxy.policy.model import PROTOS, Action, HostPort, Policy, parse_policy

ip = ipaddress.ip_address


def _facts(
    dst_port: int = 443,
    sniffed: SniffedFacts | None = None,
    client: str = "10.0.0.5",
    dst: str = "198.18.2.7",
) -> SessionFacts:
    return SessionFacts(ip(client), ip(dst), dst_port, sniffed)


POLICY = parse_policy(
    """
[[rule]]
name = "mail"
ports = [25, "3306-3307"]
action = "allow"

[[rule]]
name = "no-ads"
sni = ["*.ads.example", "tracker.example"]
ports = [443]
action = "reset"

[[rule]]
name = "mirror"
ports = [9009]
action = "redirect"
to = "198.18.2.2:9000"

[[rule]]
name = "out-via-socks"
dst = ["198.18.3.0/24", "2001:db8:2::/64"]
action = "via"
via = "socks5://198.18.2.2:1080"
remote_name = true
"""
)


def test_address_only_rules_decide_without_facts() -> None:
    verdict = decide(POLICY, _facts(9009))
    assert verdict == Verdict(Action.REDIRECT, "mirror", to=HostPort("198.18.2.2", 9000))
    assert not verdict.need_facts


def test_an_address_rule_before_an_sni_rule_decides_at_once() -> None:
    for port in (25, 3306, 3307):
        assert decide(POLICY, _facts(port)) == Verdict(Action.ALLOW, "mail")


def test_an_sni_rule_whose_addresses_match_needs_facts() -> None:
    verdict = decide(POLICY, _facts(443))
    assert verdict.need_facts and verdict.action is None and verdict.rule is None
    assert verdict.waiting_for == "no-ads"


def test_an_sni_rule_whose_addresses_fail_is_skipped_without_waiting() -> None:
    # "no-ads" (port 443 only) is skipped; "out-via-socks" matches on addresses but asks its
    # proxy for the sniffed name (remote_name), so it waits for the facts itself.
    verdict = decide(POLICY, _facts(80, dst="2001:db8:2::9"))
    assert verdict.need_facts and verdict.waiting_for == "out-via-socks"
    sniffed = SniffedFacts("http", None, "www.example.test")
    verdict = decide(POLICY, _facts(80, dst="2001:db8:2::9", sniffed=sniffed))
    assert (verdict.action, verdict.rule, verdict.remote_name) == (
        Action.VIA,
        "out-via-socks",
        True,
    )
    assert str(verdict.via) == "socks5://198.18.2.2:1080"


def test_with_facts_the_sni_rule_decides_or_passes() -> None:
    tls = SniffedFacts("tls", sni="x.ads.example")
    assert decide(POLICY, _facts(443, tls)) == Verdict(Action.RESET, "no-ads")
    other = SniffedFacts("tls", sni="www.example.test")
    assert decide(POLICY, _facts(443, other)) == Verdict(Action.ALLOW, None)


@pytest.mark.parametrize("sniffed", [SniffedFacts("tls"), SniffedFacts("silent")])
def test_facts_known_but_absent_match_no_name(sniffed: SniffedFacts) -> None:
    assert decide(POLICY, _facts(443, sniffed)) == Verdict(Action.ALLOW, None)


@pytest.mark.parametrize(
    ("sni", "matched"),
    [
        ("a.ads.example", True),
        ("deep.a.ads.example", True),
        ("A.ADS.Example", True),
        ("a.ads.example.", True),
        ("ads.example", False),
        ("xads.example", False),
        ("tracker.example", True),
        ("TRACKER.example.", True),
        ("www.tracker.example", False),
    ],
)
def test_name_globs(sni: str, matched: bool) -> None:
    verdict = decide(POLICY, _facts(443, SniffedFacts("tls", sni=sni)))
    assert verdict.rule == ("no-ads" if matched else None)


def test_host_and_sni_or_host_and_proto() -> None:
    policy = parse_policy(
        '[[rule]]\nname = "h"\nhost = ["web.example"]\naction = "reset"\n'
        '[[rule]]\nname = "either"\nsni_or_host = ["*.either.example"]\naction = "reset"\n'
        '[[rule]]\nname = "ssh"\nproto = ["ssh"]\naction = "reset"\n'
    )
    assert decide(policy, _facts(80, SniffedFacts("http", http_host="Web.Example"))).rule == "h"
    assert decide(policy, _facts(443, SniffedFacts("tls", sni="web.example"))).rule is None
    assert decide(policy, _facts(80, SniffedFacts("http", http_host="a.either.example"))).rule == (
        "either"
    )
    assert decide(policy, _facts(443, SniffedFacts("tls", sni="b.either.example"))).rule == (
        "either"
    )
    assert decide(policy, _facts(22, SniffedFacts("ssh"))).rule == "ssh"
    assert decide(policy, _facts(22, SniffedFacts("unknown"))).rule is None


@pytest.mark.parametrize(
    ("client", "matched"),
    [
        ("10.1.2.3", True),
        ("11.0.0.1", False),
        ("fd00::1", True),
        ("fe80::1", False),
        ("::ffff:10.1.2.3", True),  # an IPv4-mapped address is the IPv4 client it maps
    ],
)
def test_v4_and_v6_client_networks(client: str, matched: bool) -> None:
    policy = parse_policy(
        '[[rule]]\nname = "lan"\nclient = ["10.0.0.0/8", "fd00::/8"]\naction = "reset"'
    )
    verdict = decide(policy, _facts(client=client))
    assert verdict.rule == ("lan" if matched else None)


@pytest.mark.parametrize(
    ("port", "matched"), [(7999, False), (8000, True), (8100, True), (8101, False)]
)
def test_port_ranges(port: int, matched: bool) -> None:
    policy = parse_policy('[[rule]]\nname = "r"\nports = ["8000-8100"]\naction = "reset"')
    assert decide(policy, _facts(port)).rule == ("r" if matched else None)


@pytest.mark.parametrize(("default", "action"), [("allow", Action.ALLOW), ("reset", Action.RESET)])
def test_no_match_is_the_default_with_rule_none(default: str, action: Action) -> None:
    policy = parse_policy(
        f'default = "{default}"\n' + '[[rule]]\nname = "r"\nports = [1]\naction = "allow"'
    )
    assert decide(policy, _facts(2)) == Verdict(action, None)
    assert decide(Policy(), _facts(2)) == Verdict(Action.ALLOW, None)


def test_needs_facts_only_with_l7_keys() -> None:
    assert needs_facts(POLICY)
    assert not needs_facts(parse_policy('[[rule]]\nname = "r"\nports = [1]\naction = "reset"'))
    assert not needs_facts(Policy())


def test_trace_says_why_and_agrees_with_decide() -> None:
    verdict, why = trace(POLICY, _facts(443, SniffedFacts("tls", sni="a.ads.example")))
    assert verdict == decide(POLICY, _facts(443, SniffedFacts("tls", sni="a.ads.example")))
    assert why == ["rule 'mail': ports does not match", "rule 'no-ads': matches"]


_ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.sampled_from(["198.18.2.7", "198.18.3.1", "2001:db8:2::1", "10.0.0.5"]),
)
_NAMES = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.sampled_from(["a.ads.example", "ADS.example.", "tracker.example", ".", ""]),
)
_SNIFFED = st.one_of(
    st.none(),
    st.builds(SniffedFacts, st.sampled_from(PROTOS), _NAMES, _NAMES),
)


@given(
    client=_ADDRESSES,
    dst=_ADDRESSES,
    port=st.integers(1, 65535) | st.sampled_from([25, 443, 9009]),
    sniffed=_SNIFFED,
)
def test_random_facts_never_raise_and_name_a_rule_or_none(
    client: str, dst: str, port: int, sniffed: SniffedFacts | None
) -> None:
    verdict = decide(POLICY, _facts(port, sniffed, client=client, dst=dst))
    names = {rule.name for rule in POLICY.rules}
    assert verdict.rule is None or verdict.rule in names
    if verdict.need_facts:
        assert sniffed is None and verdict.action is None and verdict.waiting_for in names
    else:
        assert verdict.action is not None
    assert trace(POLICY, _facts(port, sniffed, client=client, dst=dst))[0] == verdict
