"""The one plan behind `rules apply` and its `--dry-run`, from made-up observations (no I/O)."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from tproxy.core.config import InterceptMode
from tproxy.rules.apply import is_read_only, read_only
from tproxy.rules.model import BridgeInfo, RulesSpec, WhenDown, parse_ports
from tproxy.rules.plan import (
    Observed,
    RulesApplyError,
    parse_dry_run_nft,
    plan_apply,
    render_dry_run,
    render_report,
)
from tproxy.rules.render import render_nft_apply

SPEC = RulesSpec(ports=parse_ports("80"))
BRIDGE = BridgeInfo("br0", "02:00:00:00:00:01", ("eth1", "eth2"), ("198.18.3.1",))
FRESH = Observed(sysctls={"net.ipv4.ip_early_demux": "1"})
OUR_RULE = {"priority": 32000, "fwmark": "0x1", "table": "100", "protocol": "201"}
OUR_ROUTE = {"type": "local", "dst": "default", "dev": "lo", "table": "100", "protocol": "201"}


def test_a_fresh_box_gets_everything_and_remembers_the_sysctl() -> None:
    plan = plan_apply(SPEC, FRESH)
    assert plan.nft_script == render_nft_apply(SPEC, {"net.ipv4.ip_early_demux": "1"})
    assert [(c.name, c.value, c.was) for c in plan.sysctls] == [
        ("net.ipv4.ip_early_demux", "0", "1")
    ]
    assert [" ".join(s.command.argv) for s in plan.routing] == [
        "ip -4 rule add fwmark 0x1 lookup 100 pref 32000 protocol 201",
        "ip -6 rule add fwmark 0x1 lookup 100 pref 32000 protocol 201",
        "ip -4 route replace local 0.0.0.0/0 dev lo table 100 proto 201",
        "ip -6 route replace local ::/0 dev lo table 100 proto 201",
    ]
    assert all(s.undo is not None and s.undo.argv[3] == "del" for s in plan.routing)
    assert plan.cleanup == () and plan.unreadable is None


def test_an_installed_table_keeps_its_restore_values_and_rules_stay() -> None:
    installed = render_nft_apply(SPEC, {"net.ipv4.ip_early_demux": "1"})
    observed = Observed(
        table=installed,
        sysctls={"net.ipv4.ip_early_demux": "0"},  # set by the first apply
        ip_rules={4: (OUR_RULE,), 6: (OUR_RULE,)},
        routes={4: (OUR_ROUTE,), 6: (OUR_ROUTE,)},
    )
    plan = plan_apply(SPEC, observed)
    assert 'comment "restore net.ipv4.ip_early_demux=1"' in plan.nft_script
    assert plan.sysctls == ()
    assert [c.argv[2:4] for c in plan.rules_in_place] == [("rule", "add")] * 2
    assert [s.command.argv[2:4] for s in plan.routing] == [("route", "replace")] * 2
    assert all(s.undo is None for s in plan.routing)  # the routes were there before
    assert installed in plan.nft_undo  # a failure puts the old table back
    assert render_report(plan)[0].startswith("replaced nftables table inet tproxy_rules")


def test_an_installed_bridge_table_goes_when_bridge_mode_does() -> None:
    bridged = RulesSpec(ports=parse_ports("80"), bridge="br0")
    installed_bridge = render_nft_apply(bridged, {}, BRIDGE)
    plan = plan_apply(SPEC, Observed(bridge_table=installed_bridge))
    assert "delete table bridge tproxy_rules" in plan.nft_script
    assert "table bridge tproxy_rules {" not in plan.nft_script
    assert "deleted nftables table bridge tproxy_rules (no --bridge this time)" in plan.nft_report
    assert plan_apply(bridged, Observed(bridge=BRIDGE)).nft_script.count("table bridge") == 3


@pytest.mark.parametrize(
    ("bridge", "complaint"),
    [(BridgeInfo("br0", "02:00:00:00:00:01", ()), "has no ports"),
     (BridgeInfo("br0", "02:00:00:00:00:01", ("eth1",)), "has no IPv4 address")],
)  # fmt: skip
def test_an_unusable_bridge_is_refused_by_the_plan(bridge: BridgeInfo, complaint: str) -> None:
    with pytest.raises(RulesApplyError, match=complaint):
        plan_apply(RulesSpec(ports=parse_ports("80"), bridge="br0"), Observed(bridge=bridge))


def test_redirect_mode_deletes_our_earlier_policy_routing_last() -> None:
    spec = RulesSpec(ports=parse_ports("80"), mode=InterceptMode.REDIRECT)
    plan = plan_apply(spec, Observed(ip_rules={4: (OUR_RULE,)}, routes={6: (OUR_ROUTE,)}))
    assert plan.routing == () and plan.sysctls == ()
    cleanup = [" ".join(c.argv) for c in plan.cleanup]
    assert cleanup == [
        "ip -4 rule del pref 32000 protocol 201",
        "ip -6 route del local default dev lo table 100 proto 201",
    ]
    dry_run = render_dry_run(plan)
    assert dry_run[-2:] == cleanup
    assert render_report(plan)[-2:] == cleanup


def test_the_dry_run_prints_the_script_and_the_commands_in_order() -> None:
    spec = RulesSpec(ports=parse_ports("80"), when_down=WhenDown.PASS)
    plan = plan_apply(spec, FRESH)
    dry_run = render_dry_run(plan)
    assert parse_dry_run_nft(dry_run) == plan.nft_script
    assert "tproxy to :1800" in plan.nft_script and "reject" not in plan.nft_script
    commands = [line for line in dry_run if not line.startswith(("#", "\t", "table", "}"))]
    assert commands == [
        "delete table inet tproxy_rules",
        *(" ".join(s.command.argv) for s in plan.routing),
        "sysctl -w net.ipv4.ip_early_demux=0  # was 1: TIME_WAIT sockets of spoofed connections "
        "must not capture forwarded packets",
    ]


def test_a_dry_run_without_our_tables_says_so_in_its_first_line() -> None:
    plan = plan_apply(SPEC, Observed(unreadable="nft is not installed"))
    first, *rest = render_dry_run(plan)
    assert first.startswith("# could not read our installed nftables tables (nft is not")
    assert not any("could not" in line for line in rest)
    assert "# net.ipv4.ip_early_demux is not on this kernel (left alone)" in rest


@pytest.mark.parametrize(
    ("argv", "reads"),
    [(["nft", "list", "table", "inet", "tproxy_rules"], True),
     (["ip", "-j", "-4", "rule", "show"], True),
     (["ip", "-j", "-d", "link", "show", "dev", "br0"], True),
     (["ip", "-j", "-6", "route", "show", "table", "all", "proto", "201"], True),
     (["nft", "-f", "-"], False),
     (["nft", "delete", "table", "inet", "x"], False),
     (["ip", "-4", "rule", "add", "fwmark", "0x1"], False),
     (["ip", "-6", "route", "replace", "local", "::/0"], False),
     (["ip", "link", "set", "br0", "down"], False),
     (["sysctl", "-w", "x=1"], False)],
)  # fmt: skip
def test_a_dry_run_can_only_read(argv: list[str], reads: bool) -> None:
    assert is_read_only(argv) is reads
    ran: list[Sequence[str]] = []

    def runner(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        ran.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    guarded = read_only(runner)
    if reads:
        guarded(argv, None)
        assert ran == [argv]
    else:
        with pytest.raises(PermissionError):
            guarded(argv, None)
        assert ran == []
