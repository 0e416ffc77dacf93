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
from tproxy.rules.plan import (
    Observed,
    RoutingStep,
    RulesApplyError,
    plan_apply,
    render_dry_run,
    render_policy_routing_removal,
    render_report,
)
from tproxy.rules.render import (
    AppliedSettings,
    IPCommand,
    parse_listing,
    parse_set_elements,
    render_nft_remove,
    required_sysctls,
)

CAP_NET_ADMIN = 12  # <linux/capability.h>
SYSCTL_ROOT = Path("/proc/sys")

Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


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

    `need_root=False` (a dry run, which only reads): nft is not needed either; without it or
    without CAP_NET_ADMIN the dry run says what it could not read.

    Raises:
        RulesApplyError: nft or ip is not installed, or we lack CAP_NET_ADMIN.
    """
    tools = (("nft", "nftables"), ("ip", "iproute2")) if need_root else (("ip", "iproute2"),)
    for tool, package in tools:
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


def _read_table_exactly(runner: Runner, family: str) -> str | None:
    """Like `read_table`, but an answer other than "no such table" is an error, not None.

    Raises:
        RulesApplyError: nft could not list the table.
    """
    result = runner(["nft", "list", "table", family, TABLE_NAME], None)
    if result.returncode == 0:
        return result.stdout
    if "No such file or directory" in result.stderr:
        return None
    raise RulesApplyError(
        f"cannot read table {family} {TABLE_NAME}: {_nft_error_text(result.stderr)}"
    )


def _tables_unreadable() -> str | None:
    """Why our tables cannot be read here, or None if they can."""
    if shutil.which("nft") is None:
        return "nft is not installed"
    if not has_net_admin():
        return "reading nftables needs CAP_NET_ADMIN: run as root for an exact plan"
    return None


def observe(spec: RulesSpec, runner: Runner, *, exact: bool = True) -> Observed:
    """Read what `plan_apply` needs from this network namespace; change nothing.

    `exact=False` (a dry run): where our tables cannot be read, say why in
    `Observed.unreadable` instead of failing.

    Raises:
        RulesApplyError: the bridge named in `spec` is missing or not a bridge, or (`exact`)
            nft could not list our tables.
    """
    bridge = None if spec.bridge is None else read_bridge(runner, spec.bridge)
    unreadable = None if exact else _tables_unreadable()
    table = bridge_table = None
    if unreadable is None:
        try:
            table = _read_table_exactly(runner, "inet")
            bridge_table = _read_table_exactly(runner, "bridge")
        except RulesApplyError as exc:
            if exact:
                raise
            table, unreadable = None, str(exc)
    sysctls = {name: read_sysctl(name) for name in required_sysctls(spec.mode, spec.bridge)}
    families = _available_families()
    return Observed(
        table=table,
        bridge_table=bridge_table,
        unreadable=unreadable,
        sysctls=sysctls,
        bridge=bridge,
        ip_rules={f: tuple(our_ip_rules(runner, f)) for f in families},
        routes={f: tuple(our_routes(runner, f)) for f in families},
    )


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

    Idempotent: applying the same spec twice leaves the same state and says so. What is done is
    exactly `plan_apply`'s plan, the one `plan_rules` prints.

    Raises:
        RulesApplyError: a step failed; everything this call changed has been put back.
    """
    preflight()
    plan = plan_apply(spec, observe(spec, runner))
    undo = _Undo()
    try:
        _nft(runner, plan.nft_script)
        undo.steps.append(partial(_nft, runner, plan.nft_undo))
        for step in plan.routing:
            _run_step(runner, step, undo)
        for change in plan.sysctls:
            write_sysctl(change.name, change.value)
            undo.steps.append(partial(write_sysctl, change.name, change.was))
    except BaseException:
        undo.run()
        raise
    for command in plan.cleanup:
        _run_ip(runner, command)
    return render_report(plan)


def _run_step(runner: Runner, step: RoutingStep, undo: _Undo) -> None:
    _run_ip(runner, step.command)
    if step.undo is not None:
        undo.steps.append(partial(_run_ip, runner, step.undo))


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
    for command in _policy_routing_removal(runner):
        _run_ip(runner, command)
        report.append(" ".join(command.argv))
    if not report:
        report.append("nothing to remove: no rules of tproxy's are installed")
    return report


def _policy_routing_removal(runner: Runner) -> list[IPCommand]:
    """The commands that delete our ip rules and routes (routing protocol 201), as read now."""
    families = _available_families()
    return render_policy_routing_removal(
        {f: our_ip_rules(runner, f) for f in families}, {f: our_routes(runner, f) for f in families}
    )


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
    if listing is not None:
        lines.extend(policy_summary(listing))
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


def policy_summary(listing: str) -> list[str]:
    """What our installed table exempts and blocks, one line each (for `show`)."""
    settings = applied_settings(listing)
    ports = ", ".join(parse_set_elements(listing, "divert_ports")) or "?"
    excluded = ", ".join(str(n) for n in settings.exclude) or "none"
    if settings.block_quic:
        quic = f"blocked: UDP to {ports} is rejected (ICMP port unreachable)"
    else:
        quic = f"not blocked: UDP to {ports} passes (--block-quic rejects it)"
    return [f"excluded from diversion: {excluded}", f"QUIC: {quic}"]


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
    """What `apply_rules` would do, changing nothing (`--dry-run`; needs no root).

    The same `plan_apply` as `apply_rules`, from the same reads, through a runner that refuses
    anything but reading: as root the output is exactly what apply would run; without
    CAP_NET_ADMIN (or without nft) our installed tables cannot be read, and the output says so.
    """
    preflight(need_root=False)
    reader = read_only(runner)
    return render_dry_run(plan_apply(spec, observe(spec, reader, exact=False)))


def read_only(runner: Runner) -> Runner:
    """`runner`, restricted to the commands that only read (`nft list ...`, `ip ... show`).

    Raises (from the returned runner):
        PermissionError: anything else was asked for, which would be a bug in a dry run.
    """

    def run(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        if not is_read_only(argv) or stdin is not None:
            raise PermissionError(f"a dry run must not run {' '.join(argv)!r}")
        return runner(argv, stdin)

    return run


def is_read_only(argv: Sequence[str]) -> bool:
    """Whether `argv` is an nft or ip command that only reads."""
    words = list(argv)
    if words[:2] == ["nft", "list"]:
        return True
    if words[:1] != ["ip"]:
        return False
    objects = [w for w in words[1:] if not w.startswith("-")]
    return (
        len(objects) >= 2
        and objects[0] in ("link", "addr", "rule", "route")
        and (objects[1] in ("show", "list"))
    )
