"""The `tproxy` command line: parse arguments, call the library, print for humans, set exit codes.

Exit status: 0 success, 1 a runtime failure (one sentence on stderr), 2 bad input (one line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import socket
import sys
import tomllib
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from tproxy import __version__
from tproxy.addons.loader import Addon, load_addons
from tproxy.capture.prune import CapturePruner
from tproxy.capture.setup import check_capture
from tproxy.cli.reload import describe_reload
from tproxy.cli.top import parse_interval, run_top
from tproxy.core.config import (
    DEFAULT_DIVERT_MARK,
    DEFAULT_PROXY_MARK,
    DEFAULT_PROXY_PORT,
    FILE_OPTIONS,
    RUN_OPTIONS,
    ConfigError,
    InterceptMode,
    LoopKind,
    ProxyConfig,
    build_config,
    check_interception,
    parse_config_file,
    reload_from,
)
from tproxy.core.endpoint import (
    Endpoint,
    EndpointError,
    IPAddress,
    parse_endpoint,
    parse_port,
)
from tproxy.core.options import OptionSpec, parse_mark, parse_positive_int
from tproxy.core.session_id import MAX_WORKER
from tproxy.core.worker_protocol import RELOAD_TIMEOUT_S, Reloaded
from tproxy.diagnostics.checks import Expected, evaluate, passed, render_text
from tproxy.diagnostics.facts import gather
from tproxy.engine.control import (
    DEFAULT_DIR as DEFAULT_CONTROL_DIR,
)
from tproxy.engine.control import (
    ControlError,
    default_control_path,
    finish_takeover,
    open_control_socket,
    take_over,
)
from tproxy.engine.control import (
    request as control_request,
)
from tproxy.engine.metrics_endpoint import MetricsEndpointError, open_metrics_socket
from tproxy.engine.pipes import apply_pipe_budget
from tproxy.engine.server import TASKS_STOP_TIMEOUT_S, ProxyServer, StartupError, open_listeners
from tproxy.engine.steering import open_steered_listeners
from tproxy.engine.supervisor import close_all, run_workers
from tproxy.engine.takeover import adopt, adopt_metrics, split_metrics
from tproxy.engine.takeover import handover as takeover_handover
from tproxy.engine.worker_channel import WorkerChannel
from tproxy.interception.sockopts import SocketSetupError
from tproxy.lab.demo import run_demo
from tproxy.lab.intercept_demo import run_intercept_demo
from tproxy.lab.topology import LabError
from tproxy.observability.eventlog import EventLog
from tproxy.observability.events import Notice
from tproxy.observability.session_table import render_sessions
from tproxy.policy.decide import SessionFacts, SniffedFacts, Verdict, trace
from tproxy.policy.load import load_matcher, read_policy
from tproxy.policy.model import PROTOS, Policy
from tproxy.rules.apply import (
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
    Network,
    PortRange,
    RulesError,
    RulesSpec,
    WhenDown,
    parse_network,
    parse_ports,
)
from tproxy.rules.plan import RulesApplyError
from tproxy.rules.render import settings_of
from tproxy.service.notify import Notifier, NotifyError, watchdog_interval_s
from tproxy.service.privileges import (
    CAP_SYS_ADMIN,
    CAP_SYS_RESOURCE,
    PrivilegeError,
    check_can_mark,
    check_code_readable,
    code_directories,
    drop_privileges,
    has_capability,
    plan_start,
    resolve_user,
)
from tproxy.service.units import (
    DEFAULT_USER,
    PROXY_UNIT,
    RULES_UNIT,
    UnitOptions,
    listens_below_1024,
    render_units,
    under_homes,
)
from tproxy.sniffers.printable import to_printable
from tproxy.tls.ca import CERT_FILE, KEY_FILE, CAError, create_ca, load_ca, read_ca_cert
from tproxy.tls.contexts import check_upstream_ca, open_keylog

T = TypeVar("T")

# How long `tproxy reload` waits for the answer: the supervisor's own reload, then its workers'
# (at least RELOAD_TIMEOUT_S); systemd gives ExecReload 90 s by default.
RELOAD_ANSWER_TIMEOUT_S = 120.0


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


_port: Callable[[str], int] = _argument_type(parse_port, EndpointError)
_endpoint: Callable[[str], Endpoint] = _argument_type(parse_endpoint, EndpointError)
_ports: Callable[[str], tuple[PortRange, ...]] = _argument_type(parse_ports, RulesError)
_network: Callable[[str], Network] = _argument_type(parse_network, RulesError)
_mark: Callable[[str], int] = _argument_type(parse_mark, ConfigError)
_positive_int: Callable[[str], int] = _argument_type(parse_positive_int, ConfigError)


def _add_option(parser: argparse.ArgumentParser, spec: OptionSpec) -> None:
    """One argparse argument from an option spec; absent, it is None (the file or default wins)."""
    assert spec.flag is not None
    if spec.kind.switch:
        parser.add_argument(
            spec.flag, dest=spec.name, action="store_true", default=None, help=spec.help
        )
        return
    parser.add_argument(
        spec.flag,
        dest=spec.name,
        type=_argument_type(spec.kind.from_text, ConfigError),
        action="append" if spec.kind.repeatable else "store",
        metavar=spec.shown_metavar,
        help=spec.help,
    )


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
    for spec in RUN_OPTIONS:
        if spec.flag is not None:
            _add_option(run, spec)
    run.add_argument(
        "--user",
        metavar="NAME",
        help="started as root: bind the listeners, then run every process as NAME with only "
        "CAP_NET_ADMIN (before any addon, policy, CA or key log file is read)",
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
        "--exclude",
        type=_network,
        action="append",
        default=[],
        metavar="CIDR",
        help="never divert connections from or to this network (repeatable; IPv4 or IPv6, e.g. "
        "198.18.2.0/24 or 2001:db8:2::/64; a plain address is a /32 or /128; host bits must "
        "be clear): they are routed (or bridged) as if tproxy were not there",
    )
    apply.add_argument(
        "--block-quic",
        action="store_true",
        help="reject UDP to the diverted ports with ICMP port unreachable, so browsers give up "
        "on QUIC (HTTP/3) at once and use TCP, where the proxy and SNI rules see them "
        "(excluded networks are not blocked)",
    )
    apply.add_argument(
        "--dry-run",
        action="store_true",
        help="print exactly what apply would run here, change nothing (no root needed; without "
        "it, rules already installed cannot be read and the output says so)",
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
    doctor.add_argument(
        "--max-connections",
        type=_positive_int,
        metavar="N",
        help="the proxy's --max-connections: warn when the per-user pipe budget "
        "(fs.pipe-user-pages-soft) is too small for that many sessions, as a user (not root)",
    )
    doctor.add_argument("--json", action="store_true",
                        help="one JSON object: {ok, expected, checks: [{check, status, detail, "
                        "fix}]}")  # fmt: skip

    policy = commands.add_parser(
        "policy",
        help="check a policy file, or explain what it decides for a session",
        description="Read a policy file (tproxy run --policy) without running anything; no root.",
    )
    policy_actions = policy.add_subparsers(
        dest="action", metavar="ACTION", parser_class=OneLineParser
    )
    policy_actions.required = True
    check = policy_actions.add_parser(
        "check",
        help="validate a policy file",
        description=(
            "Validate a policy file. Exit status: 0 and a one-line summary if it is valid; 2 and "
            "one line naming the rule and key that is wrong if not."
        ),
    )
    check.add_argument("file", metavar="FILE", help="the policy file (TOML)")
    explain = policy_actions.add_parser(
        "explain",
        help="say which rule decides a session like this one, and why",
        description=(
            "Print the rule and action the policy gives a session with these facts, and for each "
            "rule tried why it did or did not decide. Without --sni, --host or --proto the "
            "session is taken as not sniffed yet. Exit status 0; 2 if the file is invalid."
        ),
    )
    explain.add_argument("file", metavar="FILE", help="the policy file (TOML)")
    explain.add_argument("--client", required=True, type=_ip, metavar="IP",
                         help="the client's address")  # fmt: skip
    explain.add_argument("--dst", required=True, type=_endpoint, metavar="IP:PORT",
                         help="the original destination ([IPv6]:PORT for IPv6)")  # fmt: skip
    explain.add_argument("--sni", metavar="NAME", help="the sniffed TLS server name")
    explain.add_argument("--host", metavar="NAME", help="the sniffed HTTP Host")
    explain.add_argument(
        "--proto",
        choices=PROTOS,
        help="the sniffed protocol (default: tls with --sni, http with --host)",
    )

    addon = commands.add_parser(
        "addon",
        help="check addon files",
        description="Load addon files (tproxy run --addon) without running the proxy; no root.",
    )
    addon_actions = addon.add_subparsers(dest="action", metavar="ACTION",
                                         parser_class=OneLineParser)  # fmt: skip
    addon_actions.required = True
    addon_check = addon_actions.add_parser(
        "check",
        help="load addon files and list their hooks",
        description=(
            "Load each file as 'tproxy run --addon' does (its code runs) and check its hooks. "
            "Exit status: 0 and one line per addon (its hooks, which are async, whether it "
            "sniffs) if all load; 2 and one line naming the file, line and error if one does not."
        ),
    )
    addon_check.add_argument("files", metavar="FILE", nargs="+", help="the addon files (Python)")

    ca = commands.add_parser(
        "ca",
        help="create or show the CA that signs the certificates of intercepted TLS sessions",
        description=(
            'The CA for TLS interception (rules with tls = "intercept"): a directory '
            f"with {CERT_FILE}, the certificate the clients install, and {KEY_FILE}, its private "
            "key (mode 0600; whoever reads it can impersonate any server to those clients). "
            "No root needed."
        ),
    )
    ca_actions = ca.add_subparsers(dest="action", metavar="ACTION", parser_class=OneLineParser)
    ca_actions.required = True
    ca_create = ca_actions.add_parser(
        "create",
        help="create a new CA in DIR",
        description=(
            f"Create a CA (ECDSA P-256, valid ten years) in DIR, made 0700 if missing: "
            f"{CERT_FILE} (0644) and {KEY_FILE} (0600), then show it as 'ca show' does. An "
            "existing CA is never overwritten without --force."
        ),
    )
    ca_create.add_argument("dir", metavar="DIR", help="the CA directory")
    ca_create.add_argument(
        "--force",
        action="store_true",
        help="replace an existing CA in DIR (clients that trust the old one must be given the "
        "new one)",
    )
    ca_show = ca_actions.add_parser(
        "show",
        help="print the CA's subject, fingerprint and expiry, and how to install it on clients",
        description=(
            "Print the CA's subject, SHA-256 fingerprint, validity and whether 'tproxy run --ca' "
            "can use it, and one line each on installing it on Debian/Ubuntu, Firefox, Android, "
            "Windows and macOS. Exit status: 0 usable, 1 not (the last line says why)."
        ),
    )
    ca_show.add_argument("dir", metavar="DIR", help="the CA directory")

    lab = commands.add_parser(
        "lab",
        help="demo: a client, a router running tproxy and a server, in network namespaces",
        description=(
            "Build three network namespaces (client, router, server) with addresses in "
            "198.18.0.0/15 and 2001:db8::/32, apply the rules and run the proxy in the router "
            "with a small policy, send real traffic (HTTP and HTTPS with curl, one request the "
            "policy resets by name, checksummed transfers, IPv4 and IPv6), show the session log "
            "and tear everything down. --intercept shows TLS interception instead. Needs root."
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
    lab.add_argument(
        "--intercept",
        action="store_true",
        help="the TLS interception demo instead: a throw-away CA (tproxy ca create), one HTTPS "
        "request intercepted (curl trusting that CA; the example addon http_log.py logs its "
        "plaintext request line) and a pinned name passed through untouched",
    )
    sessions = commands.add_parser(
        "sessions",
        help="list the live sessions of the tproxy running in this network namespace",
        description=(
            "Ask the running tproxy over its control socket for every worker's live sessions: "
            "id, worker, client, original destination, SNI, the deciding rule, the relay, bytes "
            "each way, age and idle seconds (at most 1,000 per worker). Needs the control "
            "socket's permissions (root, by default)."
        ),
    )
    sessions.add_argument("--json", action="store_true", help="one JSON object, as answered")
    _control_option(sessions)

    top = commands.add_parser(
        "top",
        help="a live view of the running tproxy: totals, rules and the busiest sessions",
        description=(
            "Ask the running tproxy over its control socket, every --interval seconds, for its "
            "totals and live sessions, and show them in place: sessions and bytes with their "
            "rates, refusals, upstream connect times, addon errors; per rule, live and closed "
            "sessions (and how many did not close cleanly) and bytes; then the sessions that "
            "moved the most bytes since the previous poll, as many as fit. q quits. Needs the "
            "control socket's permissions (root, by default)."
        ),
    )
    top.add_argument(
        "--interval",
        metavar="SECONDS",
        type=_argument_type(parse_interval, ValueError),
        default=1.0,
        help="seconds between polls (default: 1; from 0.1 to 3600)",
    )
    top.add_argument(
        "--once", action="store_true", help="print one frame (no live screen, no rates) and exit"
    )
    _control_option(top)

    kill = commands.add_parser(
        "kill",
        help="reset one live session of the running tproxy on both sides",
        description=(
            "Reset the live session ID (as `tproxy sessions` and the session log name it) on "
            "both sides: the client and the server each see a reset; its session_close says "
            "reason killed. Exit status 1 when no worker has it."
        ),
    )
    kill.add_argument("id", metavar="ID", help="the session id")
    _control_option(kill)

    reload = commands.add_parser(
        "reload",
        help="reload the running tproxy's configuration, policy and addons, and say how it went",
        description=(
            "What SIGHUP does, answered once it is done: the running tproxy re-reads --config, "
            "the --policy and the --addon files; if its supervisor applied them, every worker "
            "reloads them too. Prints the notices (options that change only on restart, why a "
            "file was refused). Exit status 0 when the supervisor and every worker applied the "
            "files; 1 when the running configuration was kept (an invalid file, nothing to "
            "reload) or a worker refused or did not confirm (within "
            f"{RELOAD_TIMEOUT_S:g} s, or twice the supervisor's own reload). The systemd "
            "unit's ExecReload, so that `systemctl reload tproxy` fails on an invalid file."
        ),
    )
    _control_option(reload)
    reload.add_argument(
        "--config",
        metavar="FILE",
        help="the running tproxy's --config: its `control` key says where the control socket "
        "is (--control wins)",
    )

    unit = commands.add_parser(
        "service-unit",
        help="print systemd units for the rules and the proxy, filled in with the options given",
        description=(
            f"Print (or --write) two systemd units: {RULES_UNIT}, a oneshot that applies the "
            "rules and keeps them while the proxy restarts or is stopped, and "
            f"{PROXY_UNIT}, the proxy (Type=notify, watchdog, reload by 'tproxy reload'), as "
            "--user "
            "with only the capabilities it needs and systemd's sandboxing. The options are "
            "checked as 'tproxy rules apply' and 'tproxy run' would check them. Example: "
            "tproxy service-unit --rules '--ports 80,443' -- --spoof-source --config "
            "/etc/tproxy/tproxy.toml"
        ),
    )
    unit.add_argument(
        "--rules",
        metavar="OPTIONS",
        required=True,
        help="'tproxy rules apply' options, one quoted string (e.g. '--ports 80,443 --local')",
    )
    who = unit.add_mutually_exclusive_group()
    who.add_argument(
        "--user",
        metavar="NAME",
        default=DEFAULT_USER,
        help=f"the user the proxy runs as (default: {DEFAULT_USER}; create it with "
        "'useradd --system --no-create-home --shell /usr/sbin/nologin NAME')",
    )
    who.add_argument("--as-root", action="store_true", help="run the proxy as root (not advised)")
    unit.add_argument(
        "--write",
        metavar="DIR",
        help="write the two files into DIR (e.g. /etc/systemd/system) instead of printing them",
    )
    unit.add_argument(
        "run_args",
        metavar="-- RUN OPTIONS",
        nargs=argparse.REMAINDER,
        help="'tproxy run' options, after --",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_rules_value_joined(sys.argv[1:] if argv is None else argv))
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "rules":
            return _rules(args)
        if args.command == "doctor":
            return _doctor(args)
        if args.command == "policy":
            return _policy(args)
        if args.command == "addon":
            return _addon(args)
        if args.command == "ca":
            return _ca(args)
        if args.command == "service-unit":
            return _service_unit(args)
        if args.command == "sessions":
            return _sessions(args)
        if args.command == "kill":
            return _kill(args)
        if args.command == "top":
            return _top(args)
        if args.command == "reload":
            return _reload(args)
        return _lab(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `tproxy ca show DIR | head`: the reader had enough
        # Python would complain again flushing stdout at exit: point it at /dev/null.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def _rules_value_joined(argv: Sequence[str]) -> list[str]:
    """`service-unit --rules --ports=80` as `--rules=--ports=80`: argparse takes a value that
    starts with `-` and has no space for an option of its own, and would say --rules has none."""
    args = list(argv)
    if args[:1] != ["service-unit"]:
        return args
    end = args.index("--") if "--" in args else len(args)
    for i in range(1, end - 1):
        if args[i] == "--rules":
            return [*args[:i], f"--rules={args[i + 1]}", *args[i + 2 :]]
    return args


def _control_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--control", metavar="PATH", help="the control socket (default: this namespace's)"
    )


def _ask_running(args: argparse.Namespace, message: dict[str, Any]) -> dict[str, Any]:
    """The running proxy's answer over its control socket (`--control`, or this namespace's).

    Raises:
        ControlError: nobody answers, not in time, or the answer is an error.
    """
    return control_request(args.control or default_control_path(), message, timeout_s=10)


def _sessions(args: argparse.Namespace) -> int:
    """`tproxy sessions`: the running proxy's live sessions, as a table or JSON."""
    try:
        answer = _ask_running(args, {"command": "sessions"})
    except ControlError as exc:
        return _fail(str(exc))
    if args.json:
        print(json.dumps({k: v for k, v in answer.items() if k != "ok"}, indent=2))
        return 0
    print(render_sessions(answer))
    return 0


