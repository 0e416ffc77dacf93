"""The `tproxy` command line: parse arguments, call the library, print for humans, set exit codes.

Exit status: 0 success, 1 a runtime failure (one sentence on stderr), 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import uvloop

from tproxy import __version__
from tproxy.core.config import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DEFAULT_DIVERT_MARK,
    DEFAULT_DRAIN_TIMEOUT_S,
    DEFAULT_HALF_CLOSED_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_PROXY_MARK,
    DEFAULT_PROXY_PORT,
    RESERVED_DESCRIPTORS,
    ConfigError,
    InterceptMode,
    LogFormat,
    LoopKind,
    ProxyConfig,
    RelayKind,
    build_config,
    parse_config_file,
)
from tproxy.core.endpoint import Endpoint, EndpointError, parse_endpoint, parse_port
from tproxy.diagnostics.checks import Expected, evaluate, passed, render_text
from tproxy.diagnostics.facts import gather
from tproxy.engine.server import ProxyServer, StartupError, open_listeners
from tproxy.engine.steering import open_steered_listeners
from tproxy.engine.supervisor import close_all, run_workers
from tproxy.engine.worker_channel import WorkerChannel
from tproxy.interception.sockopts import SocketSetupError
from tproxy.lab.demo import run_demo
from tproxy.lab.topology import LabError
from tproxy.observability.eventlog import EventLog
from tproxy.rules.apply import (
    RulesApplyError,
    applied_settings,
    apply_rules,
    has_net_admin,
    ipv6_available,
    plan_rules,
    read_table,
    remove_rules,
    run_command,
    show_rules,
    sysctl_findings,
)
from tproxy.rules.model import (
    DEFAULT_ROUTE_TABLE,
    DEFAULT_RULE_PRIORITY,
    PortRange,
    RulesError,
    RulesSpec,
    WhenDown,
    parse_ports,
)
from tproxy.rules.render import settings_of

T = TypeVar("T")


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def _argument_type(parse: Callable[[str], T], error: type[ValueError]) -> Callable[[str], T]:
    """An argparse `type=` from a parser whose errors are already one sentence."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except error as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


_endpoint: Callable[[str], Endpoint] = _argument_type(parse_endpoint, EndpointError)
_port: Callable[[str], int] = _argument_type(parse_port, EndpointError)
_ports: Callable[[str], tuple[PortRange, ...]] = _argument_type(parse_ports, RulesError)


