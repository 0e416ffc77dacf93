from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.core.config import InterceptMode
from tproxy.rules.apply import _nft_error_text
from tproxy.rules.model import BridgeInfo, PortRange, RulesError, RulesSpec, WhenDown, parse_ports
from tproxy.rules.render import (
    AppliedSettings,
    parse_listing,
    render_ip_route_replace,
    render_ip_rule_add,
    render_nft_apply,
    render_nft_remove,
    required_sysctls,
    settings_of,
)

GOLDEN = Path(__file__).parent / "golden"


def test_parse_ports_sorts_and_merges() -> None:
    assert parse_ports("443, 80,81,8000-8100,8050-8200") == (
        PortRange(80, 81),
        PortRange(443, 443),
        PortRange(8000, 8200),
    )


@pytest.mark.parametrize("text", ["", "80,", "0", "65536", "90-80", "http", "1-2-3"])
def test_parse_ports_rejects(text: str) -> None:
    with pytest.raises(RulesError):
        parse_ports(text)


@given(st.lists(st.integers(1, 65535), min_size=1, max_size=30))
def test_parse_ports_covers_exactly_the_ports_given(ports: list[int]) -> None:
    ranges = parse_ports(",".join(map(str, ports)))
    covered = {p for r in ranges for p in range(r.first, r.last + 1)}
    assert covered == set(ports)
    assert all(a.last + 1 < b.first for a, b in itertools.pairwise(ranges))


def test_marks_must_differ() -> None:
    with pytest.raises(RulesError, match="must differ"):
        RulesSpec(ports=parse_ports("80"), divert_mark=1, proxy_mark=1)


def test_reserved_route_table_is_refused() -> None:
    with pytest.raises(RulesError, match="reserved"):
        RulesSpec(ports=parse_ports("80"), route_table=254)


@pytest.mark.parametrize("when_down", list(WhenDown))
def test_nft_script_matches_golden(when_down: WhenDown) -> None:
    spec = RulesSpec(ports=parse_ports("80,443,8000-8100"), when_down=when_down)
    script = render_nft_apply(spec, {"net.ipv4.ip_early_demux": "1"})
    assert script == (GOLDEN / f"nft-apply-{when_down.value}.nft").read_text()


def test_ruleset_keeps_syns_off_the_socket_shortcut() -> None:
    script = render_nft_apply(RulesSpec(ports=parse_ports("80")), {})
    shortcut = next(line for line in script.splitlines() if "socket transparent" in line)
    assert "tcp flags & (syn | ack) != syn" in shortcut
    # Nor the proxy's wildcard listener (KERNEL-NOTES item 19): only sockets of live sessions.
    assert "socket transparent 1 socket wildcard 0" in shortcut
    # The proxy's own traffic is exempt before anything else can divert it.
    chain = script[script.index("chain prerouting") :].splitlines()
    assert chain[3].strip() == "meta mark 0x00000002 return"


def test_ip_commands_cover_both_families() -> None:
    spec = RulesSpec(ports=parse_ports("80"), route_table=123, rule_priority=999, divert_mark=5)
    rules = [" ".join(c.argv) for c in render_ip_rule_add(spec)]
    routes = [" ".join(c.argv) for c in render_ip_route_replace(spec)]
    assert rules == [
        "ip -4 rule add fwmark 0x5 lookup 123 pref 999 protocol 201",
        "ip -6 rule add fwmark 0x5 lookup 123 pref 999 protocol 201",
    ]
    assert routes == [
        "ip -4 route replace local 0.0.0.0/0 dev lo table 123 proto 201",
        "ip -6 route replace local ::/0 dev lo table 123 proto 201",
    ]
    v4_only = RulesSpec(ports=parse_ports("80"), ipv6=False)
    assert [c.family for c in render_ip_rule_add(v4_only)] == [4]


BRIDGE = BridgeInfo("br-lan", "02:00:00:00:00:01", ("eth1", "eth2"), ("198.18.3.1",))
SPECS = {
    "router": RulesSpec(ports=parse_ports("80")),
    "local": RulesSpec(ports=parse_ports("80,443"), local=True, proxy_port=1900),
    "bridge": RulesSpec(ports=parse_ports("80"), bridge="br-lan", divert_mark=7, route_table=55),
    "redirect": RulesSpec(ports=parse_ports("80"), mode=InterceptMode.REDIRECT, local=True),
}


LONGEST = RulesSpec(ports=parse_ports("80"), proxy_port=65535, divert_mark=0xFFFFFFFF,
                    proxy_mark=1, route_table=0xFFFFFFFF, local=True, bridge="b" * 15)  # fmt: skip