def _top(args: argparse.Namespace) -> int:
    """`tproxy top`: the live screen (tproxy.cli.top), asking as `tproxy sessions` does."""
    try:
        return run_top(partial(_ask_running, args), interval_s=args.interval, once=args.once)
    except ControlError as exc:
        return _fail(str(exc))


def _kill(args: argparse.Namespace) -> int:
    """`tproxy kill ID`: reset one live session on both sides."""
    try:
        answer = _ask_running(args, {"command": "kill", "id": args.id})
    except ControlError as exc:
        return _fail(str(exc))
    if answer.get("killed") is None:
        missing = answer.get("missing") or []
        also = f" (workers {missing} did not answer)" if missing else ""
        return _fail(f"no live session {to_printable(args.id.encode(), 40)}{also}")
    print(f"session {args.id} reset on both sides (worker {answer['killed']})")
    return 0


def _reload(args: argparse.Namespace) -> int:
    """`tproxy reload`: reload the running proxy, and say how it went (status 1 unless done)."""
    path = args.control or _control_in(args.config) or default_control_path()
    try:
        answer = control_request(path, {"command": "reload"}, timeout_s=RELOAD_ANSWER_TIMEOUT_S)
    except ControlError as exc:
        why = str(exc)
        if "unknown command 'reload'" in why:
            why += " (a tproxy older than this command: send it SIGHUP, or restart it)"
        return _fail(why)
    done, lines = describe_reload(answer)
    for line in lines:
        print(line if done else f"tproxy: {line}", file=sys.stdout if done else sys.stderr)
    return 0 if done else 1


