"""The doctor's judgement on made-up facts: every broken prerequisite named, with its fix.

The integration tests (tests/integration/test_doctor.py) break the same things in a real
namespace; what cannot be broken there without touching the shared kernel (unloading nft_tproxy
or nft_socket) is covered here, from the error nft prints when a module is missing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from tproxy.core.config import InterceptMode
from tproxy.diagnostics.checks import (
    BridgeFacts,
    Expected,
    Facts,
    Finding,
    Status,
    evaluate,
    passed,
    render_text,
)
from tproxy.diagnostics.facts import listening_ports

ROUTER = Expected(InterceptMode.TPROXY, proxy_port=1800, divert_mark=1, route_table=100)
BRIDGE = dataclasses.replace(ROUTER, bridge="br0")
REDIRECT = dataclasses.replace(ROUTER, mode=InterceptMode.REDIRECT)
MAC = "02:00:00:00:00:01"
TABLE = "table inet tproxy_rules {\n tcp dport @divert_ports tproxy to :1800 ...\n reject\n}"

HEALTHY = Facts(
    net_admin=True,
    nft=True,
    expressions={"tproxy": None, "socket": None, "redirect": None},
    ip_transparent_error=None,
    sysctls={
        "net.ipv4.ip_forward": "1",
        "net.ipv6.conf.all.forwarding": "1",
        "net.ipv4.ip_early_demux": "0",
        "net.bridge.bridge-nf-call-iptables": "0",
        "net.bridge.bridge-nf-call-ip6tables": "0",
    },
    interfaces={"all": ("0", "0"), "default": ("0", "0"), "lo": ("0", "0"), "eth0": ("2", "0")},
    ipv6=True,
    ip_rules={f: [{"priority": 32000, "fwmark": "0x1", "table": "100"}] for f in (4, 6)},
    routes={f: [{"type": "local", "dst": "default", "dev": "lo"}] for f in (4, 6)},
    table=TABLE,
    bridge_table=f'table bridge tproxy_rules {{ "eth1", "eth2" ether daddr set {MAC} }}',
    bridge=BridgeFacts(True, MAC, ("198.18.3.1",), ("eth1", "eth2")),
    listening=frozenset({22, 1800}),
    diverted_ports="80, 443",
)


def _by_check(findings: list[Finding]) -> dict[str, Finding]:
    return {f.check: f for f in findings}


@pytest.mark.parametrize("expected", [ROUTER, BRIDGE], ids=["router", "bridge"])
def test_a_healthy_setup_passes(expected: Expected) -> None:
    findings = evaluate(HEALTHY, expected)
    assert passed(findings)
    assert {f.status for f in findings} <= {Status.OK, Status.SKIP}
    assert render_text(findings)[-1] == "all checks passed"


def test_a_healthy_redirect_setup_passes() -> None:
    table = "table inet tproxy_rules {\n tcp dport @divert_ports redirect to :1800\n}"
    facts = dataclasses.replace(HEALTHY, table=table, ip_rules={}, routes={})
    findings = _by_check(evaluate(facts, REDIRECT))
    assert passed(list(findings.values()))
    assert findings["nft-redirect"].status is Status.OK
    for skipped in ("ip-transparent", "policy-routing", "early-demux", "src-valid-mark"):
        assert findings[skipped].status is Status.SKIP
    assert "nft-tproxy" not in findings


BROKEN: list[tuple[str, dict[str, Any], Expected, str, str]] = [
    # (check, what is changed in the healthy facts, setup, detail says, fix says)
    ("privileges", {"net_admin": False}, ROUTER, "no CAP_NET_ADMIN", "sudo"),
    ("nft", {"nft": False}, ROUTER, "not found", "apt-get install nftables"),
    ("nft-tproxy",
     {"expressions": {"tproxy": "Could not process rule: No such file or directory",
                      "socket": None}},
     ROUTER, "No such file or directory", "nft_tproxy"),
    ("nft-socket",
     {"expressions": {"tproxy": None, "socket": "Could not process rule: No such file"}},
     ROUTER, "refused nft's socket", "nft_socket"),
    ("nft-redirect", {"expressions": {"redirect": "No such file or directory"}}, REDIRECT,
     "redirect", "nft_redir"),
    ("ip-transparent", {"ip_transparent_error": "Operation not permitted (needs CAP_NET_ADMIN)"},
     ROUTER, "Operation not permitted", "CAP_NET_ADMIN"),
    ("ip-forward", {"sysctls": {**HEALTHY.sysctls, "net.ipv4.ip_forward": "0"}}, ROUTER,
     "does not route", "sysctl -w net.ipv4.ip_forward=1"),
    ("ip-rule", {"ip_rules": {6: HEALTHY.ip_rules[6]}}, ROUTER, "no ip rule",
     "ip -4 rule add fwmark 0x1 lookup 100"),
    ("ip6-rule", {"ip_rules": {4: HEALTHY.ip_rules[4],
                               6: [{"fwmark": "0x1", "table": "main"}]}},
     ROUTER, "it looks up table main", "ip -6 rule add fwmark 0x1 lookup 100"),
    ("ip-local-route", {"routes": {6: HEALTHY.routes[6]}}, ROUTER, "no 'local default'",
     "ip -4 route add local 0.0.0.0/0 dev lo table 100"),
    ("ip6-local-route", {"routes": {4: HEALTHY.routes[4], 6: []}}, ROUTER, "no 'local default'",
     "ip -6 route add local ::/0 dev lo table 100"),
    ("src-valid-mark", {"interfaces": {**HEALTHY.interfaces, "all": ("0", "1")}}, ROUTER,
     "src_valid_mark = 1 on all", "net.ipv4.conf.all.src_valid_mark=0"),
    ("early-demux", {"sysctls": {**HEALTHY.sysctls, "net.ipv4.ip_early_demux": "1"}}, ROUTER,
     "TIME_WAIT", "net.ipv4.ip_early_demux=0"),
    ("bridge", {"bridge": None}, BRIDGE, "br0: no such interface", "type bridge"),
    ("bridge", {"bridge": BridgeFacts(False, "", ())}, BRIDGE, "not a Linux bridge", "bridge"),
    ("bridge-address", {"bridge": BridgeFacts(True, MAC, ())}, BRIDGE, "no IPv4 address",
     "ip addr add"),
    ("bridge-nf-call-iptables",
     {"sysctls": {**HEALTHY.sysctls, "net.bridge.bridge-nf-call-iptables": "1"}}, BRIDGE,
     "answered with a reset", "bridge-nf-call-iptables=0"),
    ("bridge-nf-call-ip6tables",
     {"sysctls": {**HEALTHY.sysctls, "net.bridge.bridge-nf-call-ip6tables": "1"}}, BRIDGE,
     "pass the IP hooks", "bridge-nf-call-ip6tables=0"),
    ("bridge-mac", {"bridge": BridgeFacts(True, "02:00:00:00:00:99", ("198.18.3.1",))}, BRIDGE,
     "another MAC", "ip link set br0 address 02:00:00:00:00:99"),
    ("bridge-ports", {"bridge": BridgeFacts(True, MAC, ("198.18.3.1",), ("eth1", "eth3"))},
     BRIDGE, "eth3 joined br0 after", "tproxy rules apply --bridge br0"),
    ("rules", {"table": None}, ROUTER, "nothing is diverted", "tproxy rules apply"),
    ("rules", {"bridge_table": None}, BRIDGE, "no bridge table", "--bridge br0"),
    ("rules", {}, REDIRECT, "checked for redirect mode", "--mode redirect"),
    ("rules", {"table": TABLE.replace(":1800", ":1900")}, ROUTER, "another port",
     "--proxy-port 1800"),
    ("rules", {"table": TABLE.replace(":1800", ":18000")}, ROUTER, "another port",
     "--proxy-port 1800"),
    ("listener", {"listening": frozenset({22})}, ROUTER, "nothing listens on TCP port 1800",
     "tproxy run --spoof-source"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("check", "change", "expected", "detail", "fix"),
    BROKEN,
    ids=[f"{b[0]}-{i}" for i, b in enumerate(BROKEN)],
)
def test_each_broken_prerequisite_is_named_with_its_fix(
    check: str, change: dict[str, Any], expected: Expected, detail: str, fix: str
) -> None:
    findings = evaluate(dataclasses.replace(HEALTHY, **change), expected)
    finding = _by_check(findings)[check]
    assert finding.status is Status.FAIL
    assert detail in finding.detail
    assert fix in finding.fix
    assert not passed(findings)
    text = "\n".join(render_text(findings))
    assert f"FAIL  {check}" in text and f"fix: {finding.fix}" in text


def test_what_only_breaks_some_setups_warns_without_failing() -> None:
    facts = dataclasses.replace(
        HEALTHY,
        interfaces={**HEALTHY.interfaces, "eth0": ("1", "0")},
        sysctls={**HEALTHY.sysctls, "net.ipv6.conf.all.forwarding": "0"},
    )
    findings = _by_check(evaluate(facts, ROUTER))
    assert findings["rp-filter"].status is Status.WARN
    assert "eth0" in findings["rp-filter"].detail
    assert findings["ip6-forward"].status is Status.WARN
    assert passed(list(findings.values()))


def test_rules_whose_socket_rule_matches_the_listener_warn() -> None:
    shortcut = "tcp flags != syn / syn,ack socket transparent 1 {}meta mark set 0x00000001 accept"
    old = dataclasses.replace(HEALTHY, table=TABLE + "\n" + shortcut.format(""))
    finding = _by_check(evaluate(old, ROUTER))["rules"]
    assert finding.status is Status.WARN and "port 1800 of another host" in finding.detail
    fixed = dataclasses.replace(HEALTHY, table=TABLE + "\n" + shortcut.format("socket wildcard 0 "))
    assert _by_check(evaluate(fixed, ROUTER))["rules"].status is Status.OK


def test_without_root_the_nft_checks_are_skipped_not_guessed() -> None:
    findings = _by_check(evaluate(dataclasses.replace(HEALTHY, net_admin=False), ROUTER))
    for check in ("nft-tproxy", "nft-socket", "rules"):
        assert findings[check].status is Status.SKIP
        assert "needs root" in findings[check].detail


def test_bridge_mode_does_not_ask_for_forwarding() -> None:
    facts = dataclasses.replace(HEALTHY, sysctls={**HEALTHY.sysctls, "net.ipv4.ip_forward": "0"})
    assert passed(evaluate(facts, BRIDGE))
    assert not passed(evaluate(facts, ROUTER))


def test_listening_ports_from_proc_net_tcp() -> None:
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
        "   0: 00000000:0708 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0\n"
        "   1: 0100007F:0016 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0\n"
    )
    assert listening_ports(text) == {1800}
    v6 = (
        "  sl  local_address                         remote_address                        st\n"
        "   0: 00000000000000000000000000000000:0050 00000000000000000000000000000000:0000 0A\n"
    )
    assert listening_ports(v6) == {80}


def test_doctor_lists_the_installed_exclusions_and_quic_block() -> None:
    table = TABLE + (
        "\n\tset exclude_v4 {\n\t\ttype ipv4_addr\n\t\tflags interval\n"
        "\t\telements = { 198.18.2.0/24 }\n\t}\n"
        "\tset exclude_v6 {\n\t\ttype ipv6_addr\n\t\tflags interval\n"
        "\t\telements = { 2001:db8:2::/64 }\n\t}\n"
        "\tchain block_quic {\n\t\tudp dport @divert_ports reject\n\t}\n"
    )
    findings = _by_check(evaluate(dataclasses.replace(HEALTHY, table=table), ROUTER))
    assert findings["exclude"] == Finding(
        "exclude", Status.OK, "excluded: 198.18.2.0/24, 2001:db8:2::/64"
    )
    assert findings["quic"] == Finding(
        "quic", Status.OK, "QUIC: blocked on 80, 443 (UDP rejected with ICMP port unreachable)"
    )


def test_doctor_says_what_unblocked_quic_means_for_sni_rules() -> None:
    findings = _by_check(evaluate(HEALTHY, ROUTER))
    assert findings["exclude"].detail == "excluded: none (every network is diverted)"
    quic = findings["quic"]
    assert quic.status is Status.OK  # a choice, not a fault: doctor cannot see the policy
    assert quic.detail.startswith("QUIC: not blocked: UDP to 80, 443 passes")
    assert "SNI" in quic.detail and "--block-quic" in quic.detail


@pytest.mark.parametrize(
    ("change", "why"),
    [({"table": None}, "not checked: no rules (see rules)"),
     ({"net_admin": False}, "not checked: needs root (see privileges)")],
)  # fmt: skip
def test_doctor_skips_the_policy_without_rules_to_read(change: dict[str, Any], why: str) -> None:
    findings = _by_check(evaluate(dataclasses.replace(HEALTHY, **change), ROUTER))
    assert findings["exclude"] == Finding("exclude", Status.SKIP, why)
    assert findings["quic"] == Finding("quic", Status.SKIP, why)
