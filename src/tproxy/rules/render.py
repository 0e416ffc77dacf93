"""Render the diversion (nftables script, policy-routing commands, sysctls) from a `RulesSpec`.

Theory of operation: the shape of the ruleset
---------------------------------------------
TPROXY needs three cooperating pieces, all per network namespace:

1. **nftables** (one table of our own, family inet so one ruleset serves IPv4 and IPv6), a filter
   chain on prerouting at mangle priority, in this order:

   a. ``meta mark <proxy mark> return`` -- the proxy's own upstream traffic (it carries SO_MARK)
      is never diverted. Forwarded traffic never carries it; it matters where our own packets
      come back in through lo (locally-originated interception).
   b. ``tcp flags & (syn|ack) != syn socket transparent 1 socket wildcard 0 meta mark set
      <divert> accept`` -- packets of connections that already have a transparent socket on
      this box (the accepted client leg, and the server's replies to a spoofed upstream socket)
      go straight to it. Pure SYNs are excluded: a new connection whose 4-tuple matches a
      TIME_WAIT socket of an earlier spoofed connection would otherwise be delivered to that
      TIME_WAIT socket, answered with an ACK, reset by the client and retried 1 s later
      (measured: ~20% of new connections +1 s). ``socket wildcard 0``: nft's socket lookup also
      finds listeners, and the proxy's own listener is transparent and bound to the wildcard
      address; without it a connection that is only routed through this box to *another*
      host's port equal to the proxy port (1800) is handed to that listener after its SYN and
      reset (iptables' ``-m socket`` skips wildcard sockets by default; KERNEL-NOTES item 19).
      Sockets of live sessions are bound to real addresses, so they still match.
   c. ``fib daddr type local return`` -- connections to this box's own addresses (its own
      services on a diverted port, from outside or from itself) are not intercepted.
   d. ``tcp dport @divert_ports tproxy to :<proxy port> meta mark set <divert> accept`` -- new
      connections to the diverted ports are assigned to the proxy's listening socket. The
      ``tproxy`` statement handles SYN-on-TIME_WAIT correctly.
   e. with ``--when-down reset`` only: ``tcp dport @divert_ports reject with tcp reset``. nft's
      ``tproxy`` does not stop the packet when no socket listens (iptables' TPROXY drops): without
      this rule a stopped proxy is silently routed around.

2. **Policy routing**: marked packets (``fwmark <divert>``) look up a table whose only route is
   ``local default dev lo``, so the kernel delivers them locally (to the transparent socket)
   instead of forwarding them. IPv4 and IPv6 each need their own rule and route.

3. **sysctls**: a spoofing router needs ``net.ipv4.ip_early_demux=0``, or TIME_WAIT sockets that
   carry a client's address capture forwarded packets with the same 4-tuple and drop them.

Three variants add to or replace that shape:

* ``--local`` (locally-originated connections): a ``route`` chain on the output hook marks this
  box's own connections to the diverted ports with the divert mark (except the proxy's own,
  which carry the proxy mark, and those to this box's own addresses). A route chain re-routes a
  packet whose mark changed, so the policy routing sends it out through ``lo``; it comes back
  in through prerouting, where the ``tproxy`` rule hands it to the proxy like forwarded traffic.

* ``--bridge BR`` (bridge mode): bridged frames never reach the IP layer, so a second table of
  family ``bridge`` lifts TCP to and from the diverted ports off the bridge: it re-addresses the
  frame to the bridge's own MAC and sets ``meta pkttype host``, and the IP stack of this box
  takes it from there (the ``inet`` table as above). That needs
  ``net.bridge.bridge-nf-call-iptables=0`` (and ``-ip6tables``; with br_netfilter's default of 1
  the diverted SYN was answered with a reset) and an address on the bridge for the proxy's own
  ARP and neighbour discovery. nft 1.0.6 has no ``meta broute`` and this kernel no ebtables broute
  table, so this is the way that works here (KERNEL-NOTES item 6).

* ``--mode redirect`` (no TPROXY in the kernel): NAT instead -- ``redirect to :<proxy port>`` in
  a ``nat`` chain on prerouting (and on output with ``--local``). No policy routing, no
  sysctls, no spoofing: the proxy asks conntrack for the original destination.

Two policies ride on every variant:

* ``--exclude CIDR``: named interval sets ``exclude_v4`` / ``exclude_v6`` (only those with
  elements), and ``ip saddr @exclude_v4 return`` / ``ip daddr @exclude_v4 return`` (and ip6)
  in every chain that diverts or lifts: prerouting and output of the inet table, the bridge
  table's prerouting (so excluded frames are not even lifted off the bridge, and stay bridged),
  and the QUIC chains. In the TPROXY prerouting chain they come after the socket shortcut: a
  session the proxy already holds when an exclusion is added keeps reaching it until it ends
  (as with any re-apply), while every new connection from or to the network is routed, or
  bridged, as if tproxy were not there.

* ``--block-quic``: UDP to the diverted ports is answered with ICMP port unreachable
  (``reject with icmpx port-unreachable``: a connected UDP socket gets ECONNREFUSED at once, on
  IPv4 and IPv6 alike; admin-prohibited would be EHOSTUNREACH on one and EACCES on the other),
  so a browser's HTTP/3 attempt fails immediately and it uses TCP, where the proxy sees the SNI.
  The ports are the diverted ports themselves: QUIC runs on the port number of the HTTPS it
  replaces (443, or whatever port an Alt-Svc names for a diverted HTTPS port). nft's ``reject``
  is valid in prerouting, input, forward and output, so the inet table gets a filter chain
  ``block_quic`` on prerouting (connections to this box's own addresses exempt, as for TCP) and,
  with ``--local``, ``block_quic_output`` on output (there the reject drops the datagram in the
  sender's own send(), which fails with EPERM: as immediate as ECONNREFUSED). This kernel has
  no bridge-family reject (CONFIG_NFT_BRIDGE_REJECT is not set), so in bridge mode the bridge
  table lifts that UDP off the bridge like the diverted TCP, and the inet chain rejects it. In
  theory every refusal is an ICMP error; in practice the kernel rate-limits ICMP errors per
  client (``net.ipv4.icmp_ratelimit``, 1 s after a burst of 6), and past that a datagram is
  dropped silently, which browsers also survive, after their own QUIC timeout.

What the rules were applied with is kept in the table's comment, and the sysctl values to put
back on remove in the prerouting chain's (nft allows 128 characters per comment), so `remove`,
`show` and `doctor` need no options.

Everything is rendered here as data; `rules.plan` decides what of it an apply runs on a given box
(and `--dry-run` prints that plan), `rules.apply` reads the box and runs it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from tproxy.core.config import InterceptMode
from tproxy.rules.model import (
    RTPROT_TPROXY,
    TABLE_NAME,
    BridgeInfo,
    Network,
    RulesSpec,
    WhenDown,
    normalize_networks,
)

TPROXY_SYSCTLS = {
    "net.ipv4.ip_early_demux": (
        "0",
        "TIME_WAIT sockets of spoofed connections must not capture forwarded packets",
    ),
}
BRIDGE_SYSCTLS = {
    name: ("0", "bridged packets must not pass the IP hooks before the bridge table lifts them")
    for name in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables")
}
# Every sysctl any variant sets: the only names a restore comment may carry.
MANAGED_SYSCTLS = frozenset({*TPROXY_SYSCTLS, *BRIDGE_SYSCTLS})
_COMMENT_PREFIX = "tproxy"
_RESTORE_PREFIX = "restore"


def required_sysctls(mode: InterceptMode, bridge: str | None) -> dict[str, tuple[str, str]]:
    """The sysctls a diversion in `mode` (over `bridge`, if any) needs: name -> (value, why)."""
    if mode is InterceptMode.REDIRECT:
        return {}
    return {**TPROXY_SYSCTLS, **(BRIDGE_SYSCTLS if bridge else {})}


@dataclass(frozen=True)
class IPCommand:
    """One `ip` invocation, with how to tell whether it is already in place."""

    argv: tuple[str, ...]
    family: int  # 4 or 6


@dataclass(frozen=True)
class AppliedSettings:
    """What the installed rules were applied with, as read back from our table's comment."""

    mode: InterceptMode = InterceptMode.TPROXY
    proxy_port: int | None = None
    divert_mark: int | None = None
    route_table: int | None = None
    local: bool = False
    bridge: str | None = None
    exclude: tuple[Network, ...] = ()
    block_quic: bool = False