def _control_in(config_path: str | None) -> str | None:
    """The `control` key of the file `tproxy run --config` reads, if it has one. Leniently:
    a file that cannot be read or parsed says nothing here (the running proxy, asked at the
    default path, says what is wrong with it)."""
    if config_path is None:
        return None
    try:
        value = tomllib.loads(Path(config_path).read_text()).get("control")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    return value if isinstance(value, str) and value else None


def _service_unit(args: argparse.Namespace) -> int:
    """Check the options as the two commands would, then print or write both units."""
    run_args = list(args.run_args)
    if run_args[:1] == ["--"]:
        run_args = run_args[1:]
    try:
        rules_args = shlex.split(args.rules)
    except ValueError as exc:
        return _fail(f"--rules: {exc}")
    parser = build_parser()
    rules = parser.parse_args(["rules", "apply", *rules_args])  # exits 2 on a bad option
    run = parser.parse_args(["run", *run_args])
    try:
        config = _unit_config(run.config, cli_overrides(run))
    except ConfigError as exc:
        return _fail(str(exc))
    mismatch = _rules_against_proxy(rules, config)
    if mismatch is not None:
        return _fail(mismatch)
    read = (run.config, config.policy, *config.addon_files, config.ca_dir, config.upstream_ca)
    readable = [path for path in read if path is not None]
    writable = [config.capture_dir] if config.capture_dir else []
    if config.keylog is not None:
        writable.append(str(Path(config.keylog).parent))
    relative = [path for path in (*readable, *writable) if not Path(path).is_absolute()]
    if relative:  # systemd starts the proxy in /, not here
        return _fail(f"give absolute paths (systemd runs the proxy in /): {', '.join(relative)}")
    if config.control is not None and not config.control.startswith(DEFAULT_CONTROL_DIR + "/"):
        return _fail(
            f"control {config.control}: under systemd the control socket goes in "
            f"{DEFAULT_CONTROL_DIR}/ (the unit's RuntimeDirectory=, the one place under /run "
            "that exists and is the proxy's at every start)"
        )
    # `tproxy reload` finds the socket as the proxy does: --control, or the file's `control`.
    reload_args = (
        ("--control", run.control) if run.control else ("--config", run.config) if run.config
        else ()
    )  # fmt: skip
    for folder in writable:
        if not Path(folder).is_dir():
            made = f"mkdir -p {shlex.quote(folder)}"
            if not args.as_root:
                made += f" && chown {shlex.quote(args.user)} {shlex.quote(folder)}"
            sys.stderr.write(
                f"tproxy: warning: {folder} does not exist: systemd will not start the proxy "
                f"(ReadWritePaths=) until it does, writable by its user ({made})\n"
            )
    interpreter = os.path.realpath(sys.executable)
    hidden = [path for path in (interpreter, *readable, *writable) if under_homes(path)]
    if hidden:
        sys.stderr.write(
            f"tproxy: warning: under /home, /root or /run/user: {', '.join(hidden)}: the unit "
            "says ProtectHome=read-only instead of yes, and the proxy's user must be able to "
            "reach them (better: install tproxy and its files elsewhere)\n"
        )
    options = UnitOptions(
        command=(sys.executable, "-m", "tproxy"),
        rules_args=tuple(rules_args),
        run_args=tuple(run_args),
        user=None if args.as_root else args.user,
        bind_service=listens_below_1024([(str(e.ip), e.port) for e in config.listen]),
        writable=tuple(writable),
        drain_timeout_s=config.drain_timeout_s,
        readable=tuple({interpreter, *readable}),
        reload_args=reload_args,
    )
    try:
        units = render_units(options)
    except ValueError as exc:
        return _fail(str(exc))
    if args.write is None:
        for name, text in units.items():
            sys.stdout.write(f"# --- {name}\n{text}\n")
        return 0
    for name, text in units.items():
        path = Path(args.write) / name
        try:
            path.write_text(text)
        except OSError as exc:
            return _fail(f"cannot write {path}: {exc.strerror}")
        print(f"wrote {path}")
    print(f"then: systemctl daemon-reload && systemctl enable --now {PROXY_UNIT}")
    return 0


