"""The test session's guard: the network namespace it runs in must end as it started.

Tests that change nftables, routing or sysctls must do it in namespaces they create; a test
that forgot would change the test machine itself (other people's rules, the machine's routes).
`tests/conftest.py` snapshots the session's own namespace at the start and compares at the end:
the nftables ruleset, the IPv4 and IPv6 rules and routes of every table, and the sysctls the
rules manager touches or checks. Other runs on the machine build namespaces of their own
concurrently, which never show up here, so any difference is a real failure.

`snapshot` does the I/O (run as root: `nft list ruleset` needs CAP_NET_ADMIN); `compare` is
pure.
"""

from __future__ import annotations

import difflib
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path

COMMANDS = {
    # -s (stateless): no counter or quota values, which move with traffic.
    "nft list ruleset": ["nft", "-s", "list", "ruleset"],
    "ip -4 rule": ["ip", "-4", "rule", "show"],
    "ip -6 rule": ["ip", "-6", "rule", "show"],
    "ip -4 route (all tables)": ["ip", "-4", "route", "show", "table", "all"],
    "ip -6 route (all tables)": ["ip", "-6", "route", "show", "table", "all"],
}
SYSCTLS = (
    "net.ipv4.ip_forward",
    "net.ipv4.ip_early_demux",
    "net.ipv6.conf.all.forwarding",
    "net.ipv4.conf.all.src_valid_mark",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
)
# What changes on its own: lifetimes of routes learnt from router advertisements and of set
# elements with a timeout ("expires 1790sec", "expires 59s"), nft's handles and generation ids.
_VOLATILE = re.compile(r"\s(?:expires|# handle|# generation)\s\S+")


def _run(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(could not run: {exc})"
    if result.returncode != 0:
        return f"(failed: {result.stderr.strip()})"
    return result.stdout


def _sysctl(name: str) -> str:
    try:
        return (Path("/proc/sys") / name.replace(".", "/")).read_text().strip()
    except OSError:
        return "(absent)"


def snapshot() -> dict[str, str]:
    """The state of this process's network namespace that no test may change, as text."""
    state = {key: _run(argv) for key, argv in COMMANDS.items()}
    state["sysctls"] = "".join(f"{name} = {_sysctl(name)}\n" for name in SYSCTLS)
    return state


def normalize(text: str) -> list[str]:
    """`text`'s lines without what changes on its own, trailing blanks dropped."""
    return [_VOLATILE.sub("", line).rstrip() for line in text.splitlines()]


def compare(before: Mapping[str, str], after: Mapping[str, str]) -> list[str]:
    """A unified diff of every part of two snapshots that differs; empty when they are equal."""
    lines: list[str] = []
    for key in sorted({*before, *after}):
        old = normalize(before.get(key, "(not taken)"))
        new = normalize(after.get(key, "(not taken)"))
        if old != new:
            lines += difflib.unified_diff(
                old, new, f"{key} at the start", f"{key} at the end", lineterm=""
            )
    return lines
