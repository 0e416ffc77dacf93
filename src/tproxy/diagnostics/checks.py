"""The doctor's judgement: facts about this namespace in, one finding per check out (no I/O).

Each finding names what was found and, when it is wrong, the command that fixes it. Status:
`ok`; `fail` (this breaks interception: `tproxy doctor` exits 1); `warn` (breaks some setups,
worth a look); `skip` (does not apply to this setup, or could not be checked and another
finding says why).

Which checks apply depends on the setup: the mode (TPROXY or REDIRECT), bridge or router, and
the proxy port, divert mark and routing table. `Expected` holds them; the command line fills it
from its options, then from what our table was applied with, then from the defaults.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tproxy.core.config import DEFAULT_PROXY_PORT, InterceptMode
from tproxy.rules.model import TABLE_NAME
from tproxy.rules.render import parse_listing


class Status(enum.Enum):
    OK = "ok"
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"


@dataclass(frozen=True)
class Finding:
    check: str
    status: Status
    detail: str
    fix: str = ""

    def as_json(self) -> dict[str, str]:
        return {"check": self.check, "status": self.status.value, "detail": self.detail,
                "fix": self.fix}  # fmt: skip


@dataclass(frozen=True)
class Expected:
    """The setup to check for."""

    mode: InterceptMode
    proxy_port: int
    divert_mark: int
    route_table: int
    bridge: str | None = None
    # The proxy's --max-connections (None: not known, the pipe budget is not checked).
    max_connections: int | None = None

    @property
    def router(self) -> bool:
        return self.bridge is None


@dataclass(frozen=True)
class BridgeFacts:
    is_bridge: bool
    mac: str
    ipv4: tuple[str, ...]
    ports: tuple[str, ...] = ()


@dataclass(frozen=True)
class PipeBudget:
    """fs.pipe-user-pages-soft and -hard (None: unreadable; 0: no limit) and the page size."""

    soft_pages: int | None
    hard_pages: int | None
    page_bytes: int


@dataclass(frozen=True)
class Facts:
    """What `diagnostics.facts.gather` found in this namespace."""

    net_admin: bool
    nft: bool
    # nft expression -> None when the kernel took it, else nft's error (absent: not tried).
    expressions: Mapping[str, str | None]
    # None when IP_TRANSPARENT could be set on a socket, else why not.
    ip_transparent_error: str | None
    sysctls: Mapping[str, str | None]
    # Per interface: (rp_filter, src_valid_mark), None where unreadable.
    interfaces: Mapping[str, tuple[str | None, str | None]]
    ipv6: bool
    ip_rules: Mapping[int, Sequence[Mapping[str, Any]]]  # family -> `ip -j rule` entries
    routes: Mapping[int, Sequence[Mapping[str, Any]]]  # family -> routes of the route table
    table: str | None  # `nft list table inet tproxy_rules`, None if absent
    bridge_table: str | None
    bridge: BridgeFacts | None  # None: no such interface (or no bridge expected)
    listening: frozenset[int]  # TCP ports something listens on
    diverted_ports: str = ""  # the divert_ports set's elements, as nft prints them
    notes: tuple[str, ...] = field(default_factory=tuple)
    pipe_budget: PipeBudget | None = None


def _sysctl(facts: Facts, name: str) -> str | None:
    return facts.sysctls.get(name)


def _root_first(facts: Facts, check: str) -> Finding | None:
    """A skip finding when `check` needs what the privileges or the nft check already failed."""
    if not facts.net_admin:
        return Finding(check, Status.SKIP, "not checked: needs root (see privileges)")
    if not facts.nft:
        return Finding(check, Status.SKIP, "not checked: needs nft (see nft)")
    return None


def check_privileges(facts: Facts) -> Finding:
    if facts.net_admin:
        return Finding("privileges", Status.OK, "CAP_NET_ADMIN: yes")
    return Finding(
        "privileges",
        Status.FAIL,
        "no CAP_NET_ADMIN: rules, transparent sockets and marks all need it",
        "run as root: sudo tproxy doctor (and run the proxy as root or with CAP_NET_ADMIN)",
    )


def check_nft(facts: Facts) -> Finding:
    if facts.nft:
        return Finding("nft", Status.OK, "nft is installed")
    return Finding("nft", Status.FAIL, "nft was not found on PATH", "apt-get install nftables")


_EXPRESSIONS = {
    # name -> (what it is for, kernel option / module)
    "tproxy": ("hands diverted connections to the proxy", "CONFIG_NFT_TPROXY, module nft_tproxy"),
    "socket": ("finds the proxy's sockets for the packets of live sessions",
               "CONFIG_NFT_SOCKET, module nft_socket"),
    "redirect": ("rewrites diverted connections to the proxy port (redirect mode)",
                 "CONFIG_NFT_REDIR, module nft_redir"),
}  # fmt: skip


def check_expressions(facts: Facts, expected: Expected) -> list[Finding]:
    names = ("redirect",) if expected.mode is InterceptMode.REDIRECT else ("tproxy", "socket")
    findings = []
    for name in names:
        check = f"nft-{name}"
        skipped = _root_first(facts, check)
        if skipped is not None:
            findings.append(skipped)
            continue
        purpose, option = _EXPRESSIONS[name]
        error = facts.expressions.get(name, "not tried")
        if error is None:
            findings.append(Finding(check, Status.OK, f"the kernel takes nft's {name} ({purpose})"))
        else:
            findings.append(Finding(
                check, Status.FAIL, f"the kernel refused nft's {name} expression: {error}",
                f"load it (modprobe {option.rsplit(' ', 1)[-1]}) or use a kernel with {option}"
                + ("; or use --mode redirect" if name == "tproxy" else ""),
            ))  # fmt: skip
    return findings


def check_ip_transparent(facts: Facts, expected: Expected) -> Finding:
    if expected.mode is InterceptMode.REDIRECT:
        return Finding("ip-transparent", Status.SKIP, "not needed in redirect mode")
    if facts.ip_transparent_error is None:
        return Finding("ip-transparent", Status.OK, "IP_TRANSPARENT can be set on sockets")
    return Finding(
        "ip-transparent",
        Status.FAIL,
        f"IP_TRANSPARENT cannot be set: {facts.ip_transparent_error}",
        "run the proxy as root or give it CAP_NET_ADMIN (e.g. systemd AmbientCapabilities)",
    )


def check_forwarding(facts: Facts, expected: Expected) -> list[Finding]:
    if not expected.router:
        return [Finding("ip-forward", Status.SKIP, "bridge mode: frames are bridged, not routed")]
    findings = [
        _forwarding(facts, "ip-forward", "net.ipv4.ip_forward", off=Status.FAIL,
                    meaning="this box does not route IPv4, so nothing crosses it",
                    fix_note=" (and persist it in /etc/sysctl.d/)"),
    ]  # fmt: skip
    if facts.ipv6:
        findings.append(
            _forwarding(facts, "ip6-forward", "net.ipv6.conf.all.forwarding", off=Status.WARN,
                        meaning="IPv6 is not routed (fine if only IPv4 crosses this box)",
                        fix_note="")
        )  # fmt: skip
    return findings


def _forwarding(
    facts: Facts, check: str, name: str, *, off: Status, meaning: str, fix_note: str
) -> Finding:
    value = _sysctl(facts, name)
    if value == "1":
        return Finding(check, Status.OK, f"{name} = 1")
    return Finding(check, off, f"{name} = {value}: {meaning}", f"sysctl -w {name}=1{fix_note}")


def _fwmark(entry: Mapping[str, Any]) -> int | None:
    text = str(entry.get("fwmark", ""))
    try:
        return int(text.split("/", 1)[0], 16) if text else None
    except ValueError:
        return None


def check_policy_routing(facts: Facts, expected: Expected) -> list[Finding]:
    if expected.mode is InterceptMode.REDIRECT:
        return [Finding("policy-routing", Status.SKIP, "not needed in redirect mode")]
    findings = []
    for family in (4, 6) if facts.ipv6 else (4,):
        suffix = "" if family == 4 else "6"
        rules = [e for e in facts.ip_rules.get(family, ()) if _fwmark(e) == expected.divert_mark]
        table = str(expected.route_table)
        if any(str(e.get("table")) == table for e in rules):
            findings.append(Finding(f"ip{suffix}-rule", Status.OK,
                                    f"IPv{family}: fwmark {expected.divert_mark:#x} -> table "
                                    f"{table}"))  # fmt: skip
        else:
            wrong = f" (it looks up table {rules[0].get('table')})" if rules else ""
            findings.append(Finding(
                f"ip{suffix}-rule", Status.FAIL,
                f"IPv{family}: no ip rule sends fwmark {expected.divert_mark:#x} to table "
                f"{table}{wrong}: diverted packets are routed on instead of delivered to the proxy",
                f"ip -{family} rule add fwmark {expected.divert_mark:#x} lookup {table} "
                "(or: tproxy rules apply ...)",
            ))  # fmt: skip
        default = "0.0.0.0/0" if family == 4 else "::/0"
        local = [
            r for r in facts.routes.get(family, ())
            if r.get("type") == "local" and r.get("dst") in ("default", default)
        ]  # fmt: skip
        if local:
            findings.append(Finding(f"ip{suffix}-local-route", Status.OK,
                                    f"IPv{family}: local default dev {local[0].get('dev')} in "
                                    f"table {table}"))  # fmt: skip
        else:
            findings.append(Finding(
                f"ip{suffix}-local-route", Status.FAIL,
                f"IPv{family}: table {table} has no 'local default' route: diverted packets "
                "are not delivered to this box",
                f"ip -{family} route add local {default} dev lo table {table}",
            ))  # fmt: skip
    return findings


def check_reverse_path(facts: Facts, expected: Expected) -> list[Finding]:
    """src_valid_mark breaks TPROXY (the marked reverse lookup ends in the local table);
    strict rp_filter breaks it where routing is asymmetric."""
    findings = []
    all_rp = facts.interfaces.get("all", (None, None))[0]
    valid_on = sorted(
        name for name, (_, valid) in facts.interfaces.items()
        if valid == "1" and name != "default"
    )  # fmt: skip
    if expected.mode is InterceptMode.REDIRECT:
        findings.append(Finding("src-valid-mark", Status.SKIP, "does not matter in redirect mode"))
    elif valid_on:
        names = ", ".join(valid_on)
        findings.append(Finding(
            "src-valid-mark", Status.FAIL,
            f"src_valid_mark = 1 on {names}: the reverse-path check of a diverted packet then "
            "uses its mark, finds the local route and drops it, silently",
            " ; ".join(f"sysctl -w net.ipv4.conf.{n}.src_valid_mark=0" for n in valid_on)
            + " (some VPN tools set it: check what else needs it)",
        ))  # fmt: skip
    else:
        findings.append(Finding("src-valid-mark", Status.OK, "src_valid_mark = 0 everywhere"))
    strict = sorted(
        name for name, (rp, _) in facts.interfaces.items()
        if name not in ("all", "default", "lo") and max(rp or "0", all_rp or "0") == "1"
    )  # fmt: skip
    if strict:
        names = ", ".join(strict)
        findings.append(Finding(
            "rp-filter", Status.WARN,
            f"strict reverse-path filtering (rp_filter = 1) on {names}: it drops diverted "
            "packets wherever a client's or server's route back is not the interface they came in "
            "on (asymmetric routing)",
            "sysctl -w net.ipv4.conf.all.rp_filter=2 and net.ipv4.conf.IFACE.rp_filter=2 (loose)",
        ))  # fmt: skip
    else:
        findings.append(Finding("rp-filter", Status.OK, "no strict reverse-path filtering"))
    return findings


def check_early_demux(facts: Facts, expected: Expected) -> Finding:
    if expected.mode is InterceptMode.REDIRECT:
        return Finding("early-demux", Status.SKIP, "does not matter in redirect mode")
    value = _sysctl(facts, "net.ipv4.ip_early_demux")
    if value in ("0", None):
        return Finding("early-demux", Status.OK, f"net.ipv4.ip_early_demux = {value}")
    return Finding(
        "early-demux", Status.FAIL,
        "net.ipv4.ip_early_demux = 1: TIME_WAIT sockets of spoofed connections capture and "
        "drop forwarded packets of new connections with the same addresses",
        "sysctl -w net.ipv4.ip_early_demux=0 (tproxy rules apply sets it)",
    )  # fmt: skip


def check_bridge(facts: Facts, expected: Expected) -> list[Finding]:
    if expected.bridge is None:
        return []
    name = expected.bridge
    bridge = facts.bridge
    if bridge is None or not bridge.is_bridge:
        what = "no such interface" if bridge is None else "not a Linux bridge"
        return [
            Finding(
                "bridge",
                Status.FAIL,
                f"{name}: {what}",
                f"ip link add {name} type bridge; ip link set IFACE master {name}",
            )
        ]
    findings = [Finding("bridge", Status.OK, f"{name} is a bridge, MAC {bridge.mac}")]
    if bridge.ipv4:
        findings.append(Finding("bridge-address", Status.OK,
                                f"{name} has {', '.join(bridge.ipv4)}"))  # fmt: skip
    else:
        findings.append(Finding(
            "bridge-address", Status.FAIL,
            f"{name} has no IPv4 address: the proxy's ARP and its own packets need one",
            f"ip addr add ADDRESS/PREFIX dev {name} (a management address in the bridged subnet)",
        ))  # fmt: skip
    for key in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"):
        value = _sysctl(facts, key)
        short = key.rsplit(".", 1)[1]
        if value in ("0", None):
            findings.append(Finding(short, Status.OK, f"{key} = {value}"))
        else:
            findings.append(Finding(
                short, Status.FAIL,
                f"{key} = {value}: bridged packets pass the IP hooks as well (the diverted SYN "
                "is answered with a reset)",
                f"sysctl -w {key}=0 (tproxy rules apply --bridge sets it)",
            ))  # fmt: skip
    if facts.bridge_table is not None:
        if bridge.mac.lower() in facts.bridge_table.lower():
            findings.append(Finding("bridge-mac", Status.OK,
                                    f"the bridge rules address {bridge.mac}"))  # fmt: skip
        else:
            findings.append(Finding(
                "bridge-mac", Status.FAIL,
                f"the bridge rules re-address frames to another MAC than {name}'s current "
                f"{bridge.mac} (a bridge takes a port's MAC unless one is set): diverted frames "
                "are bridged on instead",
                f"apply the rules again (tproxy rules apply --bridge {name} ...), and pin the "
                f"MAC: ip link set {name} address {bridge.mac}",
            ))  # fmt: skip
        missing = [p for p in bridge.ports if f'"{p}"' not in facts.bridge_table]
        if missing:
            findings.append(Finding(
                "bridge-ports", Status.FAIL,
                f"{', '.join(missing)} joined {name} after the rules were applied: TCP coming in "
                "there is bridged past the proxy",
                f"apply the rules again: tproxy rules apply --bridge {name} ...",
            ))  # fmt: skip
        else:
            findings.append(Finding("bridge-ports", Status.OK,
                                    f"the rules cover {', '.join(bridge.ports)}"))  # fmt: skip
    return findings


def check_rules(facts: Facts, expected: Expected) -> Finding:
    skipped = _root_first(facts, "rules")
    if skipped is not None:
        return skipped
    if facts.table is None:
        return Finding(
            "rules", Status.FAIL, f"no nftables table inet {TABLE_NAME}: nothing is diverted",
            "tproxy rules apply --ports PORTS"
            + (f" --bridge {expected.bridge}" if expected.bridge else "")
            + (" --mode redirect" if expected.mode is InterceptMode.REDIRECT else ""),
        )  # fmt: skip
    redirect = "redirect to :" in facts.table
    mode = InterceptMode.REDIRECT if redirect else InterceptMode.TPROXY
    local = "chain output" in facts.table
    scope = "also this box's own connections" if local else "forwarded connections only"
    detail = (
        f"table inet {TABLE_NAME} diverts ports {facts.diverted_ports or '?'} to "
        f":{expected.proxy_port} ({mode.value}, {scope})"
    )
    if mode is not expected.mode:
        return Finding("rules", Status.FAIL,
                       f"{detail}, but the proxy is checked for {expected.mode.value} mode",
                       f"tproxy rules apply --mode {expected.mode.value} ...")  # fmt: skip
    if not re.search(rf"to :{expected.proxy_port}\b", facts.table):
        return Finding("rules", Status.FAIL,
                       f"table inet {TABLE_NAME} diverts to another port than "
                       f"{expected.proxy_port}",
                       f"tproxy rules apply --proxy-port {expected.proxy_port} ...")  # fmt: skip
    if expected.bridge is not None and facts.bridge_table is None:
        return Finding("rules", Status.FAIL,
                       f"{detail}, but there is no bridge table: bridged TCP is not diverted",
                       f"tproxy rules apply --bridge {expected.bridge} ...")  # fmt: skip
    if "socket transparent 1" in facts.table and "socket wildcard 0" not in facts.table:
        # Rules applied by an older tproxy (KERNEL-NOTES item 19).
        return Finding("rules", Status.WARN,
                       f"{detail}, but its socket rule also matches the proxy's listener: "
                       f"connections routed through this box to port {expected.proxy_port} of "
                       "another host are reset",
                       "apply the rules again (tproxy rules apply ...)")  # fmt: skip
    return Finding("rules", Status.OK, detail)


def check_policy(facts: Facts) -> list[Finding]:
    """What the installed rules exempt (`--exclude`) and block (`--block-quic`): facts, not
    faults; without the QUIC block the detail says what HTTP/3 does to SNI-based rules."""
    skipped = _root_first(facts, "exclude")
    if skipped is not None or facts.table is None:
        why = skipped.detail if skipped else "not checked: no rules (see rules)"
        return [Finding(name, Status.SKIP, why) for name in ("exclude", "quic")]
    settings = parse_listing(facts.table)[0]
    ports = facts.diverted_ports or "?"
    if settings.exclude:
        excluded = Finding("exclude", Status.OK, "excluded: "
                           + ", ".join(str(n) for n in settings.exclude))  # fmt: skip
    else:
        excluded = Finding("exclude", Status.OK, "excluded: none (every network is diverted)")
    if settings.block_quic:
        blocked = f"QUIC: blocked on {ports} (UDP rejected with ICMP port unreachable)"
        quic = Finding("quic", Status.OK, blocked)
    else:
        quic = Finding(
            "quic", Status.OK,
            f"QUIC: not blocked: UDP to {ports} passes, so HTTP/3 (QUIC) goes around the proxy "
            "and any SNI-based policy; to make browsers use TCP: tproxy rules apply "
            "--block-quic ...",
        )  # fmt: skip
    return [excluded, quic]


def check_listener(facts: Facts, expected: Expected) -> Finding:
    port = expected.proxy_port
    if port in facts.listening:
        return Finding("listener", Status.OK, f"something listens on TCP port {port}")
    redirect = expected.mode is InterceptMode.REDIRECT
    command = "tproxy run --mode redirect" if redirect else "tproxy run --spoof-source"
    if port != DEFAULT_PROXY_PORT:
        command += f" --listen 0.0.0.0:{port} --listen [::]:{port}"
    fate = "reset" if redirect or "reject" in (facts.table or "") else "routed around the proxy"
    return Finding(
        "listener", Status.FAIL,
        f"nothing listens on TCP port {port}: diverted connections are {fate}",
        f"start the proxy: {command}",
    )  # fmt: skip


# The kernel's default pipe: 16 pages (include/linux/pipe_fs_i.h: PIPE_DEF_BUFFERS).
PIPE_DEF_BUFFERS = 16


def pipe_pages_needed(max_connections: int) -> int:
    """The pipe budget at which every session may splice both ways at once through pipes of
    the kernel's default size (a direction holds a pipe only while its bytes are in flight)."""
    return 2 * max_connections * PIPE_DEF_BUFFERS