def _unit_config(path: str | None, overrides: dict[str, Any]) -> ProxyConfig:
    """The proxy's configuration as far as the units need it: the file (if any) and the
    command line, checked as `tproxy run` checks them, without loading the policy, the CA or
    the addons (the units may be made before those are in place)."""
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            file_values = parse_config_file(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return build_config(file_values, overrides)


def _rules_against_proxy(rules: argparse.Namespace, config: ProxyConfig) -> str | None:
    """Why the rules would not deliver to this proxy (None when they would): the port, the
    mode and the mark must be the same on both sides."""
    port = rules.proxy_port or DEFAULT_PROXY_PORT
    if all(endpoint.port != port for endpoint in config.listen):
        listening = ", ".join(str(endpoint) for endpoint in config.listen)
        return (f"the rules divert to port {port} but the proxy listens on {listening}: give "
                "'--proxy-port' to --rules or '--listen' to the proxy")  # fmt: skip
    if InterceptMode(rules.mode) is not config.mode:
        return (f"the rules are in {rules.mode} mode but the proxy in {config.mode.value} mode: "
                "give the same --mode to both")  # fmt: skip
    if rules.mark is not None and rules.mark != config.mark:
        return (f"the rules exempt mark {rules.mark:#x} but the proxy marks its connections "
                f"{config.mark:#x}: give the same --mark to both")  # fmt: skip
    return None


def _fail(message: str) -> int:
    sys.stderr.write(f"tproxy: error: {message}\n")
    return 1


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ProxyConfig fields the command line sets (they win over the file, also on reload)."""
    given = {spec.name: getattr(args, spec.name) for spec in FILE_OPTIONS}
    return {name: value for name, value in given.items() if value is not None}


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
    config = build_config(file_values, overrides)
    if config.policy is not None:
        config = replace(config, matcher=load_matcher(config.policy))
    check_capture(config)  # on reload too: a broken capture setup keeps the running one
    check_interception(config)
    if config.upstream_ca is not None:
        check_upstream_ca(config.upstream_ca)
    if config.addon_files:  # last: nothing fails after the addons' modules were replaced
        config = replace(config, addons=load_addons(config.addon_files))
    return config


def _checked_config(path: str | None, overrides: dict[str, Any]) -> ProxyConfig:
    """Everything `tproxy run` loads and checks before it serves: the file, the policy, the
    addons, the capture directory, the CA and the key log; raises ConfigError (one sentence).
    With --user this runs as that user, so a file it cannot read stops the start here."""
    config = _load_config(path, overrides)
    if config.ca_dir is not None:
        try:
            load_ca(config.ca_dir)  # checked once here: a broken CA stops the start, one line
        except CAError as exc:
            raise ConfigError(f"--ca: {exc}") from None
    if config.keylog is not None:  # checked (and created 0600) once here; each worker opens it
        os.close(open_keylog(config.keylog)[0])
    return config


def _run(args: argparse.Namespace) -> int:
    overrides = cli_overrides(args)
    try:
        user = resolve_user(args.user) if args.user is not None else None
        plan = plan_start(os.geteuid(), user)
        # The file and the command line, checked, nothing loaded yet: what binding needs.
        config = _unit_config(args.config, overrides)
    except (PrivilegeError, ConfigError) as exc:
        return _fail(str(exc))
    workers = args.workers or os.cpu_count() or 1
    if workers > MAX_WORKER:  # the session id has room for this many
        return _fail(f"--workers {workers} is more than tproxy runs ({MAX_WORKER} at most)")
    try:  # systemd's notify socket and watchdog (`Type=notify`), when it gave them
        notifier = Notifier.from_env()
        watchdog_every_s = watchdog_interval_s(os.environ, os.getpid())
    except NotifyError as exc:
        return _fail(str(exc))
    supervised = (
        workers > 1 or notifier.enabled or args.takeover or config.metrics_listen is not None
    )
    control_path = config.control or default_control_path()
    bound: _Bound | None = None
    if plan.drop:  # bind as root (transparent, below 1024), then nothing else runs as root
        assert user is not None
        try:
            bound = _bind(args.takeover, config, workers, supervised, control_path)
            imported_from = code_directories()
            drop_privileges(user)
            check_code_readable(user, imported_from)
        except (ControlError, StartupError, PrivilegeError) as exc:
            if bound is not None:
                bound.abandon()
            return _fail(str(exc))
    try:  # the policy, addons, capture directory, CA and key log: as --user when given
        config = _checked_config(args.config, overrides)
    except ConfigError as exc:
        if bound is not None:
            bound.abandon()
        return _fail(str(exc))
    reloadable = args.config is not None or config.policy is not None or bool(config.addon_files)
    reload = partial(_load_config, args.config, overrides) if reloadable else None
    if bound is None:
        try:
            bound = _bind(args.takeover, config, workers, supervised, control_path)
        except (ControlError, StartupError) as exc:
            return _fail(str(exc))
    try:
        check_can_mark(config.mark)
    except PrivilegeError as exc:
        bound.abandon()
        return _fail(str(exc))
    per_worker, control, successor = bound.per_worker, bound.control, bound.successor
    their_control = bound.their_control
    start_log = EventLog(config.log_format, worker=0 if supervised else None)
    if plan.notice is not None:
        start_log.emit(Notice(plan.notice))
    if plan.drop:
        assert user is not None
        start_log.emit(Notice(f"running as {user.name} (uid {user.uid}, gid {user.gid}) with "
                              "CAP_NET_ADMIN only"))  # fmt: skip
    # As a user (not root), every pipe of every worker counts against one per-user budget.
    exempt = has_capability(CAP_SYS_RESOURCE) or has_capability(CAP_SYS_ADMIN)
    pipes_notice = apply_pipe_budget(workers, limited=not exempt)
    if pipes_notice is not None:
        start_log.emit(Notice(pipes_notice))
    if bound.no_control is not None:
        start_log.emit(Notice(bound.no_control))
    everyone = list({id(s): s for own in per_worker for s in own}.values())
    # The configuration a worker starts with: a worker restarted after a SIGHUP is forked from a
    # supervisor that has reloaded too, so it starts with what its siblings run.
    current = [config]

    def worker_main(worker_id: int | None, channel_sock: socket.socket | None = None) -> int:
        config = current[0]
        own = per_worker[(worker_id or 1) - 1]
        close_all([s for s in everyone if s not in own])  # other workers' sockets
        if successor is not None:  # the supervisor's, to the proxy it takes over from
            successor.close()
        if their_control is not None:  # the supervisor's to serve once that one drains
            their_control.close()
        log = EventLog(config.log_format, worker=worker_id)
        channel = None
        if worker_id is not None and channel_sock is not None:
            channel = WorkerChannel(channel_sock, worker_id)
        server = ProxyServer(
            config,
            log,
            reload,
            listeners=list(own),
            share=workers,
            channel=channel,
            worker=worker_id or 0,
        )
        server.prepare()
        factory = (
            uvloop.new_event_loop if config.loop is LoopKind.UVLOOP else asyncio.new_event_loop
        )
        run_to_the_end(factory(), server.serve())
        return 0

    if not supervised:  # (under systemd, or taking over, a supervisor is needed)
        return worker_main(None)
    supervisor_log = EventLog(config.log_format, worker=0)

    def on_reload() -> Reloaded:
        """The supervisor's part of SIGHUP and `tproxy reload`: its own log's format, what a
        restarted worker starts with, and the reload's notices, once (the workers reload the
        same file silently); whether it applied the files, and the notices about the files
        (`tproxy reload` says how many workers reloaded once they answered)."""
        new, notices = reload_from(current[0], reload)
        if new is not None:
            current[0] = new
            supervisor_log.log_format = new.log_format
        for notice in notices:
            supervisor_log.emit(Notice(notice))
        if new is not None:
            supervisor_log.emit(Notice(f"reloaded the configuration in {workers} workers"))
        return new is not None, notices

    pruner = CapturePruner()

    def on_tick(now: float) -> None:
        """The supervisor prunes the capture directory for every worker (each writes its own
        files into it): one pruner, so two never race over the same oldest file."""
        if pruner.due(now, current[0]):
            for notice in pruner.run(current[0]):
                supervisor_log.emit(Notice(notice))

    def on_serving() -> tuple[socket.socket, str] | None:
        """Every worker serves: a takeover's old proxy may drain now, and its control socket's
        path is ours."""
        if successor is None or their_control is None:
            return None
        return finish_takeover(successor, their_control), control_path

    def handover() -> tuple[dict[str, Any], list[int]]:
        metrics = None
        if bound.metrics is not None and config.metrics_listen is not None:
            metrics = (config.metrics_listen, bound.metrics)
        return takeover_handover(config.listen, per_worker, metrics)

    code = run_workers(workers, worker_main, supervisor_log, everyone, on_reload, on_tick=on_tick,
                       notifier=notifier, watchdog_every_s=watchdog_every_s, control=control,
                       handover=handover, on_serving=on_serving, metrics=bound.metrics,
                       metrics_when_serving=bound.metrics_adopted, version=__version__)  # fmt: skip
    notifier.close()
    close_all(everyone)
    return code


@dataclass
class _Bound:
    """What `tproxy run` holds once it may serve: each worker's listening sockets, the control
    socket (or why there is none), and with `--takeover` the connection to the running proxy
    and its control socket (served once it drains)."""

    per_worker: list[list[socket.socket]]
    control: tuple[socket.socket, str] | None = None
    no_control: str | None = None
    successor: socket.socket | None = None
    their_control: socket.socket | None = None
    metrics: socket.socket | None = None  # --metrics-listen's listening socket
    metrics_adopted: bool = False  # it is the one of the proxy taken over

    def abandon(self) -> None:
        """The start failed after binding: let go of everything (the running proxy, if taking
        over, goes on serving)."""
        if self.metrics is not None:
            self.metrics.close()
        for sock in {id(s): s for own in self.per_worker for s in own}.values():
            sock.close()
        if self.successor is not None:
            self.successor.close()
        if self.their_control is not None:
            self.their_control.close()
        if self.control is not None:
            self.control[0].close()
            with contextlib.suppress(OSError):
                os.unlink(self.control[1])


def _bind(
    takeover: bool, config: ProxyConfig, workers: int, supervised: bool, control_path: str
) -> _Bound:
    """The listening sockets, taken over from the running proxy (`--takeover`) or bound, and
    the control socket (first: a running proxy is named before the port is found taken).

    Raises:
        ControlError, StartupError: one line for the user; nothing stays open.
    """
    if takeover:
        successor, their_control, reply, fds = take_over(control_path)
        metrics_endpoint, metrics_fd = split_metrics(reply, fds)
        try:
            per_worker = adopt(reply, fds, config.listen, workers)
        except ControlError:
            successor.close()
            their_control.close()
            if metrics_fd is not None:
                os.close(metrics_fd)
            raise
        metrics = adopt_metrics(metrics_endpoint, metrics_fd, config.metrics_listen)
        bound = _Bound(per_worker, successor=successor, their_control=their_control,
                       metrics=metrics, metrics_adopted=metrics is not None)  # fmt: skip
    else:
        control, no_control = (None, None)
        if supervised:
            control, no_control = _control_socket(control_path, explicit=config.control is not None)
        try:
            per_worker = _open_worker_listeners(config, workers)
        except StartupError:
            _Bound([], control).abandon()
            raise
        bound = _Bound(per_worker, control, no_control)
    if config.metrics_listen is not None and bound.metrics is None:
        try:
            bound.metrics = open_metrics_socket(config.metrics_listen)
        except MetricsEndpointError as exc:
            bound.abandon()
            raise StartupError(str(exc)) from None
    return bound


def _control_socket(
    path: str, *, explicit: bool
) -> tuple[tuple[socket.socket, str] | None, str | None]:
    """The supervisor's control socket, or why there is none: without `--control`, a default
    path this user cannot use (not root: /run/tproxy) means none, said once serving (a notice);
    with `--control`, that is an error.

    Raises:
        ControlError: another tproxy answers at `path`, or `--control PATH` cannot be used.
    """
    try:
        return (open_control_socket(path), path), None
    except ControlError as exc:
        if explicit or "another tproxy" in str(exc):
            raise
        return None, f"no control socket ({exc}): give --control PATH for one"


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
                    exclude=tuple(args.exclude),
                    block_quic=args.block_quic,
                )
            except RulesError as exc:
                sys.stderr.write(f"tproxy rules apply: error: {exc}\n")
                return 2
            if args.dry_run:
                lines = plan_rules(spec)
            else:
                lines = apply_rules(spec)
                findings = sysctl_findings(settings_of(spec), ipv6=spec.ipv6)
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


def run_to_the_end(loop: asyncio.AbstractEventLoop, main: Coroutine[Any, Any, None]) -> None:
    """Run `main` on `loop`, then cancel what is left and close the loop -- like
    `asyncio.run`, but waiting at most `TASKS_STOP_TIMEOUT_S` for the leftovers: a task that
    swallows its cancellation (an addon's hook) must not keep the process from exiting."""
    try:
        loop.run_until_complete(main)
        left = asyncio.all_tasks(loop)
        for task in left:
            task.cancel()
        if left:
            loop.run_until_complete(asyncio.wait(left, timeout=TASKS_STOP_TIMEOUT_S))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())  # a reload or prune in flight
    finally:
        loop.close()