def settings_of(spec: RulesSpec) -> AppliedSettings:
    """The settings `spec` would leave in the comment (what `doctor` then checks against)."""
    return AppliedSettings(
        mode=spec.mode,
        proxy_port=spec.proxy_port,
        divert_mark=spec.divert_mark,
        route_table=spec.route_table,
        local=spec.local,
        bridge=spec.bridge,
        exclude=spec.exclude,
        block_quic=spec.block_quic,
    )


def render_comment(spec: RulesSpec) -> str:
    """The table's comment: what the rules were applied with (at most 128 characters)."""
    parts = [
        _COMMENT_PREFIX,
        f"mode={spec.mode.value}",
        f"proxy_port={spec.proxy_port}",
        f"divert_mark={spec.divert_mark:#x}",
        f"route_table={spec.route_table}",
        f"local={'yes' if spec.local else 'no'}",
    ]
    if spec.bridge:
        parts.append(f"bridge={spec.bridge}")
    return " ".join(parts)


def render_restore_comment(restore: dict[str, str]) -> str:
    """The prerouting chain's comment: sysctl values to put back on remove (<= 128 characters)."""
    return " ".join([_RESTORE_PREFIX, *(f"{k}={v}" for k, v in sorted(restore.items()))])


def parse_listing(listing: str | None) -> tuple[AppliedSettings, dict[str, str]]:
    """The settings and the sysctl values to restore, from our table as `nft list` prints it.

    Unknown or malformed items are ignored: the comments are ours, but a table is editable.
    The exclusions are the elements of our exclude sets, and `block_quic` is whether our
    `block_quic` chain is there (what is installed, not what a comment says).
    """
    comments = re.findall(r'^\s*comment "([^"]*)"', listing or "", re.MULTILINE)
    settings = next((c for c in comments if c.startswith(_COMMENT_PREFIX + " ")), "")
    restore_text = next((c for c in comments if c.startswith(_RESTORE_PREFIX + " ")), "")
    values = dict(item.partition("=")[::2] for item in settings.split()[1:])
    restore: dict[str, str] = {}
    for item in restore_text.split()[1:]:
        key, sep, value = item.partition("=")
        if sep and key in MANAGED_SYSCTLS and value.isdigit():
            restore[key] = value
    try:
        mode = InterceptMode(values.get("mode", "tproxy"))
    except ValueError:
        mode = InterceptMode.TPROXY
    return (
        AppliedSettings(
            mode=mode,
            proxy_port=_int(values.get("proxy_port")),
            divert_mark=_int(values.get("divert_mark")),
            route_table=_int(values.get("route_table")),
            local=values.get("local") == "yes",
            bridge=values.get("bridge") or None,
            exclude=parse_set_networks(listing, "exclude_v4")
            + parse_set_networks(listing, "exclude_v6"),
            block_quic=re.search(r"^\s*chain block_quic \{", listing or "", re.MULTILINE)
            is not None,
        ),
        restore,
    )


