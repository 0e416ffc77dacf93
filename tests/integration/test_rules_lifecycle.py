"""`tproxy rules apply|remove|show` against the real nftables and policy routing of a namespace."""

from __future__ import annotations

import sys

import pytest

from tests.integration.conftest import WITHOUT_CAPABILITIES, tproxy_cli
from tproxy.lab.topology import Lab

FOREIGN_TABLE = """
table inet someone_else {
    chain input {
        type filter hook input priority 0; policy accept;
        tcp dport 22 counter accept
    }
}
"""


def network_state(lab: Lab) -> dict[str, str]:
    """Everything apply/remove may touch, as text, in the router namespace."""
    commands = {
        "nft": ["nft", "list", "ruleset"],
        "rules4": ["ip", "-4", "rule", "show"],
        "rules6": ["ip", "-6", "rule", "show"],
        "routes4": ["ip", "-4", "route", "show", "table", "all"],
        "routes6": ["ip", "-6", "route", "show", "table", "all"],
        "early_demux": ["sysctl", "-n", "net.ipv4.ip_early_demux"],
    }
    return {key: lab.run(lab.router, argv).stdout.decode() for key, argv in commands.items()}


def test_apply_is_idempotent_and_remove_restores_exactly(lab: Lab) -> None:
    lab.run(lab.router, ["nft", "-f", "-"], stdin=FOREIGN_TABLE.encode())
    pristine = network_state(lab)
    assert pristine["early_demux"].strip() == "1"

    tproxy_cli(lab, lab.router, "rules", "apply", "--ports", "80,443,8000-8100")
    applied = network_state(lab)
    assert "table inet tproxy_rules" in applied["nft"]
    assert "tproxy to :1800" in applied["nft"]
    assert "8000-8100" in applied["nft"]
    assert "table inet someone_else" in applied["nft"]
    assert "fwmark 0x1 lookup 100 proto 201" in applied["rules4"]
    assert "fwmark 0x1 lookup 100 proto 201" in applied["rules6"]
    assert "local default dev lo" in applied["routes4"]
    assert "local default dev lo" in applied["routes6"]
    assert applied["early_demux"].strip() == "0"

    tproxy_cli(lab, lab.router, "rules", "apply", "--ports", "80,443,8000-8100")
    assert network_state(lab) == applied, "applying twice changed the state"

    removed = tproxy_cli(lab, lab.router, "rules", "remove")
    assert "restored net.ipv4.ip_early_demux=1" in removed
    assert network_state(lab) == pristine, "remove left something behind or took too much"
    assert "nothing to remove" in tproxy_cli(lab, lab.router, "rules", "remove")


def test_apply_with_new_ports_replaces_ours_only(lab: Lab) -> None:
    tproxy_cli(lab, lab.router, "rules", "apply", "--ports", "80")
    tproxy_cli(lab, lab.router, "rules", "apply", "--ports", "443", "--when-down", "pass")
    state = network_state(lab)
    assert "elements = { 443 }" in state["nft"]
    assert "reject" not in state["nft"]
    assert state["rules4"].count("proto 201") == 1
    tproxy_cli(lab, lab.router, "rules", "remove")
    # The original value survives a re-apply: remove restores what was there before the first.
    assert network_state(lab)["early_demux"].strip() == "1"


def test_dry_run_changes_nothing(lab: Lab) -> None:
    before = network_state(lab)
    printed = tproxy_cli(lab, lab.router, "rules", "apply", "--ports", "80", "--dry-run")
    assert "tproxy to :1800" in printed
    assert "ip -4 rule add fwmark 0x1 lookup 100" in printed
    assert network_state(lab) == before


def test_show_reports_the_state(lab: Lab) -> None:
    assert "rules not applied" in tproxy_cli(lab, lab.router, "rules", "show")
    tproxy_cli(lab, lab.router, "rules", "apply", "--ports", "80")
    shown = tproxy_cli(lab, lab.router, "rules", "show")
    assert "table inet tproxy_rules" in shown
    assert "IPv4 rule: pref 32000 fwmark 0x1 lookup 100" in shown
    assert "IPv6 route: local default dev lo table 100" in shown
    assert "net.ipv4.ip_early_demux = 0 (ok)" in shown