def _ip(text: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _policy(args: argparse.Namespace) -> int:
    try:
        policy = read_policy(args.file)
    except ConfigError as exc:
        sys.stderr.write(f"tproxy policy {args.action}: error: {exc}\n")
        return 2
    if args.action == "check":
        count = len(policy.rules)
        print(f"{count} rule{'' if count == 1 else 's'}, default {policy.default.value}")
        return 0
    print("\n".join(explain_lines(policy, args)))
    return 0


def _addon(args: argparse.Namespace) -> int:
    try:
        addons = load_addons(args.files).addons
    except ConfigError as exc:
        sys.stderr.write(f"tproxy addon {args.action}: error: {exc}\n")
        return 2
    print("\n".join(addon_line(addon) for addon in addons))
    return 0


_BYTE_HOOKS = frozenset({"client_data", "server_data", "client_eof", "server_eof"})


def addon_line(addon: Addon) -> str:
    """What `tproxy addon check` says of one addon: its hooks (async ones marked), and sniff;
    and that its byte hooks never run when it has no `session_start` to claim sessions."""
    hooks = ", ".join(hook.name + (" (async)" if hook.is_async else "") for hook in addon.hooks)
    line = f"{addon.name}: {hooks or 'no hooks of its own'}"
    if addon.sniff:
        line += "; sniff = True: sessions wait for their first bytes"
    names = {hook.name for hook in addon.hooks}
    if "session_start" not in names and names & _BYTE_HOOKS:
        line += "; its byte hooks never run: only a session_start can claim() sessions"
    return line


def explain_lines(policy: Policy, args: argparse.Namespace) -> list[str]:
    """What `tproxy policy explain` prints for its arguments."""
    sniffed = None
    if args.sni is not None or args.host is not None or args.proto is not None:
        proto = args.proto or ("tls" if args.sni is not None else "http")
        sniffed = SniffedFacts(proto, args.sni, args.host)
    facts = SessionFacts(args.client, args.dst.ip, args.dst.port, sniffed)
    verdict, why = trace(policy, facts)
    lines = [_verdict_line(verdict)]
    lines += [f"  {line}" for line in why]
    if verdict.need_facts:
        silent, why_silent = trace(policy, SessionFacts(args.client, args.dst.ip, args.dst.port,
                                                        SniffedFacts("silent")))  # fmt: skip
        lines.append(f"if the client sends nothing within {policy.sniff_timeout_s:g} s: "
                     + _verdict_line(silent))  # fmt: skip
        lines += [f"  {line}" for line in why_silent]
    return lines


def _verdict_line(verdict: Verdict) -> str:
    if verdict.need_facts:
        return (f"waits for the client's first bytes (rule {verdict.waiting_for!r} needs "
                "sniffed facts; give --sni, --host or --proto)")  # fmt: skip
    assert verdict.action is not None
    line = verdict.action.value
    if verdict.to is not None:
        line += f" to {verdict.to}"
    if verdict.via is not None:
        line += f" {verdict.via}" + (
            " asking it for the sniffed name" if verdict.remote_name else ""
        )
    if verdict.capture:
        line += ", captured (with --capture-dir)"
    if verdict.intercepts:
        line += ", TLS intercepted (with --ca)"
        if not verdict.upstream_verify:
            line += ", upstream certificate NOT verified"
        if verdict.passthrough_on_client_reject:
            line += ", passed through for a while after a client rejects our certificate"
    elif verdict.tls is not None:
        line += f", TLS {verdict.tls.value}"
    if verdict.rule is None:
        return f"{line} (the default: no rule matches)"
    return f"{line} (rule {verdict.rule!r})"


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
        max_connections=args.max_connections,
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
                "max_connections": expected.max_connections,
            },
            # What the installed rules exempt and block (empty and false without rules).
            "installed": {
                "exclude": [str(n) for n in installed.exclude],
                "block_quic": installed.block_quic,
            },
            "checks": [f.as_json() for f in findings],
        }
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(render_text(findings)))
    return 0 if ok else 1


