"""Apply, remove and show the diversion: the I/O half of `tproxy.rules` (nft, ip, /proc/sys).

All or nothing: the nftables part is one `nft -f` transaction; the policy routing and sysctls
follow it, and if any step fails everything this run changed is put back before the error is
reported. `remove` finds our pieces by their marks (our table's name, routing protocol 201), so it
never touches anyone else's rules, and needs none of apply's options.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tproxy.core.config import InterceptMode
from tproxy.rules.model import RTPROT_TPROXY, TABLE_NAME, BridgeInfo, RulesSpec
from tproxy.rules.render import (
    AppliedSettings,
    IPCommand,
    parse_listing,
    render_ip_route_replace,
    render_ip_rule_add,
    render_nft_apply,
    render_nft_remove,
    required_sysctls,
    routing_families,
)

CAP_NET_ADMIN = 12  # <linux/capability.h>
SYSCTL_ROOT = Path("/proc/sys")

Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


class RulesApplyError(Exception):
    """The rules could not be applied or removed; the message is one sentence for the operator."""


def run_command(argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)


def has_net_admin() -> bool:
    """CAP_NET_ADMIN in the effective set (root normally has it; so can a non-root service)."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return os.geteuid() == 0
    match = re.search(r"^CapEff:\s*([0-9a-f]+)$", status, re.MULTILINE)
    return bool(match and int(match.group(1), 16) >> CAP_NET_ADMIN & 1)


def ipv6_available() -> bool:
    return (SYSCTL_ROOT / "net/ipv6").is_dir()


def _available_families() -> tuple[int, ...]:
    return (4, 6) if ipv6_available() else (4,)