def parse_set_elements(listing: str | None, name: str) -> list[str]:
    """The elements of set `name` in a listing, as nft prints them (quotes kept)."""
    match = re.search(
        rf"^\s*set {name} \{{[^}}]*?elements = \{{([^}}]*)\}}", listing or "", re.MULTILINE
    )
    return (match.group(1) if match else "").replace(",", " ").split()


def parse_set_networks(listing: str | None, name: str) -> tuple[Network, ...]:
    """The networks in set `name` of a listing (nft prints a /32 or /128 as a bare address, and
    wraps long element lists over several lines); elements that are not networks are skipped."""
    networks: list[Network] = []
    for item in parse_set_elements(listing, name):
        try:
            networks.append(ipaddress.ip_network(item))
        except ValueError:
            continue
    return normalize_networks(networks)


def _int(text: str | None) -> int | None:
    try:
        return int(text, 0) if text else None
    except ValueError:
        return None


def _mark(value: int) -> str:
    return f"{value:#010x}"


def _ports_set(spec: RulesSpec) -> list[str]:
    ports = ", ".join(str(r) for r in spec.ports)
    return [
        "\tset divert_ports {",
        "\t\ttype inet_service",
        "\t\tflags interval",
        f"\t\telements = {{ {ports} }}",
        "\t}",
    ]


