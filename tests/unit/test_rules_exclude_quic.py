"""`rules apply --exclude` and `--block-quic` in the pure model, renderer and plan (no I/O).

What the kernel does with them is in tests/integration/test_rules_exclude_quic.py.
"""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.core.config import InterceptMode
from tproxy.rules.model import (
    BridgeInfo,
    Network,
    RulesError,
    RulesSpec,
    normalize_networks,
    parse_network,
    parse_ports,
)
from tproxy.rules.plan import Observed, parse_dry_run_nft, plan_apply, render_dry_run
from tproxy.rules.render import parse_listing, render_nft_apply, settings_of

GOLDEN = Path(__file__).parent / "golden"
BRIDGE = BridgeInfo("br0", "02:00:00:00:00:01", ("eth1", "eth2"), ("198.18.3.1",))
NETS = tuple(parse_network(t) for t in ("198.18.2.0/24", "2001:db8:2::/64"))


def spec(**kwargs: object) -> RulesSpec:
    return RulesSpec(ports=parse_ports("80,443"), **kwargs)  # type: ignore[arg-type]


def chain(script: str, name: str, table: str = "inet") -> list[str]:
    """The rules of chain `name` in our `table` of a rendered script, stripped."""
    body = script[script.index(f"table {table} tproxy_rules {{") :]
    body = body[body.index(f"\tchain {name} {{") :]
    return [line.strip() for line in body[: body.index("\n\t}")].splitlines()[1:]]


# --- the model -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "network"),
    [("198.18.2.0/24", "198.18.2.0/24"), (" 198.18.2.7 ", "198.18.2.7/32"),
     ("2001:db8:2::/64", "2001:db8:2::/64"), ("2001:db8:2::9", "2001:db8:2::9/128"),
     ("198.18.0.0/15", "198.18.0.0/15"), ("0.0.0.0/0", "0.0.0.0/0")],
)  # fmt: skip
def test_parse_network_takes_networks_and_plain_addresses(text: str, network: str) -> None:
    assert parse_network(text) == ipaddress.ip_network(network)


@pytest.mark.parametrize(
    ("text", "message"),
    [("198.18.2.1/24", "invalid network '198.18.2.1/24': it has host bits set; did you mean "
                       "198.18.2.0/24 (the network) or 198.18.2.1/32 (the one address)?"),
     ("2001:db8:2::1/64", "invalid network '2001:db8:2::1/64': it has host bits set; did you "
                          "mean 2001:db8:2::/64 (the network) or 2001:db8:2::1/128 (the one "
                          "address)?"),
     *((bad, f"invalid network {bad!r}: give an address or ADDRESS/PREFIX, e.g. 198.18.2.0/24 "
             "or 2001:db8:2::/64")
       for bad in ("198.18.2.0/33", "2001:db8::/129", "198.18.2", "lan", "", "198.18.2.0/",
                   "198.18.2.0/24,198.18.3.0/24", "fe80::1%eth0/64"))],
)  # fmt: skip
def test_parse_network_refuses_with_one_sentence(text: str, message: str) -> None:
    with pytest.raises(RulesError) as raised:
        parse_network(text)
    assert str(raised.value) == message


def test_overlapping_and_adjacent_networks_are_merged_ipv4_first() -> None:
    given_ = [parse_network(t) for t in ("2001:db8:2::/64", "198.18.2.128/25", "198.18.2.0/24",
                                         "198.18.3.0/24", "198.18.9.9", "2001:db8:2::5",
                                         "198.18.9.9")]  # fmt: skip
    assert [str(n) for n in normalize_networks(given_)] == [
        "198.18.2.0/23",  # .2.0/24 holds .2.128/25 and is adjacent to .3.0/24
        "198.18.9.9/32",
        "2001:db8:2::/64",
    ]
    assert spec(exclude=tuple(given_)).exclude == normalize_networks(given_)