def test_a_failed_apply_leaves_nothing_behind(lab: Lab) -> None:
    # Occupy our rule's slot with a different rule of ours that `ip rule add` cannot coexist with
    # is hard to arrange; instead make the routing step fail: table 100 cannot take an IPv6 route
    # when IPv6 is switched off on lo.
    lab.sysctl(lab.router, "net.ipv6.conf.lo.disable_ipv6", "1")
    before = network_state(lab)
    result = lab.run(
        lab.router,
        [sys.executable, "-m", "tproxy", "rules", "apply", "--ports", "80"],
        check=False,
    )
    assert result.returncode == 1
    message = result.stderr.decode().strip()
    assert message.startswith("tproxy: error: ") and "\n" not in message
    assert network_state(lab) == before


def test_rules_need_root(lab: Lab) -> None:
    before = network_state(lab)
    result = lab.run(
        lab.router,
        [*WITHOUT_CAPABILITIES, sys.executable, "-m", "tproxy", "rules", "apply", "--ports", "80"],
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        "tproxy: error: changing firewall rules needs root (CAP_NET_ADMIN): run with sudo"
    )
    assert network_state(lab) == before


@pytest.mark.parametrize("args", [["--ports", "0"], ["--ports", "80-70"], ["--ports", "x"],
                                  ["--ports", "80", "--mark", "1"], ["--bogus"]])  # fmt: skip
def test_bad_rules_input_is_one_line_and_status_2(lab: Lab, args: list[str]) -> None:
    result = lab.run(
        lab.router, [sys.executable, "-m", "tproxy", "rules", "apply", *args], check=False
    )
    assert result.returncode == 2
    assert len(result.stderr.decode().strip().splitlines()) == 1
    assert network_state(lab)["nft"].strip() == ""


def test_missing_nft_is_one_sentence(lab: Lab) -> None:
    result = lab.run(
        lab.router,
        ["env", "PATH=/nonexistent", sys.executable, "-m", "tproxy", "rules", "apply",
         "--ports", "80"],
        check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.decode().strip() == (
        "tproxy: error: 'nft' was not found: install it (apt-get install nftables) and try again"
    )


@pytest.mark.parametrize(
    "args",
    [["--ports", "70000"], ["--ports", "80", "--mode", "redirect", "--when-down", "pass"],
     ["--ports", "80", "--mode", "redirect", "--bridge", "br0"],
     ["--ports", "80", "--bridge", "no/such"], ["--ports", "80", "--bridge", "nosuch"],
     ["--ports", "80", "--bridge", "nosuch", "--dry-run"]],
)  # fmt: skip
def test_refused_rules_change_nothing(lab: Lab, args: list[str]) -> None:
    before = network_state(lab)
    result = lab.run(
        lab.router, [sys.executable, "-m", "tproxy", "rules", "apply", *args], check=False
    )
    assert result.returncode in (1, 2)
    err = result.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "error:" in err, err
    assert network_state(lab) == before


def test_dry_run_prints_the_ruleset_and_needs_no_root(lab: Lab) -> None:
    before = network_state(lab)
    for prefix in ([], WITHOUT_CAPABILITIES):
        argv = [*prefix, sys.executable, "-m", "tproxy", "rules", "apply", "--ports", "80",
                "--dry-run", "--when-down", "pass"]  # fmt: skip
        out = lab.run(lab.router, argv).stdout.decode()
        assert "tproxy to :1800" in out
        assert "reject" not in out
    redirect = tproxy_cli(lab, lab.router, "rules", "apply", "--ports", "80", "--mode",
                          "redirect", "--local", "--dry-run")  # fmt: skip
    assert "redirect to :1800" in redirect and "type nat hook output" in redirect
    assert "ip -4 rule" not in redirect
    assert network_state(lab) == before


@pytest.mark.parametrize(
    ("off", "warned"),
    [("net.ipv4.ip_forward", "IPv4"), ("net.ipv6.conf.all.forwarding", "IPv6")],
)
def test_apply_warns_when_the_box_does_not_forward(lab: Lab, off: str, warned: str) -> None:
    lab.sysctl(lab.router, off, "0")
    printed = tproxy_cli(lab, lab.router, "rules", "apply", "--ports", "80")
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {off} = 0 (this box does not route {warned}: set it to 1 on "
                        "a router)"]  # fmt: skip
    shown = tproxy_cli(lab, lab.router, "rules", "show")
    assert f"{off} = 0 (this box does not route {warned}" in shown


def test_apply_is_quiet_about_forwarding_when_the_box_forwards(lab: Lab) -> None:
    printed = tproxy_cli(lab, lab.router, "rules", "apply", "--ports", "80")
    assert "warning:" not in printed