def _exclude_sets(spec: RulesSpec) -> list[str]:
    """The `exclude_v4` / `exclude_v6` interval sets, each only when it has elements."""
    lines: list[str] = []
    for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
        networks = [str(n) for n in spec.exclude if n.version == version]
        if networks:
            lines += [
                f"\tset exclude_v{version} {{",
                f"\t\ttype {kind}",
                "\t\tflags interval",
                f"\t\telements = {{ {', '.join(networks)} }}",
                "\t}",
            ]
    return lines


def _exclude_rules(spec: RulesSpec) -> list[str]:
    """`return` for packets from or to an excluded network (one chain's rules, indented)."""
    lines: list[str] = []
    for version, match in ((4, "ip"), (6, "ip6")):
        if any(n.version == version for n in spec.exclude):
            lines += [
                f"\t\t{match} saddr @exclude_v{version} return",
                f"\t\t{match} daddr @exclude_v{version} return",
            ]
    return lines


_REJECT_QUIC = "meta l4proto udp udp dport @divert_ports reject with icmpx port-unreachable"


def _quic_chains(spec: RulesSpec) -> list[str]:
    """`--block-quic`: reject UDP to the diverted ports crossing this box (and, with --local,
    leaving it), except from or to excluded networks and to this box's own addresses."""
    if not spec.block_quic:
        return []
    hooks = [("block_quic", "prerouting")]
    if spec.local:
        hooks.append(("block_quic_output", "output"))
    lines: list[str] = []
    for name, hook in hooks:
        lines += [
            f"\tchain {name} {{",
            f"\t\ttype filter hook {hook} priority mangle; policy accept;",
            *_exclude_rules(spec),
            "\t\tfib daddr type local return",
            f"\t\t{_REJECT_QUIC}",
            "\t}",
        ]
    return lines


def _tproxy_chains(spec: RulesSpec, restore: dict[str, str]) -> list[str]:
    divert = _mark(spec.divert_mark)
    lines = [
        "\tchain prerouting {",
        f'\t\tcomment "{render_restore_comment(restore)}"',
        "\t\ttype filter hook prerouting priority mangle; policy accept;",
        f"\t\tmeta mark {_mark(spec.proxy_mark)} return",
        "\t\tmeta l4proto tcp tcp flags & (syn | ack) != syn socket transparent 1 "
        f"socket wildcard 0 meta mark set {divert} accept",
        *_exclude_rules(spec),
        "\t\tfib daddr type local return",
        f"\t\tmeta l4proto tcp tcp dport @divert_ports tproxy to :{spec.proxy_port} "
        f"meta mark set {divert} accept",
    ]
    if spec.when_down is WhenDown.RESET:
        lines.append("\t\tmeta l4proto tcp tcp dport @divert_ports reject with tcp reset")
    lines.append("\t}")
    if spec.local:
        lines += _output_chain(
            spec,
            "type route hook output priority mangle",
            f"meta l4proto tcp tcp dport @divert_ports meta mark set {divert}",
        )
    return lines


def _redirect_chains(spec: RulesSpec, restore: dict[str, str]) -> list[str]:
    redirect = f"meta l4proto tcp tcp dport @divert_ports redirect to :{spec.proxy_port}"
    lines = [
        "\tchain prerouting {",
        f'\t\tcomment "{render_restore_comment(restore)}"',
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        *_exclude_rules(spec),
        "\t\tfib daddr type local return",
        f"\t\t{redirect}",
        "\t}",
    ]
    if spec.local:
        lines += _output_chain(spec, "type nat hook output priority -100", redirect)
    return lines


def _output_chain(spec: RulesSpec, hook: str, divert: str) -> list[str]:
    """`--local`: this box's own connections to the diverted ports get `divert`, except the
    proxy's own (they carry its mark) and those to this box's own addresses."""
    return [
        "\tchain output {",
        f"\t\t{hook}; policy accept;",
        f"\t\tmeta mark {_mark(spec.proxy_mark)} return",
        *_exclude_rules(spec),
        "\t\tfib daddr type local return",
        f"\t\t{divert}",
        "\t}",
    ]


