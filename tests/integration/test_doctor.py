"""`tproxy doctor` in real namespaces: a healthy setup passes; each thing broken is named.

What cannot be broken here without touching the shared kernel (unloading nft_tproxy or
nft_socket) is covered in tests/unit/test_doctor_checks.py from the error nft prints then.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.integration.conftest import WITHOUT_CAPABILITIES, apply_rules, start_proxy
from tproxy.lab.topology import Lab


def doctor(lab: Lab, *args: str, prefix: Sequence[str] = ()) -> tuple[int, dict[str, Any]]:
    """Run `tproxy doctor --json` in the router; return its exit status and checks by name."""
    argv = [*prefix, sys.executable, "-m", "tproxy", "doctor", "--json", *args]
    result = lab.run(lab.router, argv, check=False)
    report = json.loads(result.stdout)
    assert report["ok"] == (result.returncode == 0)
    return result.returncode, {c["check"]: c for c in report["checks"]}


def statuses(checks: dict[str, Any]) -> dict[str, str]:
    return {name: check["status"] for name, check in checks.items()}


def assert_healthy(lab: Lab, *args: str) -> dict[str, Any]:
    code, checks = doctor(lab, *args)
    broken = {n: c for n, c in checks.items() if c["status"] not in ("ok", "skip")}
    assert code == 0 and not broken, broken
    return checks


def sh(lab: Lab, *argv: str) -> None:
    lab.run(lab.router, list(argv))


def test_a_healthy_router_passes_and_each_break_is_named(lab: Lab) -> None:
    apply_rules(lab, "--ports", "80,443")
    proxy = start_proxy(lab, "--spoof-source")
    checks = assert_healthy(lab)
    assert checks["rules"]["detail"].startswith("table inet tproxy_rules diverts ports 80, 443")

    # (break, the check that must fail, a word of its fix, how to mend it)
    breaks: list[tuple[Callable[[], None], str, str, Callable[[], None]]] = [
        (lambda: sh(lab, "sysctl", "-qw", "net.ipv4.ip_forward=0"), "ip-forward",
         "net.ipv4.ip_forward=1", lambda: sh(lab, "sysctl", "-qw", "net.ipv4.ip_forward=1")),
        (lambda: sh(lab, "ip", "-4", "rule", "del", "pref", "32000"), "ip-rule",
         "ip -4 rule add fwmark 0x1 lookup 100",
         lambda: sh(lab, "ip", "-4", "rule", "add", "fwmark", "1", "lookup", "100", "pref",
                    "32000", "protocol", "201")),
        (lambda: sh(lab, "ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table",
                    "100"), "ip6-local-route", "ip -6 route add local ::/0 dev lo table 100",
         lambda: sh(lab, "ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100",
                    "proto", "201")),
        (lambda: sh(lab, "sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=1"),
         "src-valid-mark", "src_valid_mark=0",
         lambda: sh(lab, "sysctl", "-qw", "net.ipv4.conf.all.src_valid_mark=0")),
        (lambda: sh(lab, "sysctl", "-qw", "net.ipv4.ip_early_demux=1"), "early-demux",
         "ip_early_demux=0", lambda: sh(lab, "sysctl", "-qw", "net.ipv4.ip_early_demux=0")),
    ]  # fmt: skip
    for breaking, name, fix, mend in breaks:
        breaking()
        code, checks = doctor(lab)
        failed = [n for n, s in statuses(checks).items() if s == "fail"]
        assert code == 1 and failed == [name], (name, failed)
        assert fix in checks[name]["fix"], checks[name]
        mend()
        assert_healthy(lab)

    # Strict reverse-path filtering breaks only asymmetric setups: a warning, not a failure.
    sh(lab, "sysctl", "-qw", "net.ipv4.conf.to-client.rp_filter=1")
    code, checks = doctor(lab)
    assert code == 0 and checks["rp-filter"]["status"] == "warn"
    assert "to-client" in checks["rp-filter"]["detail"]
    sh(lab, "sysctl", "-qw", "net.ipv4.conf.to-client.rp_filter=0")

    proxy.stop()
    code, checks = doctor(lab)
    assert code == 1 and checks["listener"]["status"] == "fail"
    assert "tproxy run" in checks["listener"]["fix"]

    lab.run(lab.router, [sys.executable, "-m", "tproxy", "rules", "remove"])
    code, checks = doctor(lab)
    assert checks["rules"]["status"] == "fail" and "tproxy rules apply" in checks["rules"]["fix"]
    assert checks["ip-rule"]["status"] == "fail"


def test_without_privileges_doctor_says_so(lab: Lab) -> None:
    code, checks = doctor(lab, prefix=WITHOUT_CAPABILITIES)
    assert code == 1
    assert checks["privileges"]["status"] == "fail" and "sudo" in checks["privileges"]["fix"]
    assert checks["ip-transparent"]["status"] == "fail"
    assert checks["nft-tproxy"]["status"] == "skip"


def test_without_nft_doctor_says_so(lab: Lab, tmp_path: Path) -> None:
    # A PATH with everything doctor uses but nft.
    for tool in ("ip", "sysctl"):
        found = shutil.which(tool)
        assert found is not None
        os.symlink(found, tmp_path / tool)
    prefix = ["env", f"PATH={tmp_path}"]
    code, checks = doctor(lab, prefix=prefix)
    assert code == 1
    assert checks["nft"]["status"] == "fail" and "nftables" in checks["nft"]["fix"]
    assert checks["nft-tproxy"]["status"] == "skip"


def test_a_healthy_bridge_passes_and_each_break_is_named(bridge_lab: Lab) -> None:
    lab = bridge_lab
    apply_rules(lab, "--ports", "80", "--bridge", lab.BRIDGE)
    start_proxy(lab, "--spoof-source")
    checks = assert_healthy(lab)
    assert checks["ip-forward"]["status"] == "skip"  # a bridge does not route
    for name in ("bridge", "bridge-address", "bridge-mac", "bridge-ports"):
        assert checks[name]["status"] == "ok", checks[name]

    sh(lab, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
    code, checks = doctor(lab)
    assert code == 1 and checks["bridge-nf-call-iptables"]["status"] == "fail"
    sh(lab, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0")

    sh(lab, "ip", "link", "set", lab.BRIDGE, "address", "02:00:00:00:00:42")
    code, checks = doctor(lab)
    assert code == 1 and checks["bridge-mac"]["status"] == "fail"
    assert "02:00:00:00:00:42" in checks["bridge-mac"]["fix"]

    sh(lab, "ip", "link", "add", "late-port", "type", "veth", "peer", "name", "late-peer")
    sh(lab, "ip", "link", "set", "late-port", "master", lab.BRIDGE)
    code, checks = doctor(lab)
    assert checks["bridge-ports"]["status"] == "fail"
    assert "late-port" in checks["bridge-ports"]["detail"]

    apply_rules(lab, "--ports", "80", "--bridge", lab.BRIDGE)  # the fix doctor gave
    assert_healthy(lab)

    sh(lab, "ip", "addr", "flush", "dev", lab.BRIDGE)
    code, checks = doctor(lab)
    assert code == 1 and checks["bridge-address"]["status"] == "fail"


def test_a_healthy_redirect_setup_passes(lab: Lab) -> None:
    apply_rules(lab, "--ports", "80", "--mode", "redirect")
    start_proxy(lab, "--mode", "redirect")
    checks = assert_healthy(lab)
    assert checks["nft-redirect"]["status"] == "ok"
    assert "nft-tproxy" not in checks
    # Checked for the other mode, the same setup is named for what it is.
    code, checks = doctor(lab, "--mode", "tproxy")
    assert code == 1 and "redirect" in checks["rules"]["detail"]


def test_doctor_lists_the_exclusions_and_the_quic_block(lab: Lab) -> None:
    apply_rules(lab, "--ports", "443")
    start_proxy(lab, "--spoof-source")
    checks = assert_healthy(lab)
    assert checks["exclude"]["detail"] == "excluded: none (every network is diverted)"
    assert "--block-quic" in checks["quic"]["detail"]

    apply_rules(lab, "--ports", "443", "--exclude", "198.18.2.0/24", "--exclude",
                "2001:db8:2::/64", "--block-quic")  # fmt: skip
    checks = assert_healthy(lab)
    assert checks["exclude"]["detail"] == "excluded: 198.18.2.0/24, 2001:db8:2::/64"
    assert checks["quic"]["detail"] == (
        "QUIC: blocked on 443 (UDP rejected with ICMP port unreachable)"
    )
    result = lab.run(lab.router, [sys.executable, "-m", "tproxy", "doctor", "--json"])
    assert json.loads(result.stdout)["installed"] == {
        "exclude": ["198.18.2.0/24", "2001:db8:2::/64"],
        "block_quic": True,
    }
    text = lab.run(lab.router, [sys.executable, "-m", "tproxy", "doctor"]).stdout.decode()
    assert "excluded: 198.18.2.0/24, 2001:db8:2::/64" in text
    assert "QUIC: blocked on 443" in text