def read_sysctl(name: str) -> str | None:
    try:
        return (SYSCTL_ROOT / name.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def write_sysctl(name: str, value: str) -> None:
    try:
        (SYSCTL_ROOT / name.replace(".", "/")).write_text(value + "\n")
    except OSError as exc:
        raise RulesApplyError(f"cannot set {name}={value}: {exc.strerror}") from None


def preflight(need_root: bool = True) -> None:
    """Fail early, with one sentence, on what would make every later step fail.

    Raises:
        RulesApplyError: nft or ip is not installed, or we lack CAP_NET_ADMIN.
    """
    for tool, package in (("nft", "nftables"), ("ip", "iproute2")):
        if shutil.which(tool) is None:
            raise RulesApplyError(
                f"'{tool}' was not found: install it (apt-get install {package}) and try again"
            )
    if need_root and not has_net_admin():
        raise RulesApplyError("changing firewall rules needs root (CAP_NET_ADMIN): run with sudo")


def _nft_error_text(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("Error:")]
    first = lines[0].removeprefix("Error: ") if lines else stderr.strip()
    if "tproxy" in stderr and "No such file or directory" in stderr:
        return "the kernel has no nftables tproxy support (CONFIG_NFT_TPROXY, module nft_tproxy)"
    if "socket" in stderr and "No such file or directory" in stderr:
        return "the kernel has no nftables socket match (CONFIG_NFT_SOCKET, module nft_socket)"
    if "Operation not permitted" in stderr:
        return "nft was refused: changing firewall rules needs root (CAP_NET_ADMIN)"
    return f"nft rejected the ruleset: {first}"


def _nft(runner: Runner, script: str) -> None:
    result = runner(["nft", "-f", "-"], script)
    if result.returncode != 0:
        raise RulesApplyError(_nft_error_text(result.stderr))


def read_table(runner: Runner, family: str = "inet") -> str | None:
    """Our table of `family` as `nft list` prints it, or None if it does not exist."""
    result = runner(["nft", "list", "table", family, TABLE_NAME], None)
    return result.stdout if result.returncode == 0 else None


def applied_settings(listing: str | None) -> AppliedSettings:
    """What our installed table was applied with (defaults if there is none)."""
    return parse_listing(listing)[0]


def read_bridge(runner: Runner, name: str) -> BridgeInfo:
    """The bridge `name` in this namespace.

    Raises:
        RulesApplyError: there is no such interface, or it is not a bridge.
    """
    links = ip_json(runner, ["-d", "link", "show", "dev", name])
    if not links:
        raise RulesApplyError(
            f"there is no interface {name!r} here: create the bridge first (ip link add {name} "
            f"type bridge) and enslave the two sides to it"
        )
    kind = links[0].get("linkinfo", {}).get("info_kind")
    if kind != "bridge":
        raise RulesApplyError(f"{name!r} is not a Linux bridge (it is a {kind or 'plain'} link)")
    addresses = ip_json(runner, ["addr", "show", "dev", name])
    infos = addresses[0].get("addr_info", []) if addresses else []
    ports = ip_json(runner, ["link", "show", "master", name])
    return BridgeInfo(
        name=name,
        mac=str(links[0].get("address", "")),
        ports=tuple(sorted(str(p["ifname"]) for p in ports if "ifname" in p)),
        ipv4=tuple(str(a["local"]) for a in infos if a.get("family") == "inet"),
        ipv6=tuple(
            str(a["local"])
            for a in infos
            if a.get("family") == "inet6" and a.get("scope") != "link"
        ),
    )


def ip_json(runner: Runner, argv: Sequence[str]) -> list[dict[str, Any]]:
    result = runner(["ip", "-j", *argv], None)
    if result.returncode != 0 or not result.stdout.strip():
        return []
    parsed = json.loads(result.stdout)
    return parsed if isinstance(parsed, list) else []


def _is_ours(entry: dict[str, Any]) -> bool:
    return str(entry.get("protocol", "")) == str(RTPROT_TPROXY)


def our_ip_rules(runner: Runner, family: int) -> list[dict[str, Any]]:
    return [e for e in ip_json(runner, [f"-{family}", "rule", "show"]) if _is_ours(e)]


def our_routes(runner: Runner, family: int) -> list[dict[str, Any]]:
    return ip_json(
        runner, [f"-{family}", "route", "show", "table", "all", "proto", str(RTPROT_TPROXY)]
    )


def _rule_matches(entry: dict[str, Any], spec: RulesSpec) -> bool:
    fwmark = str(entry.get("fwmark", ""))
    return (
        entry.get("priority") == spec.rule_priority
        and fwmark.startswith("0x")
        and int(fwmark.split("/", 1)[0], 16) == spec.divert_mark
        and str(entry.get("table")) == str(spec.route_table)
    )


def _run_ip(runner: Runner, command: IPCommand) -> None:
    result = runner(command.argv, None)
    if result.returncode != 0:
        raise RulesApplyError(f"'{' '.join(command.argv)}' failed: {result.stderr.strip()}")


@dataclass
class _Undo:
    """What one apply run changed, newest last, so a failure can put it back."""

    steps: list[Callable[[], None]] = field(default_factory=list)

    def run(self) -> None:
        for step in reversed(self.steps):
            # Best effort: the caller reports the original error, not the rollback's.
            with contextlib.suppress(RulesApplyError, OSError):
                step()


def apply_rules(spec: RulesSpec, runner: Runner = run_command) -> list[str]:
    """Install the diversion; return what was done, one line each.

    Idempotent: applying the same spec twice leaves the same state and says so.

    Raises:
        RulesApplyError: a step failed; everything this call changed has been put back.
    """
    preflight()
    report: list[str] = []
    bridge = None
    if spec.bridge is not None:
        bridge = read_bridge(runner, spec.bridge)
        if not bridge.ports:
            raise RulesApplyError(
                f"bridge {spec.bridge} has no ports: enslave the interfaces first "
                f"(ip link set IFACE master {spec.bridge})"
            )
        if not bridge.ipv4:
            raise RulesApplyError(
                f"bridge {spec.bridge} has no IPv4 address: give it one in the bridged subnet "
                f"(ip addr add ADDRESS/PREFIX dev {spec.bridge}); the proxy's own packets "
                "(ARP, and its connections as the client) need it"
            )
    before = read_table(runner)
    before_bridge = read_table(runner, "bridge")
    restore = parse_listing(before)[1]
    sysctl_changes: list[tuple[str, str]] = []
    for name, (wanted, why) in required_sysctls(spec.mode, spec.bridge).items():
        current = read_sysctl(name)
        if current is not None and current != wanted:
            restore.setdefault(name, current)
            sysctl_changes.append((name, wanted))
            report.append(f"set {name}={wanted} (was {current}): {why}")
    undo = _Undo()
    try:
        had_bridge_table = before_bridge is not None
        _nft(runner, render_nft_apply(spec, restore, bridge, drop_bridge_table=had_bridge_table))
        put_back = render_nft_remove(bridge=had_bridge_table or spec.bridge is not None)
        undo.steps.append(partial(_nft, runner, put_back + (before or "") + (before_bridge or "")))
        verb = "created" if before is None else "replaced"
        report.append(f"{verb} nftables table inet {TABLE_NAME} ({_describe(spec)})")
        if bridge is not None:
            verb = "created" if before_bridge is None else "replaced"
            report.append(
                f"{verb} nftables table bridge {TABLE_NAME}: TCP on those ports crossing "
                f"{bridge.name} (ports {', '.join(bridge.ports)}) goes up to this box's IP "
                f"stack (frames re-addressed to {bridge.mac})"
            )
        elif had_bridge_table:
            report.append(f"deleted nftables table bridge {TABLE_NAME} (no --bridge this time)")
        existing = {f: our_ip_rules(runner, f) for f in routing_families(spec)}
        for command in render_ip_rule_add(spec):
            if any(_rule_matches(e, spec) for e in existing[command.family]):
                continue
            _run_ip(runner, command)
            undo.steps.append(partial(_run_ip, runner, _as_delete(command)))
            report.append(" ".join(command.argv))
        for command in render_ip_route_replace(spec):
            had_route = any(
                str(r.get("table")) == str(spec.route_table)
                for r in our_routes(runner, command.family)
            )
            _run_ip(runner, command)
            if not had_route:
                undo.steps.append(partial(_run_ip, runner, _as_delete(command)))
            report.append(" ".join(command.argv))
        for name, wanted in sysctl_changes:
            old = restore[name]
            write_sysctl(name, wanted)
            undo.steps.append(partial(write_sysctl, name, old))
    except BaseException:
        undo.run()
        raise
    if spec.mode is InterceptMode.REDIRECT:
        # Policy routing left from an earlier TPROXY apply is not needed any more; it goes
        # last, after everything that could fail, so a failure here leaves working rules.
        report += _remove_policy_routing(runner)
    return report


def _describe(spec: RulesSpec) -> str:
    ports = ",".join(str(r) for r in spec.ports)
    where = []
    if spec.bridge:
        where.append(f"bridged on {spec.bridge}")
    else:
        where.append("routed")
    if spec.local:
        where.append("this box's own")
    return f"{spec.mode.value}: {ports} -> :{spec.proxy_port}, {' and '.join(where)} connections"


def _as_delete(command: IPCommand) -> IPCommand:
    """The `ip ... del` that undoes an `ip ... add` or `ip ... replace`."""
    argv = list(command.argv)
    verb = 3  # ip -4 rule|route VERB ...
    argv[verb] = "del"
    return IPCommand(tuple(argv), command.family)


def remove_rules(runner: Runner = run_command) -> list[str]:
    """Remove everything `apply_rules` created (and only that); return what was removed.

    Raises:
        RulesApplyError: a step failed.
    """
    preflight()
    report: list[str] = []
    listing = read_table(runner)
    bridge_listing = read_table(runner, "bridge")
    if listing is not None:
        for name, value in parse_listing(listing)[1].items():
            write_sysctl(name, value)
            report.append(f"restored {name}={value}")
    if listing is not None or bridge_listing is not None:
        _nft(runner, render_nft_remove(inet=listing is not None, bridge=bridge_listing is not None))
        for family, found in (("inet", listing), ("bridge", bridge_listing)):
            if found is not None:
                report.append(f"deleted nftables table {family} {TABLE_NAME}")
    report += _remove_policy_routing(runner)
    if not report:
        report.append("nothing to remove: no rules of tproxy's are installed")
    return report


def _remove_policy_routing(runner: Runner) -> list[str]:
    """Delete our ip rules and routes (routing protocol 201); return what was deleted."""
    report: list[str] = []
    for family in _available_families():
        for rule in our_ip_rules(runner, family):
            argv = ("ip", f"-{family}", "rule", "del", "pref", str(rule["priority"]),
                    "protocol", str(RTPROT_TPROXY))  # fmt: skip
            _run_ip(runner, IPCommand(argv, family))
            report.append(" ".join(argv))
        for route in our_routes(runner, family):
            route_argv = (
                "ip", f"-{family}", "route", "del", str(route.get("type", "local")),
                str(route["dst"]), "dev", str(route.get("dev", "lo")),
                "table", str(route.get("table", "main")), "proto", str(RTPROT_TPROXY),
            )  # fmt: skip
            _run_ip(runner, IPCommand(route_argv, family))
            report.append(" ".join(route_argv))
    return report


def show_rules(runner: Runner = run_command) -> list[str]:
    """The current state of everything the rules manager owns or needs, as lines for a terminal."""
    preflight()
    lines: list[str] = []
    listing = read_table(runner)
    if listing is None:
        lines.append(f"nftables: no table inet {TABLE_NAME} (rules not applied)")
    for kind in ("inet", "bridge"):
        found = listing if kind == "inet" else read_table(runner, kind)
        if found is not None:
            lines.append(f"nftables: table {kind} {TABLE_NAME}")
            lines.extend("  " + line for line in found.rstrip().splitlines())
    for family in _available_families():
        rules = our_ip_rules(runner, family)
        routes = our_routes(runner, family)
        if not rules and not routes:
            lines.append(f"IPv{family} policy routing: none of ours")
        for rule in rules:
            lines.append(
                f"IPv{family} rule: pref {rule.get('priority')} fwmark {rule.get('fwmark')} "
                f"lookup {rule.get('table')}"
            )
        for route in routes:
            lines.append(
                f"IPv{family} route: {route.get('type', '')} {route.get('dst')} dev "
                f"{route.get('dev')} table {route.get('table')}"
            )
    lines.extend(sysctl_findings(applied_settings(listing), ipv6=ipv6_available()))
    lines.append("for a check of everything a working setup needs: tproxy doctor")
    return lines


def sysctl_findings(settings: AppliedSettings, *, ipv6: bool) -> list[str]:
    """The sysctls the applied rules depend on, each with what is wrong if it is wrong.

    `ipv6`: the rules divert IPv6 too, so IPv6 forwarding is checked as well as IPv4's.
    """
    findings: list[str] = []
    for name, (wanted, why) in required_sysctls(settings.mode, settings.bridge).items():
        value = read_sysctl(name)
        if value is not None:
            verdict = "ok" if value == wanted else f"should be {wanted}: {why}"
            findings.append(f"{name} = {value} ({verdict})")
    if settings.bridge is None:  # a bridge bridges; only a router must forward
        forwarding = [("net.ipv4.ip_forward", "IPv4")]
        if ipv6:
            forwarding.append(("net.ipv6.conf.all.forwarding", "IPv6"))
        for name, version in forwarding:
            forward = read_sysctl(name)
            if forward is not None:
                verdict = (
                    "ok"
                    if forward == "1"
                    else f"this box does not route {version}: set it to 1 on a router"
                )
                findings.append(f"{name} = {forward} ({verdict})")
    valid_mark = read_sysctl("net.ipv4.conf.all.src_valid_mark")
    if valid_mark == "1" and settings.mode is InterceptMode.TPROXY:
        findings.append(
            "net.ipv4.conf.all.src_valid_mark = 1 (breaks TPROXY with --spoof-source: set it to 0)"
        )
    return findings


def plan_rules(spec: RulesSpec, runner: Runner = run_command) -> list[str]:
    """What `apply_rules` would do, changing nothing (`--dry-run`; needs no root)."""
    preflight(need_root=False)
    restore: dict[str, str] = {}
    lines = ["# sysctls"]
    for name, (wanted, why) in required_sysctls(spec.mode, spec.bridge).items():
        current = read_sysctl(name)
        if current is not None and current != wanted:
            restore[name] = current
            lines.append(f"sysctl -w {name}={wanted}  # was {current}: {why}")
        else:
            lines.append(f"# {name} is already {wanted}")
    bridge = None if spec.bridge is None else read_bridge(runner, spec.bridge)
    lines.append("# nftables, one transaction (nft -f -)")
    lines.extend(render_nft_apply(spec, restore, bridge).rstrip().splitlines())
    routing = [*render_ip_rule_add(spec), *render_ip_route_replace(spec)]
    if routing:
        lines.append("# policy routing (ip rules are added only if missing)")
    else:
        lines.append("# no policy routing in redirect mode (our earlier ip rules are removed)")
    for command in routing:
        lines.append(" ".join(command.argv))
    return lines
