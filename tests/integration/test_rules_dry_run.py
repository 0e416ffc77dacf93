"""`tproxy rules apply --dry-run` prints exactly what `apply` then runs, in a namespace.

Every nft and ip command the CLI runs goes through a logging wrapper first on its PATH, so the
test compares the dry run with what apply actually fed to nft and ip, not with a re-rendering.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import WITHOUT_CAPABILITIES
from tproxy.lab.topology import Host, Lab
from tproxy.rules.plan import parse_dry_run_nft

WRAPPER = """#!{python}
import json, os, subprocess, sys
args = sys.argv[1:]
stdin = sys.stdin.read() if args[:2] == ["-f", "-"] else None
with open({log!r}, "a") as log:
    log.write(json.dumps({{"argv": [{name!r}, *args], "stdin": stdin}}) + "\\n")
if stdin is None:
    os.execv({real!r}, [{real!r}, *args])
sys.exit(subprocess.run([{real!r}, *args], input=stdin, text=True).returncode)
"""
MUTATING_VERBS = {"add", "replace", "del", "delete", "change", "flush"}


class RecordedCLI:
    """Runs `tproxy` in a lab namespace with nft and ip wrapped, so every call is logged."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.workdir = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-wrap-"))
        lab.cleanup_paths.append(self.workdir)
        self.log = self.workdir / "calls.jsonl"
        bin_dir = self.workdir / "bin"
        bin_dir.mkdir()
        for name in ("nft", "ip"):
            real = shutil.which(name)
            assert real is not None, f"{name} is not installed"
            wrapper = bin_dir / name
            wrapper.write_text(
                WRAPPER.format(python=sys.executable, log=str(self.log), name=name, real=real)
            )
            wrapper.chmod(0o755)
        self.path = f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"

    def run(self, *args: str, prefix: tuple[str, ...] = ()) -> list[str]:
        """`tproxy ARGS` in the router; return its stdout's lines (it must succeed)."""
        self.log.unlink(missing_ok=True)
        argv = [*prefix, "env", f"PATH={self.path}", sys.executable, "-m", "tproxy", *args]
        return self.lab.run(self.lab.router, argv).stdout.decode().splitlines()

    def calls(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def changes(self) -> tuple[list[str], list[str]]:
        """The nft scripts fed to `nft -f -`, and the ip commands that change something."""
        scripts, commands = [], []
        for call in self.calls():
            argv = call["argv"]
            if call["stdin"] is not None:
                scripts.append(call["stdin"])
            elif argv[0] == "ip":
                words = [w for w in argv[1:] if not w.startswith("-")]
                if len(words) >= 2 and words[1] in MUTATING_VERBS:
                    commands.append(" ".join(argv))
            else:
                assert argv[:2] == ["nft", "list"], f"unexpected nft call {argv}"
        return scripts, commands


def sysctl(lab: Lab, host: Host, name: str) -> str:
    return lab.run(host, ["sysctl", "-n", name]).stdout.decode().strip()


def planned_sysctls(dry_run: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (value, was) for every `sysctl -w` line of a dry run."""
    found = (re.fullmatch(r"sysctl -w (\S+)=(\S+)  # was (\S+): .*", line) for line in dry_run)
    return {m[1]: (m[2], m[3]) for m in found if m}


def reported_sysctls(report: list[str]) -> dict[str, tuple[str, str]]:
    found = (re.fullmatch(r"set (\S+)=(\S+) \(was (\S+)\): .*", line) for line in report)
    return {m[1]: (m[2], m[3]) for m in found if m}


def assert_dry_run_is_what_apply_does(cli: RecordedCLI, *args: str) -> list[str]:
    """Dry-run `rules apply ARGS`, then apply them: the same script, commands and sysctls."""
    dry_run = cli.run("rules", "apply", *args, "--dry-run")
    assert cli.changes() == ([], []), "the dry run changed something"
    assert not any(line.startswith("# could not read") for line in dry_run), dry_run
    report = cli.run("rules", "apply", *args)
    scripts, commands = cli.changes()
    assert scripts == [parse_dry_run_nft(dry_run)]
    assert commands == [line for line in dry_run if line.startswith("ip ")]
    planned = planned_sysctls(dry_run)
    assert reported_sysctls(report) == planned
    for name, (value, _) in planned.items():
        assert sysctl(cli.lab, cli.lab.router, name) == value
    return dry_run


def test_dry_run_is_what_apply_does_on_a_router(lab: Lab) -> None:
    cli = RecordedCLI(lab)
    first = assert_dry_run_is_what_apply_does(cli, "--ports", "80")
    assert "sysctl -w net.ipv4.ip_early_demux=0  # was 1: " in "\n".join(first)
    # Installed: the restore comment keeps the first apply's value, the rules are in place.
    again = assert_dry_run_is_what_apply_does(cli, "--ports", "80,443", "--when-down", "pass")
    assert '\t\tcomment "restore net.ipv4.ip_early_demux=1"' in again
    assert "# net.ipv4.ip_early_demux is already 0" in again
    assert any(line.startswith("# already in place: ip -4 rule add") for line in again)
    # Redirect mode deletes the earlier policy routing, last; and back to tproxy.
    redirect = assert_dry_run_is_what_apply_does(cli, "--ports", "80", "--mode", "redirect")
    assert any(line.startswith("ip -4 rule del") for line in redirect)
    back = assert_dry_run_is_what_apply_does(cli, "--ports", "80", "--local")
    assert '\t\tcomment "restore net.ipv4.ip_early_demux=1"' in back


def test_dry_run_is_what_apply_does_on_a_bridge(bridge_lab: Lab) -> None:
    cli = RecordedCLI(bridge_lab)
    first = assert_dry_run_is_what_apply_does(cli, "--ports", "80", "--bridge", Lab.BRIDGE)
    assert "table bridge tproxy_rules {" in first
    again = assert_dry_run_is_what_apply_does(cli, "--ports", "80,443", "--bridge", Lab.BRIDGE)
    restore = next(line for line in again if 'comment "restore' in line)
    assert "net.bridge.bridge-nf-call-iptables=1" in restore
    # Without --bridge this time: the installed bridge table goes in the same transaction.
    routed = assert_dry_run_is_what_apply_does(cli, "--ports", "80")
    assert "delete table bridge tproxy_rules" in routed
    assert "table bridge tproxy_rules {" not in routed


@pytest.mark.parametrize("without", ["capabilities", "nft"])
def test_dry_run_says_what_it_could_not_read(lab: Lab, without: str) -> None:
    cli = RecordedCLI(lab)
    cli.run("rules", "apply", "--ports", "80")
    exact = cli.run("rules", "apply", "--ports", "80", "--dry-run")
    if without == "capabilities":
        limited = cli.run(
            "rules", "apply", "--ports", "80", "--dry-run", prefix=tuple(WITHOUT_CAPABILITIES)
        )
        reason = "reading nftables needs CAP_NET_ADMIN"
    else:
        only_ip = cli.workdir / "only-ip"
        only_ip.mkdir()
        (only_ip / "ip").symlink_to(cli.workdir / "bin" / "ip")
        argv = ["env", f"PATH={only_ip}", sys.executable, "-m", "tproxy", "rules", "apply",
                "--ports", "80", "--dry-run"]  # fmt: skip
        limited = lab.run(lab.router, argv).stdout.decode().splitlines()
        reason = "nft is not installed"
    assert cli.changes()[0] == [] and cli.changes()[1] == []
    said, *rest = limited
    assert said.startswith(f"# could not read our installed nftables tables ({reason}")
    # Everything else is the exact plan, but for what only the table could tell: the sysctl
    # value to restore (early_demux is 0 now; the table remembers it was 1).
    differing = [(a, b) for a, b in zip(exact, rest, strict=True) if a != b]
    assert differing == [
        ('\t\tcomment "restore net.ipv4.ip_early_demux=1"', '\t\tcomment "restore"')
    ]


def test_dry_run_is_what_apply_does_with_exclusions_and_quic(lab: Lab) -> None:
    cli = RecordedCLI(lab)
    first = assert_dry_run_is_what_apply_does(
        cli, "--ports", "80,443", "--exclude", "198.18.2.0/24", "--exclude", "198.18.2.128/25",
        "--exclude", "2001:db8:2::/64", "--exclude", "198.18.9.9", "--block-quic", "--local",
    )  # fmt: skip
    # Overlapping exclusions are merged before nft sees them (it refuses overlapping intervals).
    assert "\t\telements = { 198.18.2.0/24, 198.18.9.9/32 }" in first
    assert (
        "\t\tmeta l4proto udp udp dport @divert_ports reject with icmpx port-unreachable" in first
    )
    # Other exclusions, no QUIC block: replaced in the one transaction (one script, checked above).
    again = assert_dry_run_is_what_apply_does(
        cli, "--ports", "80,443", "--exclude", "198.18.4.0/24"
    )
    assert not any("exclude_v6" in line or "block_quic" in line for line in again)
    installed = lab.run(lab.router, ["nft", "list", "table", "inet", "tproxy_rules"])
    listing = installed.stdout.decode()
    assert "198.18.4.0/24" in listing and "198.18.2.0/24" not in listing
    assert "exclude_v6" not in listing and "block_quic" not in listing


def test_dry_run_is_what_apply_does_with_quic_on_a_bridge(bridge_lab: Lab) -> None:
    cli = RecordedCLI(bridge_lab)
    printed = assert_dry_run_is_what_apply_does(
        cli, "--ports", "443", "--bridge", Lab.BRIDGE, "--block-quic", "--exclude", "198.18.3.3",
    )  # fmt: skip
    bridge = printed[printed.index("table bridge tproxy_rules {") :]
    assert "\t\tip daddr @exclude_v4 return" in bridge
    assert any("meta l4proto udp udp dport @divert_ports ether daddr set" in x for x in bridge)
