"""Decide what `tproxy rules apply` does on this box: one plan, run by apply, printed by --dry-run.

Pure: `plan_apply` takes the spec and what was read from the box (`Observed`) and returns every
step with what undoes it; `rules.apply` reads the box, then either carries the plan out or prints
it (`render_dry_run`). Because both go through `plan_apply`, the dry run cannot drift from what
apply does: the same nft script (restore comment and bridge table included), the same ip
commands, the same sysctl writes, in the same order.

What an apply depends on, besides the spec:

* our installed tables: an installed inet table's restore comment carries the sysctl values to
  put back on remove, and survives a re-apply (the first apply's "was" values win); an installed
  bridge table is deleted in the same transaction when `--bridge` is not given this time.
  Reading them needs CAP_NET_ADMIN; a dry run without it plans as if none were installed and
  says so in one line (`Observed.unreadable`).
* the sysctls' current values (readable by anyone);
* our ip rules (added only if missing) and routes (replaced, undone only if they were not
  there), readable by anyone; in redirect mode our earlier policy routing is deleted, last;
* the bridge's MAC and ports (bridge mode).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tproxy.core.config import InterceptMode
from tproxy.rules.model import RTPROT_TPROXY, TABLE_NAME, BridgeInfo, Network, RulesSpec
from tproxy.rules.render import (
    IPCommand,
    parse_listing,
    render_ip_route_replace,
    render_ip_rule_add,
    render_nft_apply,
    render_nft_remove,
    required_sysctls,
)

NFT_HEADER = "# nftables, one transaction (nft -f -)"


class RulesApplyError(Exception):
    """The rules could not be applied or removed; the message is one sentence for the operator."""


@dataclass(frozen=True)
class Observed:
    """What this box has now, as read before an apply (reading it changes nothing).

    Args:
        table: our inet table as `nft list` prints it, None if there is none (or unreadable).
        bridge_table: our bridge table likewise.
        unreadable: why our tables could not be read (no CAP_NET_ADMIN, no nft); None when
            `table` and `bridge_table` are exact.
        sysctls: the current value of every sysctl the spec needs (None: not on this kernel).
        bridge: the bridge named by `--bridge`, if any.
        ip_rules: our ip rules (routing protocol 201) per IP version, as `ip -j rule` prints.
        routes: our routes (routing protocol 201) per IP version, as `ip -j route` prints.
    """

    table: str | None = None
    bridge_table: str | None = None
    unreadable: str | None = None
    sysctls: Mapping[str, str | None] = field(default_factory=dict)
    bridge: BridgeInfo | None = None
    ip_rules: Mapping[int, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    routes: Mapping[int, Sequence[Mapping[str, Any]]] = field(default_factory=dict)


@dataclass(frozen=True)
class SysctlChange:
    name: str
    value: str
    was: str
    why: str


@dataclass(frozen=True)
class RoutingStep:
    """One `ip` command to run, and the one that undoes it if a later step fails (if any)."""

    command: IPCommand
    undo: IPCommand | None


@dataclass(frozen=True)
class Plan:
    """Everything one apply does, in order: nft, routing, sysctls, then `cleanup`.

    Args:
        nft_script: the one nft transaction that creates or replaces our tables.
        nft_undo: the transaction that puts our tables back as they were.
        nft_report: what the transaction does, one line each, for the operator.
        routing: the ip rules to add (those missing) and routes to replace.
        rules_in_place: the ip rules that are already there and are left alone.
        sysctls: the sysctls to change, written after the routing.
        sysctls_in_place: sysctl -> why it is left alone (already right, or not on this kernel).
        cleanup: our earlier policy routing that redirect mode deletes, after everything else.
        unreadable: why the plan could not see our installed tables (None: it is exact).
    """

    nft_script: str
    nft_undo: str
    nft_report: tuple[str, ...]
    routing: tuple[RoutingStep, ...]
    rules_in_place: tuple[IPCommand, ...]
    sysctls: tuple[SysctlChange, ...]
    sysctls_in_place: tuple[tuple[str, str], ...]
    cleanup: tuple[IPCommand, ...]
    unreadable: str | None = None


def check_bridge(spec: RulesSpec, bridge: BridgeInfo | None) -> None:
    """Refuse a bridge that bridge mode cannot work with.

    Raises:
        RulesApplyError: the bridge has no ports, or no IPv4 address.
    """
    if spec.bridge is None:
        return
    if bridge is None:
        raise ValueError("bridge mode needs the bridge's MAC address and ports")
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


def rule_matches(entry: Mapping[str, Any], spec: RulesSpec) -> bool:
    """Whether `entry` (one of our ip rules, as `ip -j rule` prints it) is the one `spec` adds."""
    fwmark = str(entry.get("fwmark", ""))
    try:
        mark = int(fwmark.split("/", 1)[0], 16) if fwmark.startswith("0x") else None
    except ValueError:
        mark = None
    return (
        entry.get("priority") == spec.rule_priority
        and mark == spec.divert_mark
        and str(entry.get("table")) == str(spec.route_table)
    )


def as_delete(command: IPCommand) -> IPCommand:
    """The `ip ... del` that undoes an `ip ... add` or `ip ... replace`."""
    argv = list(command.argv)
    verb = 3  # ip -4 rule|route VERB ...
    argv[verb] = "del"
    return IPCommand(tuple(argv), command.family)


def render_policy_routing_removal(
    ip_rules: Mapping[int, Sequence[Mapping[str, Any]]],
    routes: Mapping[int, Sequence[Mapping[str, Any]]],
) -> list[IPCommand]:
    """The `ip ... del` commands that delete our ip rules and routes (as read), IPv4 first."""
    commands: list[IPCommand] = []
    for family in sorted({*ip_rules, *routes}):
        for rule in ip_rules.get(family, ()):
            argv = ("ip", f"-{family}", "rule", "del", "pref", str(rule["priority"]),
                    "protocol", str(RTPROT_TPROXY))  # fmt: skip
            commands.append(IPCommand(argv, family))
        for route in routes.get(family, ()):
            route_argv = (
                "ip", f"-{family}", "route", "del", str(route.get("type", "local")),
                str(route["dst"]), "dev", str(route.get("dev", "lo")),
                "table", str(route.get("table", "main")), "proto", str(RTPROT_TPROXY),
            )  # fmt: skip
            commands.append(IPCommand(route_argv, family))
    return commands


def describe(spec: RulesSpec) -> str:
    """The diversion in a few words: mode, ports, proxy port, what traffic, what is exempt."""
    ports = ",".join(str(r) for r in spec.ports)
    where = [f"bridged on {spec.bridge}" if spec.bridge else "routed"]
    if spec.local:
        where.append("this box's own")
    text = f"{spec.mode.value}: {ports} -> :{spec.proxy_port}, {' and '.join(where)} connections"
    return "; ".join([text, *describe_policy(spec.exclude, spec.block_quic, ports)])


def describe_policy(exclude: Sequence[Network], block_quic: bool, ports: str) -> list[str]:
    """The exclusions and the QUIC block in a few words each (nothing for what is not set)."""
    parts = []
    if exclude:
        parts.append(f"excluded: {', '.join(str(n) for n in exclude)}")
    if block_quic:
        parts.append(f"QUIC blocked: UDP to {ports} rejected (ICMP port unreachable)")
    return parts


def plan_apply(spec: RulesSpec, observed: Observed) -> Plan:
    """Every step `tproxy rules apply` takes for `spec` on a box in the state `observed`.

    Raises:
        RulesApplyError: bridge mode on a bridge it cannot work with.
    """
    check_bridge(spec, observed.bridge)
    restore = parse_listing(observed.table)[1]
    changes: list[SysctlChange] = []
    in_place: list[tuple[str, str]] = []
    for name, (wanted, why) in required_sysctls(spec.mode, spec.bridge).items():
        current = observed.sysctls.get(name)
        if current is None:
            in_place.append((name, "is not on this kernel (left alone)"))
        elif current == wanted:
            in_place.append((name, f"is already {wanted}"))
        else:
            restore.setdefault(name, current)  # an earlier apply's "was" wins
            changes.append(SysctlChange(name, wanted, current, why))

    had_bridge_table = observed.bridge_table is not None
    script = render_nft_apply(spec, restore, observed.bridge, drop_bridge_table=had_bridge_table)
    undo = render_nft_remove(bridge=had_bridge_table or spec.bridge is not None)
    undo += (observed.table or "") + (observed.bridge_table or "")
    report = [
        f"{'created' if observed.table is None else 'replaced'} nftables table inet "
        f"{TABLE_NAME} ({describe(spec)})"
    ]
    if observed.bridge is not None:
        bridge = observed.bridge
        report.append(
            f"{'created' if observed.bridge_table is None else 'replaced'} nftables table bridge "
            f"{TABLE_NAME}: TCP on those ports crossing {bridge.name} (ports "
            f"{', '.join(bridge.ports)}) goes up to this box's IP stack (frames re-addressed to "
            f"{bridge.mac})"
        )
    elif had_bridge_table:
        report.append(f"deleted nftables table bridge {TABLE_NAME} (no --bridge this time)")

    routing: list[RoutingStep] = []
    rules_in_place: list[IPCommand] = []
    for command in render_ip_rule_add(spec):
        if any(rule_matches(e, spec) for e in observed.ip_rules.get(command.family, ())):
            rules_in_place.append(command)
        else:
            routing.append(RoutingStep(command, as_delete(command)))
    for command in render_ip_route_replace(spec):
        had_route = any(
            str(r.get("table")) == str(spec.route_table)
            for r in observed.routes.get(command.family, ())
        )
        routing.append(RoutingStep(command, None if had_route else as_delete(command)))

    cleanup: list[IPCommand] = []
    if spec.mode is InterceptMode.REDIRECT:
        # Policy routing left from an earlier TPROXY apply is not needed any more; it goes
        # last, after everything that could fail, so a failure there leaves working rules.
        cleanup = render_policy_routing_removal(observed.ip_rules, observed.routes)
    return Plan(
        nft_script=script,
        nft_undo=undo,
        nft_report=tuple(report),
        routing=tuple(routing),
        rules_in_place=tuple(rules_in_place),
        sysctls=tuple(changes),
        sysctls_in_place=tuple(in_place),
        cleanup=tuple(cleanup),
        unreadable=observed.unreadable,
    )


def render_report(plan: Plan) -> list[str]:
    """What an apply that carried out `plan` did, one line per step, in the order done."""
    return [
        *plan.nft_report,
        *(" ".join(step.command.argv) for step in plan.routing),
        *(f"set {c.name}={c.value} (was {c.was}): {c.why}" for c in plan.sysctls),
        *(" ".join(command.argv) for command in plan.cleanup),
    ]


def render_dry_run(plan: Plan) -> list[str]:
    """`--dry-run`'s output: every step of `plan` as the command it is, in the order run.

    Commands are lines of their own (`sysctl -w`, the nft script after `NFT_HEADER`, `ip ...`);
    everything else is a `#` comment, so the output reads as a script.
    """
    lines: list[str] = []
    if plan.unreadable is not None:
        lines.append(
            f"# could not read our installed nftables tables ({plan.unreadable}): planned as "
            "if there were none, so the restore comment and the bridge table may differ"
        )
    lines.append(NFT_HEADER)
    lines.extend(plan.nft_script.rstrip().splitlines())
    if plan.routing or plan.rules_in_place:
        lines.append("# policy routing")
    lines.extend(f"# already in place: {' '.join(c.argv)}" for c in plan.rules_in_place)
    lines.extend(" ".join(step.command.argv) for step in plan.routing)
    if plan.sysctls or plan.sysctls_in_place:
        lines.append("# sysctls")
    lines.extend(f"sysctl -w {c.name}={c.value}  # was {c.was}: {c.why}" for c in plan.sysctls)
    lines.extend(f"# {name} {state}" for name, state in plan.sysctls_in_place)
    if plan.cleanup:
        lines.append("# our policy routing from an earlier tproxy-mode apply (not needed now)")
        lines.extend(" ".join(command.argv) for command in plan.cleanup)
    elif not plan.routing and not plan.rules_in_place:
        lines.append("# no policy routing in redirect mode")
    return lines


def parse_dry_run_nft(dry_run: Sequence[str]) -> str:
    """The nft script in `render_dry_run`'s output (what a test compares with what nft got)."""
    start = list(dry_run).index(NFT_HEADER) + 1
    end = next((i for i in range(start, len(dry_run)) if dry_run[i].startswith("# ")), len(dry_run))
    return "\n".join(dry_run[start:end]) + "\n"