def _mark(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid mark {text!r}: expected e.g. 2 or 0x2") from None
    if not 1 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"mark {text} out of range: expected 1 to 0xffffffff")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected a positive integer")
    return int(text)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: expected seconds > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="tproxy",
        description=(
            "A transparent TCP proxy for Linux. The kernel's TPROXY target hands tproxy every "
            "diverted TCP connection; tproxy connects to where it was really going, relays both "
            "directions byte for byte and logs each session."
        ),
        epilog=(
            "Quick start: 'tproxy lab' runs a demo in network namespaces. On a router: "
            "'tproxy rules apply --ports 80,443' then 'tproxy run --spoof-source'."
        ),
    )
    parser.add_argument("--version", action="version", version=f"tproxy {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    commands.required = True

    run = commands.add_parser(
        "run",
        help="run the proxy",
        description=(
            "Run the proxy: accept connections that TPROXY diverts to the listening port, connect "
            "to each one's original destination and relay both ways. SIGTERM/SIGINT: stop "
            "accepting, let live sessions finish (--drain-timeout), exit 0. "
            "SIGHUP: reload --config."
        ),
    )
    run.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file with any of the options below (names with underscores, e.g. "
        "idle_timeout = 600); options given here win; SIGHUP re-reads it",
    )
    run.add_argument(
        "--mode",
        choices=[m.value for m in InterceptMode],
        help="how connections are diverted to the proxy, as set up by 'tproxy rules apply "
        "--mode': tproxy (the default; the original destination is the accepted socket's own "
        "address) or redirect (NAT; the original destination comes from conntrack, and "
        "--spoof-source is not available)",
    )
    run.add_argument(
        "--listen",
        action="append",
        type=_endpoint,
        metavar="HOST:PORT",
        help=(
            f"where to listen, repeatable; IPv6 as [addr]:port "
            f"(default: 0.0.0.0:{DEFAULT_PROXY_PORT} and [::]:{DEFAULT_PROXY_PORT})"
        ),
    )
    run.add_argument(
        "--spoof-source",
        action="store_true",
        default=None,
        help=(
            "connect upstream from the client's own IP address, so the server sees the real "
            "client (the server's replies must route back through this box)"
        ),
    )
    run.add_argument(
        "--mark",
        type=_mark,
        help=(
            f"firewall mark on upstream connections, so the rules never divert the proxy's own "
            f"traffic; must differ from the divert mark (default: {DEFAULT_PROXY_MARK:#x}; "
            "use the same value as 'tproxy rules apply --mark')"
        ),
    )
    seconds = (
        ("--connect-timeout", "connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S,
         "reset the client if upstream does not answer in time"),
        ("--idle-timeout", "idle_timeout_s", DEFAULT_IDLE_TIMEOUT_S,
         "reset both sides of a session that moved no byte either way for this long"),
        ("--half-closed-timeout", "half_closed_timeout_s", DEFAULT_HALF_CLOSED_TIMEOUT_S,
         "reset both sides of a session that is half-closed (one side sent FIN) and silent "
         "for this long"),
        ("--drain-timeout", "drain_timeout_s", DEFAULT_DRAIN_TIMEOUT_S,
         "on SIGTERM/SIGINT, how long live sessions may take to finish before they are reset"),
    )  # fmt: skip
    for flag, dest, default, text in seconds:
        run.add_argument(
            flag, dest=dest, type=_seconds, metavar="SECONDS", help=f"{text} (default: {default:g})"
        )
    run.add_argument(
        "--max-connections",
        type=_positive_int,
        metavar="N",
        help="live sessions at most; new connections beyond it are reset at once (default: "
        f"derived from the open-file limit, (limit - {RESERVED_DESCRIPTORS}) / 2)",
    )
    run.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="worker processes sharing the listening sockets, supervised and restarted if "
        "they die (default: the number of CPUs; 1 runs without a supervisor)",
    )
    run.add_argument(
        "--relay",
        choices=[k.value for k in RelayKind],
        help="splice: zero-copy in the kernel (the default; falls back to copy where splice "
        "does not work); copy: bytes pass through Python",
    )
    run.add_argument(
        "--loop",
        choices=[k.value for k in LoopKind],
        help="the event loop: uvloop (the default) or asyncio's own",
    )
    run.add_argument(
        "--log-format",
        choices=[f.value for f in LogFormat],
        help="session log on stdout: text for humans, json for one object per line (default: text)",
    )

    rules = commands.add_parser(
        "rules",
        help="apply, remove or show the nftables rules and policy routing",
        description=(
            "Manage the interception rules in the current network namespace: one nftables table "
            "of our own (inet tproxy_rules) and the policy routing that delivers diverted packets "
            "to the proxy."
        ),
    )
    actions = rules.add_subparsers(dest="action", metavar="ACTION", parser_class=OneLineParser)
    actions.required = True
    apply = actions.add_parser(
        "apply",
        help="divert TCP ports to the proxy (idempotent, all or nothing)",
        description=(
            "Divert new TCP connections to the given destination ports to the proxy port. "
            "Applying again replaces our rules with the new ones; other tables are never touched."
        ),
    )
    apply.add_argument(
        "--ports",
        type=_ports,
        required=True,
        help="destination ports to divert: a list of ports and ranges, e.g. 80,443,8000-8100",
    )
    apply.add_argument(
        "--proxy-port",
        type=_port,
        default=DEFAULT_PROXY_PORT,
        help=f"the port 'tproxy run' listens on (default: {DEFAULT_PROXY_PORT})",
    )
    apply.add_argument(
        "--mark",
        type=_mark,
        default=DEFAULT_PROXY_MARK,
        help=f"the proxy's upstream mark, exempt from diversion (default: {DEFAULT_PROXY_MARK:#x})",
    )
    apply.add_argument(
        "--divert-mark",
        type=_mark,
        default=DEFAULT_DIVERT_MARK,
        help=f"the mark that routes diverted packets to the proxy (default: "
        f"{DEFAULT_DIVERT_MARK:#x})",
    )
    apply.add_argument(
        "--table",
        type=_positive_int,
        default=DEFAULT_ROUTE_TABLE,
        help=f"routing table for 'local default dev lo' (default: {DEFAULT_ROUTE_TABLE})",
    )
    apply.add_argument(
        "--rule-priority",
        type=_positive_int,
        default=DEFAULT_RULE_PRIORITY,
        help=f"priority of the fwmark ip rule (default: {DEFAULT_RULE_PRIORITY})",
    )
    apply.add_argument(
        "--when-down",
        choices=[w.value for w in WhenDown],
        default=WhenDown.RESET.value,
        help=(
            "what diverted connections get while no proxy listens: reset (refused at once; the "
            "default, nothing slips past uninspected) or pass (routed around the stopped proxy)"
        ),
    )
    apply.add_argument(
        "--mode",
        choices=[m.value for m in InterceptMode],
        default=InterceptMode.TPROXY.value,
        help="tproxy (the default: the kernel hands connections to the proxy untouched; "
        "spoofing works) or redirect (NAT to the proxy port, for kernels without TPROXY; "
        "no spoofing; run the proxy with --mode redirect)",
    )
    apply.add_argument(
        "--local",
        action="store_true",
        help="also divert connections that programs on this box open to those ports (the "
        "proxy's own connections are exempt by their mark)",
    )
    apply.add_argument(
        "--bridge",
        metavar="BRIDGE",
        help="bridge mode: divert the TCP that crosses this Linux bridge (which needs an "
        "IPv4 address of its own in the bridged subnet)",
    )
    apply.add_argument(
        "--dry-run", action="store_true", help="print what would be applied, change nothing"
    )
    actions.add_parser(
        "remove",
        help="remove everything 'apply' created, and nothing else",
        description="Delete our nftables table and our ip rules and routes; restore sysctls.",
    )
    actions.add_parser(
        "show", help="print the current rules, routing and relevant sysctls", description=None
    )

    doctor = commands.add_parser(
        "doctor",
        help="check everything a working setup needs, and say how to fix what is wrong",
        description=(
            "Check, in the current network namespace, what interception needs: privileges, nft "
            "and the kernel's tproxy/socket (or redirect) expressions, IP_TRANSPARENT, "
            "forwarding, the policy routing, rp_filter and src_valid_mark, bridge netfilter, our "
            "rules and the proxy's listener. One line per check, with a fix for each that fails. "
            "The setup checked for is what the installed rules were applied with, unless the "
            "options say otherwise. Exit status: 0 all checks passed, 1 something is broken."
        ),
    )
    doctor.add_argument(
        "--mode",
        choices=[m.value for m in InterceptMode],
        help="check for this mode (default: the installed rules', else tproxy)",
    )
    doctor.add_argument(
        "--bridge",
        metavar="BRIDGE",
        help="check for bridge mode on BRIDGE (default: the installed rules')",
    )
    doctor.add_argument(
        "--proxy-port",
        type=_port,
        help=f"the proxy's port (default: the installed rules', else {DEFAULT_PROXY_PORT})",
    )
    doctor.add_argument(
        "--divert-mark",
        type=_mark,
        help=f"the divert mark (default: the installed rules', else {DEFAULT_DIVERT_MARK:#x})",
    )
    doctor.add_argument(
        "--table",
        type=_positive_int,
        help=f"the policy-routing table (default: the installed rules', else "
        f"{DEFAULT_ROUTE_TABLE})",
    )
    doctor.add_argument("--json", action="store_true",
                        help="one JSON object: {ok, expected, checks: [{check, status, detail, "
                        "fix}]}")  # fmt: skip

    lab = commands.add_parser(
        "lab",
        help="demo: a client, a router running tproxy and a server, in network namespaces",
        description=(
            "Build three network namespaces (client, router, server) with addresses in "
            "198.18.0.0/15 and 2001:db8::/32, apply the rules and run the proxy in the router, "
            "send real traffic (curl, checksummed transfers, IPv4 and IPv6), show the session log "
            "and tear everything down. Needs root."
        ),
    )
    lab.add_argument(
        "--keep-going",
        action="store_true",
        help="keep the lab up after the demo until Ctrl-C, to try things by hand",
    )
    lab.add_argument(
        "--bridge",
        action="store_true",
        help="the bridge variant: client and server in one subnet, tproxy on a Linux bridge "
        "between them (tproxy rules apply --bridge)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "rules":
            return _rules(args)
        if args.command == "doctor":
            return _doctor(args)
        return _lab(args)
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> int:
    sys.stderr.write(f"tproxy: error: {message}\n")
    return 1


_RUN_OVERRIDES = (
    "listen",
    "spoof_source",
    "mark",
    "connect_timeout_s",
    "idle_timeout_s",
    "half_closed_timeout_s",
    "max_connections",
    "drain_timeout_s",
)


def _load_config(path: str | None, overrides: dict[str, Any]) -> ProxyConfig:
    """The configuration from the file (if any) and the command line; raises ConfigError."""
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        try:
            file_values = parse_config_file(text)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return build_config(file_values, overrides)


def _run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _RUN_OVERRIDES if getattr(args, name) is not None
    }
    kinds: tuple[tuple[str, type[enum.Enum]], ...] = (
        ("mode", InterceptMode), ("log_format", LogFormat), ("relay", RelayKind),
        ("loop", LoopKind),
    )  # fmt: skip
    for name, kind in kinds:
        if getattr(args, name) is not None:
            overrides[name] = kind(getattr(args, name))
    try:
        config = _load_config(args.config, overrides)
    except ConfigError as exc:
        return _fail(str(exc))
    reload = None if args.config is None else partial(_load_config, args.config, overrides)
    workers = args.workers or os.cpu_count() or 1
    try:
        per_worker = _open_worker_listeners(config, workers)
    except StartupError as exc:
        return _fail(str(exc))
    everyone = list({id(s): s for own in per_worker for s in own}.values())

    def worker_main(worker_id: int | None, channel_sock: socket.socket | None = None) -> int:
        own = per_worker[(worker_id or 1) - 1]
        close_all([s for s in everyone if s not in own])  # other workers' sockets
        log = EventLog(config.log_format, worker=worker_id)
        channel = None
        if worker_id is not None and channel_sock is not None:
            channel = WorkerChannel(channel_sock, worker_id)
        server = ProxyServer(
            config, log, reload, listeners=list(own), share=workers, channel=channel
        )
        server.prepare()
        factory = (
            uvloop.new_event_loop if config.loop is LoopKind.UVLOOP else asyncio.new_event_loop
        )
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(server.serve())
        return 0

    if workers == 1:
        return worker_main(None)
    code = run_workers(workers, worker_main, EventLog(config.log_format, worker=0), everyone)
    close_all(everyone)
    return code


