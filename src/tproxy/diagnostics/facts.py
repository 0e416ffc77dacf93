"""The doctor's eyes: read what the checks need from this network namespace (nft, ip, /proc).

Nothing here changes the system, with one exception: whether the kernel takes nft's tproxy,
socket and redirect expressions is learnt by trying them, in a scratch table that the same nft
transaction deletes again, so the rule is never live: a chain no hook calls for tproxy and
socket; for redirect, which insists on a nat chain, an output chain that is gone before the
transaction's rules would take effect.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

from tproxy.diagnostics.checks import BridgeFacts, Expected, Facts, PipeBudget
from tproxy.interception.sockopts import IP_TRANSPARENT
from tproxy.rules.apply import (
    Runner,
    has_net_admin,
    ip_json,
    ipv6_available,
    read_bridge,
    read_sysctl,
    read_table,
    run_command,
)
from tproxy.rules.plan import RulesApplyError

PROC_NET = Path("/proc/net")
_TCP_LISTEN = "0A"
_SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv6.conf.all.forwarding",
    "net.ipv4.ip_early_demux",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
)
_PROBES = {
    "tproxy": "meta l4proto tcp tproxy to :9",
    # The shortcut rule's own socket match, wildcard key included (nft_socket learnt it late).
    "socket": "socket transparent 1 socket wildcard 0 accept",
    "redirect": "meta l4proto tcp redirect to :9",
}


def listening_ports(proc_net_tcp: str) -> set[int]:
    """The local ports of listening sockets in a /proc/net/tcp or tcp6 text."""
    ports = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[3] == _TCP_LISTEN:
            ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def probe_expression(runner: Runner, name: str) -> str | None:
    """None when the kernel takes nft expression `name`, else nft's complaint."""
    table = f"tproxy_doctor_{os.getpid()}"
    # redirect insists on a nat chain; the transaction deletes it again, so its rule is never
    # committed and no packet is ever redirected. The others go in a chain no hook calls.
    chain = "type nat hook output priority 100; policy accept;" if name == "redirect" else ""
    script = (
        f"table inet {table} {{\n"
        f"\tchain probe {{ {chain} }}\n"
        "}\n"
        f"add rule inet {table} probe {_PROBES[name]}\n"
        f"delete table inet {table}\n"
    )
    result = runner(["nft", "-f", "-"], script)
    if result.returncode == 0:
        return None
    errors = [line.removeprefix("Error: ") for line in result.stderr.splitlines()
              if line.startswith("Error:")]  # fmt: skip
    return errors[0] if errors else result.stderr.strip() or f"nft exited {result.returncode}"


def ip_transparent_error() -> str | None:
    """None when IP_TRANSPARENT can be set on a socket here, else the error."""
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    except OSError as exc:
        return f"{exc.strerror} (needs CAP_NET_ADMIN)"
    return None


def _interfaces() -> dict[str, tuple[str | None, str | None]]:
    conf = Path("/proc/sys/net/ipv4/conf")
    names: Iterable[str] = sorted(p.name for p in conf.iterdir()) if conf.is_dir() else ()
    return {
        name: (
            read_sysctl(f"net.ipv4.conf.{name}.rp_filter"),
            read_sysctl(f"net.ipv4.conf.{name}.src_valid_mark"),
        )
        for name in names
    }


def _diverted_ports(listing: str | None) -> str:
    match = re.search(r"set divert_ports \{.*?elements = \{ ([^}]*?) \}", listing or "", re.S)
    return " ".join(match.group(1).split()) if match else ""


def _pages(name: str) -> int | None:
    value = read_sysctl(name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def pipe_budget() -> PipeBudget:
    return PipeBudget(_pages("fs.pipe-user-pages-soft"), _pages("fs.pipe-user-pages-hard"),
                      os.sysconf("SC_PAGE_SIZE"))  # fmt: skip


def gather(expected: Expected, table: str | None, runner: Runner = run_command) -> Facts:
    """Everything `checks.evaluate` looks at, read from the current network namespace.

    `table`: our inet table's listing, as the caller read it to decide `expected`.
    """
    admin = has_net_admin()
    nft = shutil.which("nft") is not None
    can_nft = admin and nft
    expressions = {name: probe_expression(runner, name) for name in _PROBES} if can_nft else {}
    ipv6 = ipv6_available()
    families = (4, 6) if ipv6 else (4,)
    have_ip = shutil.which("ip") is not None
    ip_rules = {f: ip_json(runner, [f"-{f}", "rule", "show"]) for f in families} if have_ip else {}
    routes = (
        {f: ip_json(runner, [f"-{f}", "route", "show", "table", str(expected.route_table)])
         for f in families}
        if have_ip else {}
    )  # fmt: skip
    bridge_table = read_table(runner, "bridge") if can_nft else None
    bridge = None
    if expected.bridge is not None and have_ip:
        try:
            info = read_bridge(runner, expected.bridge)
            bridge = BridgeFacts(True, info.mac, info.ipv4, info.ports)
        except RulesApplyError as exc:
            if "not a Linux bridge" in str(exc):
                bridge = BridgeFacts(False, "", ())
    listening = listening_ports(_read(PROC_NET / "tcp")) | listening_ports(_read(PROC_NET / "tcp6"))
    return Facts(
        net_admin=admin,
        nft=nft,
        expressions=expressions,
        ip_transparent_error=ip_transparent_error(),
        sysctls={name: read_sysctl(name) for name in _SYSCTLS},
        interfaces=_interfaces(),
        ipv6=ipv6,
        ip_rules=ip_rules,
        routes=routes,
        table=table,
        bridge_table=bridge_table,
        bridge=bridge,
        listening=frozenset(listening),
        diverted_ports=_diverted_ports(table),
        pipe_budget=pipe_budget(),
    )