def check_pipe_budget(facts: Facts, expected: Expected) -> Finding:
    """Run as a user (not root), every splice pipe of the proxy counts against one per-user
    budget; past it new pipes get 2 pages (still spliced, more slowly), past the hard limit
    none (copied instead). Root, or CAP_SYS_RESOURCE, is not limited."""
    check = "pipe-budget"
    budget = facts.pipe_budget
    if budget is None or budget.soft_pages is None:
        return Finding(check, Status.SKIP, "fs.pipe-user-pages-soft could not be read")
    soft, hard = budget.soft_pages, budget.hard_pages or 0
    mib = soft * budget.page_bytes >> 20
    if soft == 0 and hard == 0:
        return Finding(check, Status.OK, "fs.pipe-user-pages-soft = 0: no per-user pipe limit")
    if expected.max_connections is None:  # say what it covers; --max-connections to judge it
        covers = min(x for x in (soft, hard) if x > 0) // pipe_pages_needed(1)
        detail = (
            f"fs.pipe-user-pages-soft = {soft} pages ({mib} MiB): run as a user (not root), up "
            f"to {covers} sessions splice both ways at once with default-size pipes (doctor "
            "--max-connections N checks N)"
        )
        return Finding(check, Status.OK, detail)
    count = expected.max_connections
    need = pipe_pages_needed(count)
    short_soft = 0 < soft < need
    short_hard = 0 < hard < need
    if not short_soft and not short_hard:
        return Finding(check, Status.OK, f"fs.pipe-user-pages-soft = {soft} pages ({mib} MiB): "
                       f"enough for {count} sessions splicing both ways at once")  # fmt: skip
    detail = (
        f"fs.pipe-user-pages-soft = {soft} pages ({mib} MiB), fs.pipe-user-pages-hard = {hard}: "
        f"a proxy run as a user (--user, systemd's User=; root is exempt) with {count} max "
        f"connections needs {need} pages for all of them to splice both ways at once"
    )
    if short_soft:
        detail += "; past the soft limit each new pipe gets 8 KiB (spliced, more slowly)"
    if short_hard:
        detail += "; past the hard limit no pipe at all (those bytes are copied)"
    fix = f"sysctl -w fs.pipe-user-pages-soft={need}"
    if short_hard:
        fix += f" fs.pipe-user-pages-hard={need}"
    return Finding(check, Status.WARN, detail, fix + " (and persist it in /etc/sysctl.d/)")