@pytest.mark.parametrize("name", [*sorted(SPECS), "longest"])
def test_settings_and_restore_values_round_trip(name: str) -> None:
    spec = SPECS.get(name, LONGEST)
    every = {"net.ipv4.ip_early_demux": "1", "net.bridge.bridge-nf-call-iptables": "1",
             "net.bridge.bridge-nf-call-ip6tables": "1"}  # fmt: skip
    for restore in (every, {}):
        listing = render_nft_apply(spec, restore, BRIDGE)
        comments = re.findall(r'comment "([^"]*)"', listing)
        assert all(len(c) <= 128 for c in comments)  # nft refuses longer comments
        assert parse_listing(listing) == (settings_of(spec), restore)


def test_listing_parse_ignores_what_it_did_not_write() -> None:
    # Nothing but known sysctls with numeric values is ever written back.
    listing = 'comment "tproxy mode=bogus proxy_port=x"\n'
    listing += 'comment "restore kernel.panic=1 net.ipv4.ip_early_demux=x"\n'
    assert parse_listing(listing) == (AppliedSettings(), {})
    assert parse_listing('comment "someone else\'s table"') == (AppliedSettings(), {})
    assert parse_listing(None) == (AppliedSettings(), {})


@pytest.mark.parametrize("name", ["local", "bridge", "redirect"])
def test_variant_scripts_match_golden(name: str) -> None:
    spec = SPECS[name]
    bridge = BRIDGE if spec.bridge else None
    script = render_nft_apply(spec, {"net.ipv4.ip_early_demux": "1"}, bridge)
    assert script == (GOLDEN / f"nft-apply-{name}.nft").read_text()


def test_local_mode_exempts_the_proxy_and_this_box() -> None:
    script = render_nft_apply(SPECS["local"], {})
    output = script[script.index("chain output") :].splitlines()
    assert output[1].strip() == "type route hook output priority mangle; policy accept;"
    # The proxy's own connections first, then connections to this box's own addresses...
    assert output[2].strip() == "meta mark 0x00000002 return"
    assert output[3].strip() == "fib daddr type local return"
    # ...and only then are this box's connections marked for the trip through lo.
    assert output[4].strip().endswith("meta mark set 0x00000001")


def test_bridge_mode_lifts_both_directions_off_that_bridge_only() -> None:
    script = render_nft_apply(SPECS["bridge"], {}, BRIDGE)
    lifts = [line.strip() for line in script.splitlines() if "pkttype set host" in line]
    assert [("dport" in line, "sport" in line) for line in lifts] == [(True, False), (False, True)]
    assert all(line.startswith("iifname @bridge_ports") for line in lifts)
    assert 'elements = { "eth1", "eth2" }' in script
    assert all("ether daddr set 02:00:00:00:00:01" in line for line in lifts)
    with pytest.raises(ValueError, match="MAC"):
        render_nft_apply(SPECS["bridge"], {})


def test_bridge_table_is_named_only_when_needed() -> None:
    # A kernel without the bridge family must still take a router's rules.
    assert "bridge" not in render_nft_apply(SPECS["router"], {})
    # An earlier bridge table goes when the rules are applied again without --bridge.
    dropped = render_nft_apply(SPECS["router"], {}, drop_bridge_table=True)
    assert "delete table bridge tproxy_rules" in dropped
    assert "table bridge tproxy_rules {" not in dropped
    assert render_nft_remove(inet=False, bridge=True) == (
        "table bridge tproxy_rules\ndelete table bridge tproxy_rules\n"
    )


def test_redirect_mode_needs_no_policy_routing_and_no_sysctls() -> None:
    spec = SPECS["redirect"]
    assert render_ip_rule_add(spec) == []
    assert render_ip_route_replace(spec) == []
    assert required_sysctls(spec.mode, spec.bridge) == {}
    assert set(required_sysctls(InterceptMode.TPROXY, "br0")) == {
        "net.ipv4.ip_early_demux",
        "net.bridge.bridge-nf-call-iptables",
        "net.bridge.bridge-nf-call-ip6tables",
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": InterceptMode.REDIRECT, "when_down": WhenDown.PASS}, "--when-down pass"),
        ({"mode": InterceptMode.REDIRECT, "bridge": "br0"}, "--bridge needs --mode tproxy"),
        ({"bridge": "br/0"}, "not a valid interface name"),
        ({"bridge": "a-name-far-too-long"}, "not a valid interface name"),
        ({"bridge": 'br"0'}, "not a valid interface name"),
    ],
)
def test_impossible_combinations_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(RulesError, match=message):
        RulesSpec(ports=parse_ports("80"), **kwargs)  # type: ignore[arg-type]


def test_nft_errors_become_one_sentence() -> None:
    stderr = (
        "/dev/stdin:9:60-80: Error: Could not process rule: No such file or directory\n"
        "meta l4proto tcp tcp dport @divert_ports tproxy to :1800\n"
    )
    assert "no nftables tproxy support" in _nft_error_text(stderr)
    assert _nft_error_text("Error: syntax error, unexpected junk\n") == (
        "nft rejected the ruleset: syntax error, unexpected junk"
    )