def _ca(args: argparse.Namespace) -> int:
    if args.action == "create":
        try:
            create_ca(args.dir, force=args.force)
        except CAError as exc:
            return _fail(str(exc))
        print(f"created {Path(args.dir) / CERT_FILE} and {Path(args.dir) / KEY_FILE} (mode 0600)")
    try:
        cert = read_ca_cert(args.dir)
    except CAError as exc:
        return _fail(str(exc))
    try:
        load_ca(args.dir)
        problem = None
    except CAError as exc:
        problem = str(exc)
    print("\n".join(ca_lines(cert, Path(args.dir), problem, datetime.now(UTC))))
    return 0 if problem is None else 1


def ca_lines(
    cert: x509.Certificate, directory: Path, problem: str | None, now: datetime
) -> list[str]:
    """What `tproxy ca show` prints: the certificate's facts, how to install it, and whether
    `tproxy run --ca` can use the CA (`problem`: why not)."""
    crt = shlex.quote(str((directory / CERT_FILE).absolute()))
    subject = ", ".join(f"{a.rfc4514_attribute_name}={a.value!s}" for a in cert.subject)
    fingerprint = cert.fingerprint(hashes.SHA256()).hex(":").upper()
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    left = (end - now).days
    return [
        f"subject:     {subject}",
        f"sha256:      {fingerprint}",
        f"valid:       {start:%Y-%m-%d %H:%M} UTC to {end:%Y-%m-%d %H:%M} UTC "
        + (f"({left} days left)" if now <= end else "(expired)"),
        f"certificate: {crt} (give clients this file, never {KEY_FILE})",
        "install it on each client whose TLS tproxy may intercept:",
        f"  Debian/Ubuntu: sudo cp {crt} /usr/local/share/ca-certificates/tproxy-ca.crt && "
        "sudo update-ca-certificates",
        "  Firefox: Settings > Privacy & Security > Certificates > View Certificates > "
        f"Authorities > Import {crt}, tick 'Trust this CA to identify websites'",
        f"  Android: copy {crt} to the device, then Settings > Security > Encryption & "
        "credentials > Install a certificate > CA certificate (apps trust user CAs only if "
        "they opt in)",
        f"  Windows: certutil -addstore -f Root {crt} (in an administrator's prompt)",
        "  macOS: sudo security add-trusted-cert -d -r trustRoot -k "
        f"/Library/Keychains/System.keychain {crt}",
        f"usable by 'tproxy run --ca': {'yes' if problem is None else 'no: ' + problem}",
    ]


def _lab(args: argparse.Namespace) -> int:
    demo = run_intercept_demo if args.intercept else run_demo
    try:
        return demo(keep_going=args.keep_going, bridge=args.bridge)
    except LabError as exc:
        return _fail(str(exc))