def evaluate(facts: Facts, expected: Expected) -> list[Finding]:
    """Every check, in the order an operator would fix them."""
    return [
        check_privileges(facts),
        check_nft(facts),
        *check_expressions(facts, expected),
        check_ip_transparent(facts, expected),
        *check_forwarding(facts, expected),
        *check_policy_routing(facts, expected),
        *check_reverse_path(facts, expected),
        check_early_demux(facts, expected),
        *check_bridge(facts, expected),
        check_rules(facts, expected),
        *check_policy(facts),
        check_listener(facts, expected),
        check_pipe_budget(facts, expected),
    ]


def passed(findings: Sequence[Finding]) -> bool:
    return all(f.status is not Status.FAIL for f in findings)


def render_text(findings: Sequence[Finding]) -> list[str]:
    """One line per check (and an indented fix line under each that is not ok)."""
    width = max(len(f.check) for f in findings)
    lines = []
    for f in findings:
        lines.append(f"{f.status.value.upper():4}  {f.check:<{width}}  {f.detail}")
        if f.fix and f.status in (Status.FAIL, Status.WARN):
            lines.append(f"{'':4}  {'':<{width}}  fix: {f.fix}")
    failed = sum(f.status is Status.FAIL for f in findings)
    lines.append(
        "all checks passed" if not failed else f"{failed} check{'s' if failed > 1 else ''} failed"
    )
    return lines