# Several workers: each its own listening socket, each client address steered to one worker
# (engine.steering); False shares one socket among all workers (kept for measuring the two).
STEER_BY_CLIENT = True


def _open_worker_listeners(config: ProxyConfig, workers: int) -> list[list[socket.socket]]:
    """Each worker's listening sockets (index 0 is worker 1); raises StartupError."""
    if workers == 1 or not STEER_BY_CLIENT:
        return [open_listeners(config)] * workers
    transparent = config.mode is InterceptMode.TPROXY
    try:
        return open_steered_listeners(config.listen, workers, transparent=transparent)
    except SocketSetupError as exc:
        raise StartupError(str(exc)) from None


def _rules(args: argparse.Namespace) -> int:
    try:
        if args.action == "apply":
            try:
                spec = RulesSpec(
                    ports=args.ports,
                    proxy_port=args.proxy_port,
                    divert_mark=args.divert_mark,
                    proxy_mark=args.mark,
                    route_table=args.table,
                    rule_priority=args.rule_priority,
                    when_down=WhenDown(args.when_down),
                    ipv6=ipv6_available(),
                    mode=InterceptMode(args.mode),
                    local=args.local,
                    bridge=args.bridge,
                )
            except RulesError as exc:
                sys.stderr.write(f"tproxy rules apply: error: {exc}\n")
                return 2
            if args.dry_run:
                lines = plan_rules(spec)
            else:
                lines = apply_rules(spec)
                findings = sysctl_findings(settings_of(spec))
                lines += [f"warning: {f}" for f in findings if not f.endswith("(ok)")]
                run = "tproxy run --mode redirect" if args.mode == "redirect" else "tproxy run"
                lines.append(f"next: start the proxy ({run} ...), then check it all: tproxy doctor")
        elif args.action == "remove":
            lines = remove_rules()
        else:
            lines = show_rules()
    except RulesApplyError as exc:
        return _fail(str(exc))
    print("\n".join(lines))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    listing = None
    if has_net_admin() and shutil.which("nft") is not None:
        listing = read_table(run_command)
    installed = applied_settings(listing)
    expected = Expected(
        mode=InterceptMode(args.mode) if args.mode else installed.mode,
        proxy_port=args.proxy_port or installed.proxy_port or DEFAULT_PROXY_PORT,
        divert_mark=args.divert_mark or installed.divert_mark or DEFAULT_DIVERT_MARK,
        route_table=args.table or installed.route_table or DEFAULT_ROUTE_TABLE,
        bridge=args.bridge or installed.bridge,
    )
    findings = evaluate(gather(expected, listing), expected)
    ok = passed(findings)
    if args.json:
        report = {
            "ok": ok,
            "expected": {
                "mode": expected.mode.value,
                "proxy_port": expected.proxy_port,
                "divert_mark": expected.divert_mark,
                "route_table": expected.route_table,
                "bridge": expected.bridge,
            },
            "checks": [f.as_json() for f in findings],
        }
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(render_text(findings)))
    return 0 if ok else 1


def _lab(args: argparse.Namespace) -> int:
    try:
        return run_demo(keep_going=args.keep_going, bridge=args.bridge)
    except LabError as exc:
        return _fail(str(exc))