@given(st.lists(st.tuples(st.integers(0, 255), st.integers(24, 32)), min_size=1, max_size=12))
def test_merged_networks_cover_exactly_what_was_given_and_never_overlap(
    parts: list[tuple[int, int]],
) -> None:
    given_: list[Network] = [
        ipaddress.ip_network(f"198.18.2.{last}/{plen}", strict=False) for last, plen in parts
    ]
    merged = normalize_networks(given_)
    assert {a for n in merged for a in n} == {a for n in given_ for a in n}
    for a, b in itertools.pairwise(merged):
        assert int(a.broadcast_address) < int(b.network_address)  # sorted, disjoint: nft takes it


# --- the ruleset -----------------------------------------------------------------------------


def test_nothing_changes_without_the_options() -> None:
    # (the existing golden files prove the rest: no sets, no chains, byte for byte)
    script = render_nft_apply(spec(), {})
    assert "exclude" not in script and "block_quic" not in script and "udp" not in script


def test_policy_script_matches_golden() -> None:
    full = spec(exclude=(*NETS, parse_network("198.18.9.9")), block_quic=True, local=True)
    script = render_nft_apply(full, {"net.ipv4.ip_early_demux": "1"})
    assert script == (GOLDEN / "nft-apply-exclude-quic.nft").read_text()


def test_excluded_networks_return_early_in_every_diverting_chain() -> None:
    returns = ["ip saddr @exclude_v4 return", "ip daddr @exclude_v4 return",
               "ip6 saddr @exclude_v6 return", "ip6 daddr @exclude_v6 return"]  # fmt: skip
    script = render_nft_apply(spec(exclude=NETS, local=True), {})
    prerouting = chain(script, "prerouting")
    # After the socket shortcut (a session the proxy holds when the exclusion comes keeps
    # reaching it), before anything that diverts or resets.
    assert "socket transparent 1" in prerouting[3]
    assert prerouting[4:8] == returns
    assert [r for r in prerouting if "@divert_ports" in r] == prerouting[9:]
    assert chain(script, "output")[2:6] == returns
    redirect = render_nft_apply(spec(exclude=NETS, local=True, mode=InterceptMode.REDIRECT), {})
    assert chain(redirect, "prerouting")[2:6] == returns
    assert chain(redirect, "output")[2:6] == returns
    bridged = render_nft_apply(spec(exclude=NETS, bridge="br0"), {}, BRIDGE)
    lifts = chain(bridged, "prerouting", "bridge")
    assert lifts[1:5] == returns  # excluded frames are not lifted: they stay bridged
    assert all("pkttype set host" in line for line in lifts[5:])


@pytest.mark.parametrize("family", [4, 6])
def test_only_the_families_with_exclusions_get_a_set(family: int) -> None:
    only = tuple(n for n in NETS if n.version == family)
    script = render_nft_apply(spec(exclude=only), {})
    other = 6 if family == 4 else 4
    assert f"set exclude_v{family} {{" in script and f"exclude_v{other}" not in script
    assert script.count(f"@exclude_v{family} return") == 2


def test_quic_is_rejected_on_the_diverted_ports_except_for_excluded_and_local() -> None:
    script = render_nft_apply(spec(exclude=NETS, block_quic=True), {})
    rules = chain(script, "block_quic")
    assert rules[0] == "type filter hook prerouting priority mangle; policy accept;"
    assert rules[1:5] == [r for r in chain(script, "prerouting") if "@exclude" in r]
    assert rules[5:] == [
        "fib daddr type local return",
        "meta l4proto udp udp dport @divert_ports reject with icmpx port-unreachable",
    ]
    assert "block_quic_output" not in script  # this box's own UDP only with --local
    local = render_nft_apply(spec(block_quic=True, local=True), {})
    assert chain(local, "block_quic_output")[0].startswith("type filter hook output")
    redirect = render_nft_apply(spec(block_quic=True, mode=InterceptMode.REDIRECT), {})
    assert chain(redirect, "block_quic") == chain(render_nft_apply(spec(block_quic=True), {}),
                                                  "block_quic")  # fmt: skip