def render_table(spec: RulesSpec, restore: dict[str, str]) -> str:
    """The `table inet tproxy_rules { ... }` block."""
    if spec.mode is InterceptMode.REDIRECT:
        chains = _redirect_chains(spec, restore)
    else:
        chains = _tproxy_chains(spec, restore)
    lines = [
        f"table inet {TABLE_NAME} {{",
        f'\tcomment "{render_comment(spec)}"',
        *_ports_set(spec),
        *_exclude_sets(spec),
        *chains,
        *_quic_chains(spec),
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_bridge_table(spec: RulesSpec, bridge: BridgeInfo) -> str:
    """The `table bridge tproxy_rules { ... }` block that lifts diverted TCP off the bridge.

    Both directions: the client's packets to the diverted ports (for the proxy's listener) and
    the server's packets from them (for the proxy's spoofed upstream sockets). Only frames that
    came in on this bridge's ports (nft's `meta ibrname` needs a module this kernel lacks, so
    the ports are listed; `tproxy doctor` says when they change). Excluded networks are not
    lifted: they stay bridged. With `--block-quic`, UDP to the diverted ports is lifted too, for
    the inet table's `block_quic` chain to reject (the bridge family cannot reject here).
    """
    ports = ", ".join(f'"{name}"' for name in bridge.ports)
    lift = f"ether daddr set {bridge.mac} meta pkttype set host"
    on_bridge = "iifname @bridge_ports meta l4proto tcp"
    quic = (
        [f"\t\tiifname @bridge_ports meta l4proto udp udp dport @divert_ports {lift}"]
        if spec.block_quic
        else []
    )
    lines = [
        f"table bridge {TABLE_NAME} {{",
        *_ports_set(spec),
        *_exclude_sets(spec),
        "\tset bridge_ports {",
        "\t\ttype ifname",
        f"\t\telements = {{ {ports} }}",
        "\t}",
        "\tchain prerouting {",
        "\t\ttype filter hook prerouting priority dstnat; policy accept;",
        *_exclude_rules(spec),
        f"\t\t{on_bridge} tcp dport @divert_ports {lift}",
        f"\t\t{on_bridge} tcp sport @divert_ports {lift}",
        *quic,
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def _delete(family: str) -> str:
    # Declaring the table first makes the delete succeed when it does not exist yet.
    return f"table {family} {TABLE_NAME}\ndelete table {family} {TABLE_NAME}\n"


def render_nft_apply(
    spec: RulesSpec,
    restore: dict[str, str],
    bridge: BridgeInfo | None = None,
    *,
    drop_bridge_table: bool = False,
) -> str:
    """One nft transaction that creates or replaces our tables, and touches nothing else.

    The whole file is one transaction, so the tables are never seen half-built or missing.
    `drop_bridge_table`: a bridge table of ours exists (from an earlier `--bridge`) and goes.
    The bridge family is named only when needed: a kernel without it must still take the rest.
    """
    script = _delete("inet") + render_table(spec, restore)
    if spec.bridge or drop_bridge_table:
        script += _delete("bridge")
    if spec.bridge:
        if bridge is None:
            raise ValueError("bridge mode needs the bridge's MAC address and ports")
        script += render_bridge_table(spec, bridge)
    return script


def render_nft_remove(*, inet: bool = True, bridge: bool = False) -> str:
    """Delete our tables (the inet one, the bridge one) in one transaction."""
    return (_delete("inet") if inet else "") + (_delete("bridge") if bridge else "")


def routing_families(spec: RulesSpec) -> tuple[int, ...]:
    """The IP versions that need policy routing for `spec` (none for REDIRECT)."""
    if spec.mode is InterceptMode.REDIRECT:
        return ()  # NAT needs no policy routing
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
        IPCommand(("ip", f"-{f}", "rule", "add", *_rule_args(spec)), f)
        for f in routing_families(spec)
    ]


def render_ip_route_replace(spec: RulesSpec) -> list[IPCommand]:
    return [
        IPCommand(("ip", f"-{f}", "route", "replace", *_route_args(spec, f)), f)
        for f in routing_families(spec)
    ]
