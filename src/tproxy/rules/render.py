"""Render the diversion (nftables script, policy-routing commands, sysctls) from a `RulesSpec`.

Theory of operation: the shape of the ruleset
---------------------------------------------
TPROXY needs three cooperating pieces, all per network namespace:

1. **nftables** (one table of our own, family inet so one ruleset serves IPv4 and IPv6), a filter
   chain on prerouting at mangle priority, in this order:

   a. ``meta mark <proxy mark> return`` -- the proxy's own upstream traffic (it carries SO_MARK)
      is never diverted. Forwarded traffic never carries it; it matters where our own packets
      come back in through lo (locally-originated interception).
   b. ``tcp flags & (syn|ack) != syn socket transparent 1 meta mark set <divert> accept`` --
      packets of connections that already have a transparent socket on this box (the accepted
      client leg, and the server's replies to a spoofed upstream socket) go straight to it. Pure
      SYNs are excluded: a new connection whose 4-tuple matches a TIME_WAIT socket of an earlier
      spoofed connection would otherwise be delivered to that TIME_WAIT socket, answered with an
      ACK, reset by the client and retried 1 s later (measured: ~20% of new connections +1 s).
   c. ``tcp dport @divert_ports tproxy to :<proxy port> meta mark set <divert> accept`` -- new
      connections to the diverted ports are assigned to the proxy's listening socket. The
      ``tproxy`` statement handles SYN-on-TIME_WAIT correctly.
   d. with ``--when-down reset`` only: ``tcp dport @divert_ports reject with tcp reset``. nft's
      ``tproxy`` does not stop the packet when no socket listens (iptables' TPROXY drops): without
      this rule a stopped proxy is silently routed around.

2. **Policy routing**: marked packets (``fwmark <divert>``) look up a table whose only route is
   ``local default dev lo``, so the kernel delivers them locally (to the transparent socket)
   instead of forwarding them. IPv4 and IPv6 each need their own rule and route.

3. **sysctls**: a spoofing router needs ``net.ipv4.ip_early_demux=0``, or TIME_WAIT sockets that
   carry a client's address capture forwarded packets with the same 4-tuple and drop them.

Everything is rendered here as data; `rules.apply` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tproxy.rules.model import RTPROT_TPROXY, TABLE_NAME, RulesSpec, WhenDown

# Sysctls the rules set, with the value they need and why; the old value is kept in the table's
# comment so `remove` can put it back.
REQUIRED_SYSCTLS = {
    "net.ipv4.ip_early_demux": (
        "0",
        "TIME_WAIT sockets of spoofed connections must not capture forwarded packets",
    ),
}
_RESTORE_PREFIX = "tproxy restore:"


@dataclass(frozen=True)
class IPCommand:
    """One `ip` invocation, with how to tell whether it is already in place."""

    argv: tuple[str, ...]
    family: int  # 4 or 6


def render_restore_comment(previous: dict[str, str]) -> str:
    """The table comment that remembers sysctl values to restore on remove."""
    items = " ".join(f"{key}={value}" for key, value in sorted(previous.items()))
    return f"{_RESTORE_PREFIX} {items}".rstrip()


def parse_restore_comment(comment: str) -> dict[str, str]:
    """The sysctl values to restore, from a table comment written by `render_restore_comment`."""
    if not comment.startswith(_RESTORE_PREFIX):
        return {}
    previous: dict[str, str] = {}
    for item in comment[len(_RESTORE_PREFIX) :].split():
        key, sep, value = item.partition("=")
        if sep and key in REQUIRED_SYSCTLS and value.isdigit():
            previous[key] = value
    return previous


def _mark(value: int) -> str:
    return f"{value:#010x}"


def render_table(spec: RulesSpec, restore: dict[str, str]) -> str:
    """The `table inet tproxy_rules { ... }` block."""
    ports = ", ".join(str(r) for r in spec.ports)
    divert = _mark(spec.divert_mark)
    lines = [
        f"table inet {TABLE_NAME} {{",
        f'\tcomment "{render_restore_comment(restore)}"',
        "\tset divert_ports {",
        "\t\ttype inet_service",
        "\t\tflags interval",
        f"\t\telements = {{ {ports} }}",
        "\t}",
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority mangle; policy accept;",
        f"\t\tmeta mark {_mark(spec.proxy_mark)} return",
        "\t\tmeta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 "
        f"meta mark set {divert} accept",
        f"\t\tmeta l4proto tcp tcp dport @divert_ports tproxy to :{spec.proxy_port} "
        f"meta mark set {divert} accept",
    ]
    if spec.when_down is WhenDown.RESET:
        lines.append("\t\tmeta l4proto tcp tcp dport @divert_ports reject with tcp reset")
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"


def render_nft_apply(spec: RulesSpec, restore: dict[str, str]) -> str:
    """One nft transaction that creates or replaces our table, and touches nothing else.

    Declaring the table first makes the delete succeed when it does not exist yet; the whole
    file is one transaction, so the table is never seen half-built or missing.
    """
    return f"table inet {TABLE_NAME}\ndelete table inet {TABLE_NAME}\n" + render_table(
        spec, restore
    )


def render_nft_remove() -> str:
    return f"table inet {TABLE_NAME}\ndelete table inet {TABLE_NAME}\n"


def _families(spec: RulesSpec) -> tuple[int, ...]:
    return (4, 6) if spec.ipv6 else (4,)


def _rule_args(spec: RulesSpec) -> tuple[str, ...]:
    return (
        "fwmark", f"{spec.divert_mark:#x}",
        "lookup", str(spec.route_table),
        "pref", str(spec.rule_priority),
        "protocol", str(RTPROT_TPROXY),
    )  # fmt: skip


def _route_args(spec: RulesSpec, family: int) -> tuple[str, ...]:
    default = "0.0.0.0/0" if family == 4 else "::/0"
    return ("local", default, "dev", "lo", "table", str(spec.route_table),
            "proto", str(RTPROT_TPROXY))  # fmt: skip


def render_ip_rule_add(spec: RulesSpec) -> list[IPCommand]:
    return [
        IPCommand(("ip", f"-{f}", "rule", "add", *_rule_args(spec)), f) for f in _families(spec)
    ]


def render_ip_route_replace(spec: RulesSpec) -> list[IPCommand]:
    return [
        IPCommand(("ip", f"-{f}", "route", "replace", *_route_args(spec, f)), f)
        for f in _families(spec)
    ]