def test_bridge_mode_lifts_quic_for_the_inet_chain_to_reject() -> None:
    # This kernel has no bridge-family reject: the UDP goes up to the IP stack like the TCP.
    script = render_nft_apply(spec(block_quic=True, bridge="br0"), {}, BRIDGE)
    lifts = chain(script, "prerouting", "bridge")
    assert lifts[-1] == ("iifname @bridge_ports meta l4proto udp udp dport @divert_ports "
                         "ether daddr set 02:00:00:00:00:01 meta pkttype set host")  # fmt: skip
    assert "udp" not in render_nft_apply(spec(bridge="br0"), {}, BRIDGE)
    assert "reject with icmpx" in chain(script, "block_quic")[-1]


# --- reading it back -------------------------------------------------------------------------

# What `nft list table inet tproxy_rules` printed for an apply with both options (nft 1.0.6):
# a /32 as a bare address, long element lists wrapped, `reject` for the icmpx default.
LISTED = """table inet tproxy_rules {
	comment "tproxy mode=tproxy proxy_port=1800 divert_mark=0x1 route_table=100 local=no"
	set divert_ports {
		type inet_service
		flags interval
		elements = { 80, 443 }
	}

	set exclude_v4 {
		type ipv4_addr
		flags interval
		elements = { 198.18.2.0/24, 198.18.9.9,<wrap>198.18.12.0/22 }
	}

	set exclude_v6 {
		type ipv6_addr
		flags interval
		elements = { 2001:db8:2::/64 }
	}

	chain block_quic {
		type filter hook prerouting priority mangle; policy accept;
		fib daddr type local return
		udp dport @divert_ports reject
	}
}
""".replace("<wrap>", "\n\t\t\t     ")  # nft wraps with tabs, then spaces


def test_the_installed_exclusions_and_quic_block_are_read_from_the_listing() -> None:
    settings = parse_listing(LISTED)[0]
    assert [str(n) for n in settings.exclude] == [
        "198.18.2.0/24", "198.18.9.9/32", "198.18.12.0/22", "2001:db8:2::/64",
    ]  # fmt: skip
    assert settings.block_quic
    assert parse_listing(LISTED.replace("chain block_quic", "chain other"))[0].block_quic is False
    assert parse_listing(None)[0].exclude == ()


@pytest.mark.parametrize(
    "kwargs",
    [{"exclude": NETS}, {"block_quic": True},
     {"exclude": NETS[:1], "block_quic": True, "local": True}],
)  # fmt: skip
def test_settings_round_trip_through_the_rendered_table(kwargs: dict[str, object]) -> None:
    applied = spec(**kwargs)
    assert parse_listing(render_nft_apply(applied, {}))[0] == settings_of(applied)


# --- the plan and its dry run ----------------------------------------------------------------


def test_the_plan_reports_and_the_dry_run_prints_both() -> None:
    plan = plan_apply(spec(exclude=NETS, block_quic=True), Observed())
    assert plan.nft_report[0] == (
        "created nftables table inet tproxy_rules (tproxy: 80,443 -> :1800, routed connections; "
        "excluded: 198.18.2.0/24, 2001:db8:2::/64; QUIC blocked: UDP to 80,443 rejected (ICMP "
        "port unreachable))"
    )
    dry_run = render_dry_run(plan)
    assert parse_dry_run_nft(dry_run) == plan.nft_script
    assert "\t\telements = { 198.18.2.0/24 }" in dry_run
    assert any("reject with icmpx port-unreachable" in line for line in dry_run)


def test_new_exclusions_replace_the_old_ones_in_one_transaction() -> None:
    old = render_nft_apply(spec(exclude=NETS, block_quic=True), {})
    plan = plan_apply(spec(exclude=(parse_network("198.18.4.0/24"),)), Observed(table=old))
    script = plan.nft_script
    # One script: our table is deleted and created again in the same nft -f, so no packet sees
    # the old exclusions mixed with the new ones, or none at all.
    assert script.startswith("table inet tproxy_rules\ndelete table inet tproxy_rules\n")
    assert "198.18.4.0/24" in script and "198.18.2.0/24" not in script
    assert "exclude_v6" not in script and "block_quic" not in script
    assert old in plan.nft_undo  # a failure later puts the old exclusions back
