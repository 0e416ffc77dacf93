"""The proxy's configuration: defaults, a TOML file, command-line overrides; validated, no I/O.

`RUN_OPTIONS` is the one table of `tproxy run`'s options (see `core.options`): it drives the
command line, this file format, the overrides' merge and reload. The file (`tproxy run --config
FILE`) uses the long option names with underscores (`render_example_file` writes this example,
and a test keeps it and the README's equal to it):

    mode = "tproxy"
    listen = ["0.0.0.0:1800", "[::]:1800"]
    spoof_source = true
    mark = 2
    connect_timeout = 10
    idle_timeout = 3600
    half_closed_timeout = 60
    drain_timeout = 30
    max_connections = 5000
    max_connections_per_client = 200
    new_connections_per_client = "50/s"
    control = "/run/tproxy/tproxy.sock"
    metrics_listen = "127.0.0.1:9464"
    relay = "splice"
    loop = "uvloop"
    log_format = "json"
    policy = "/etc/tproxy/policy.toml"
    addon = ["/etc/tproxy/addons/log_requests.py"]
    capture_dir = "/var/lib/tproxy/captures"
    capture_all = false
    capture_max_bytes = "16M"
    capture_max_total = "1G"
    capture_max_age = "7d"
    ca = "/etc/tproxy/ca"
    tls_handshake_timeout = 10
    upstream_ca = "/etc/tproxy/upstream-ca.pem"
    keylog = "/var/lib/tproxy/keys.log"

Options given on the command line win over the file; SIGHUP re-reads the file and keeps those
overrides, and applies what it can to the running proxy: `mode`, `listen`, `loop`, `ca`,
`keylog`, `control` and `metrics_listen` change only on restart (`reload_config`).
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from tproxy.core.endpoint import Endpoint, parse_endpoint
from tproxy.core.lifecycle import Timeouts
from tproxy.core.options import (
    BYTES,
    DURATION,
    ENDPOINT,
    ENDPOINTS,
    MARK,
    PATH,
    PATHS,
    POSITIVE_INT,
    RATE,
    SECONDS,
    SWITCH,
    OptionSpec,
    choice,
    option,
    parse_table,
    render_example,
)

# Re-exported: callers catch ConfigError from this module, where the configuration is.
from tproxy.core.options import ConfigError as ConfigError  # noqa: PLC0414

if TYPE_CHECKING:
    from tproxy.addons.loader import Addons
    from tproxy.policy.matcher import Matcher

DEFAULT_PROXY_PORT = 1800
# The mark on every upstream socket. It must differ from the divert mark (0x1 by default) so the
# proxy's own packets never match the policy-routing rule that delivers diverted packets locally.
DEFAULT_PROXY_MARK = 0x2
DEFAULT_DIVERT_MARK = 0x1
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Long-lived quiet connections (SSH, databases) are normal through a router: an hour of silence.
DEFAULT_IDLE_TIMEOUT_S = 3600.0
# One side said FIN and the other went quiet: conntrack gives such flows 60-120 s.
DEFAULT_HALF_CLOSED_TIMEOUT_S = 60.0
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# Per captured session: enough for a page load or an API exchange, small enough that a thousand
# captured sessions fit in a few GiB.
DEFAULT_CAPTURE_MAX_BYTES = 16 << 20
# Each TLS handshake of an intercepted session (with the upstream, then with the client): a slow
# mobile client needs a few round trips of a second or more; a peer that stalls is cut.
DEFAULT_TLS_HANDSHAKE_TIMEOUT_S = 10.0
# Descriptors kept out of the session budget: listeners, stdio, the event loop, the reserve.
RESERVED_DESCRIPTORS = 64


class InterceptMode(enum.Enum):
    """How connections reach the proxy, and so where their original destination comes from.

    TPROXY: the kernel hands the untouched connection to a transparent listener; the original
    destination is the accepted socket's own address, and the proxy may connect upstream from the
    client's address (spoofing). REDIRECT: NAT rewrites the destination to the proxy's port;
    the original destination is asked of conntrack (SO_ORIGINAL_DST), and spoofing is not
    possible (the server's replies to the client's address reach the proxy only through the
    TPROXY rules' socket match and policy routing).
    """

    TPROXY = "tproxy"
    REDIRECT = "redirect"


class RelayKind(enum.Enum):
    """How bytes move: splice (zero-copy, in the kernel) or copy (through Python)."""

    SPLICE = "splice"
    COPY = "copy"


class LoopKind(enum.Enum):
    """The event loop under the engine."""

    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class LogFormat(enum.Enum):
    """The session log's lines: text for people, JSON for machines."""

    TEXT = "text"
    JSON = "json"


def default_listen() -> list[Endpoint]:
    return [
        parse_endpoint(f"0.0.0.0:{DEFAULT_PROXY_PORT}"),
        parse_endpoint(f"[::]:{DEFAULT_PROXY_PORT}"),
    ]


def max_connections_for(nofile_limit: int, per_session: int = 2) -> int:
    """The most sessions `nofile_limit` descriptors can carry: `per_session` each (two sockets;
    three when a session may also hold its capture file), after the reserve."""
    return max(1, (nofile_limit - RESERVED_DESCRIPTORS) // per_session)


@dataclass(frozen=True)
class ProxyConfig:
    """What `tproxy run` does: one field per option of `RUN_OPTIONS` with a file key (same order
    aside), its default the option's default.

    Args:
        mode: TPROXY (the default) or REDIRECT; fixed at start (a reload cannot change it).
        listen: the listening endpoints (transparent in TPROXY mode); fixed at start.
        spoof_source: bind each upstream socket to the client's own IP (the server sees the client).
        mark: the firewall mark on upstream sockets (SO_MARK), so the rules can exempt them.
        connect_timeout_s: how long an upstream connect may take before the client is reset.
        idle_timeout_s: a session with no byte either way for this long is cut (both reset).
        half_closed_timeout_s: a session with one direction finished and no byte for this long
            is cut.
        max_connections: live sessions at most; None means derived from the open-file limit.
        max_connections_per_client: live sessions of one client at most (an IPv4 address, an
            IPv6 /64: `engine.client_limits`); None: no limit.
        new_connections_per_client: new connections per second one client may open (a token
            bucket holding a second's worth); None: no limit.
        drain_timeout_s: on SIGTERM/SIGINT, how long live sessions may take to finish.
        log_format: text for humans, JSON (one object per line) for machines.
        relay: splice (zero-copy, the default) or copy (through Python).
        loop: uvloop (the default) or asyncio's own loop; fixed at start.
        policy: the policy file (`tproxy.policy`); None: every session is allowed.
        matcher: the policy file's contents, compiled (`policy.matcher`); not an option but what
            `policy` names, read (with its host names resolved) whenever the configuration is
            loaded, so that a reload with a broken policy fails as a whole and keeps the old one.
        addon_files: the addon files (`tproxy.addons`), in the order their hooks run; empty:
            no addons.
        addons: the addon files loaded (`addons.loader.Addons`); not an option but what
            `addon_files` names, loaded like `matcher` whenever the configuration is loaded (a
            reload with a broken addon keeps the old configuration, addons and all); None
            without addon files.
        capture_dir: where capture files go (`tproxy.capture`); None: nothing is captured.
        capture_all: capture every session, not only those a policy rule with `capture = true`
            decides.
        capture_max_bytes: a session's capture stops after this many bytes; the session goes
            on uncaptured.
        capture_max_total_bytes: the capture directory's finished files are pruned, oldest
            first, to keep its capture files within this total; None: no limit.
        capture_max_age_s: finished capture files older than this are pruned; None: no limit.
        ca_dir: the TLS interception CA's directory (`tproxy.tls.ca`), checked at start-up;
            None: no CA. Fixed at start. (In progress: nothing uses it yet.)
        tls_handshake_timeout_s: how long each TLS handshake of an intercepted session (with the
            upstream, with the client) may take before the session is reset.
        upstream_ca: a PEM bundle of the CAs that intercepted sessions' upstreams are verified
            against, instead of the system's trust store; checked when loaded.
        keylog: a file the intercepted sessions' secrets are appended to, both legs, in the NSS
            key log format (`tls.contexts.open_keylog`); None: none. Fixed at start.
        control: the control socket's path (`engine.control`); None: the default for this
            network namespace. Fixed at start.
        metrics_listen: where the supervisor serves Prometheus metrics (`/metrics`, summed over
            the workers); None: not served. Fixed at start.
    """

    mode: InterceptMode = InterceptMode.TPROXY
    listen: list[Endpoint] = field(default_factory=default_listen)
    spoof_source: bool = False
    mark: int = DEFAULT_PROXY_MARK
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    half_closed_timeout_s: float = DEFAULT_HALF_CLOSED_TIMEOUT_S
    max_connections: int | None = None
    max_connections_per_client: int | None = None
    new_connections_per_client: float | None = None
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    log_format: LogFormat = LogFormat.TEXT
    relay: RelayKind = RelayKind.SPLICE
    loop: LoopKind = LoopKind.UVLOOP
    policy: str | None = None
    matcher: Matcher | None = field(default=None, compare=False, repr=False)
    addon_files: list[str] = field(default_factory=list)
    addons: Addons | None = field(default=None, compare=False, repr=False)
    capture_dir: str | None = None
    capture_all: bool = False
    capture_max_bytes: int = DEFAULT_CAPTURE_MAX_BYTES
    capture_max_total_bytes: int | None = None
    capture_max_age_s: float | None = None
    ca_dir: str | None = None
    tls_handshake_timeout_s: float = DEFAULT_TLS_HANDSHAKE_TIMEOUT_S
    upstream_ca: str | None = None
    keylog: str | None = None
    control: str | None = None
    metrics_listen: Endpoint | None = None

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(self.idle_timeout_s, self.half_closed_timeout_s)

    @property
    def may_capture(self) -> bool:
        """Whether any session may be captured (and hold a third descriptor, its file)."""
        if self.capture_dir is None:
            return False
        if self.capture_all:
            return True
        return self.matcher is not None and any(r.capture for r in self.matcher.policy.rules)


RUN_OPTIONS: tuple[OptionSpec, ...] = (
    option("config", PATH, file=False, metavar="FILE",
           help="TOML file with any of the options below (names with underscores, e.g. "
           "idle_timeout = 600); options given here win; SIGHUP re-reads it"),
    option("mode", choice(InterceptMode), reloadable=False,
           help="how connections are diverted to the proxy, as set up by 'tproxy rules apply "
           "--mode': tproxy (the default; the original destination is the accepted socket's own "
           "address) or redirect (NAT; the original destination comes from conntrack, and "
           "--spoof-source is not available)"),
    option("listen", ENDPOINTS, metavar="HOST:PORT", reloadable=False,
           help=f"where to listen, repeatable; IPv6 as [addr]:port "
           f"(default: 0.0.0.0:{DEFAULT_PROXY_PORT} and [::]:{DEFAULT_PROXY_PORT})"),
    option("spoof_source", SWITCH, example=True,
           help="connect upstream from the client's own IP address, so the server sees the real "
           "client (the server's replies must route back through this box)"),
    option("mark", MARK, metavar="MARK",
           help=f"firewall mark on upstream connections, so the rules never divert the proxy's "
           f"own traffic; must differ from the divert mark (default: {DEFAULT_PROXY_MARK:#x}; "
           "use the same value as 'tproxy rules apply --mark')"),
    option("connect_timeout_s", SECONDS, metavar="SECONDS",
           help="reset the client if upstream does not answer in time "
           f"(default: {DEFAULT_CONNECT_TIMEOUT_S:g})"),
    option("idle_timeout_s", SECONDS, metavar="SECONDS",
           help="reset both sides of a session that moved no byte either way for this long "
           f"(default: {DEFAULT_IDLE_TIMEOUT_S:g})"),
    option("half_closed_timeout_s", SECONDS, metavar="SECONDS",
           help="reset both sides of a session that is half-closed (one side sent FIN) and "
           f"silent for this long (default: {DEFAULT_HALF_CLOSED_TIMEOUT_S:g})"),
    option("drain_timeout_s", SECONDS, metavar="SECONDS",
           help="on SIGTERM/SIGINT, how long live sessions may take to finish before they are "
           f"reset (default: {DEFAULT_DRAIN_TIMEOUT_S:g})"),
    option("max_connections", POSITIVE_INT, metavar="N", example=5000,
           help="live sessions at most; new connections beyond it are reset at once (default: "
           f"derived from the open-file limit, (limit - {RESERVED_DESCRIPTORS}) / 2)"),
    option("max_connections_per_client", POSITIVE_INT, metavar="N", example=200,
           help="live sessions of one client at most (an IPv4 address, or an IPv6 /64 so that "
           "rotating privacy addresses do not escape it); beyond it its new connections are "
           "reset at once, and a notice names the busiest refused clients (default: none)"),
    option("new_connections_per_client", RATE, metavar="RATE", example=50.0,
           help="new connections one client may open, e.g. 20/s or 600/min (a token bucket "
           "holding one second's worth, at least one); beyond it they are reset at once "
           "(default: none)"),
    option("control", PATH, metavar="PATH", reloadable=False, example="/run/tproxy/tproxy.sock",
           help="the control socket (0600; what --takeover and other tproxy commands talk to), "
           "when a supervisor runs (default: /run/tproxy/tproxy-net<N>.sock, N naming this "
           "network namespace)"),
    option("metrics_listen", ENDPOINT, metavar="HOST:PORT", reloadable=False,
           example="127.0.0.1:9464",
           help="serve Prometheus metrics at http://HOST:PORT/metrics, summed over the workers "
           "(sessions by close reason, action, rule and protocol; bytes; connect time; "
           "refusals; ...); runs a supervisor even with --workers 1 (default: not served)"),
    option("takeover", SWITCH, file=False, reloadable=False,
           help="replace the tproxy running in this network namespace without refusing a "
           "connection: take its listening sockets over its control socket, serve, then let it "
           "drain (its live sessions finish there); same --listen and --workers"),
    option("workers", POSITIVE_INT, file=False, metavar="N", reloadable=False,
           help="worker processes, each client address always served by the same one; "
           "supervised and restarted if they die (default: the number of CPUs; 1 runs without "
           "a supervisor)"),
    option("relay", choice(RelayKind),
           help="splice: zero-copy in the kernel (the default; falls back to copy where splice "
           "does not work); copy: bytes pass through Python"),
    option("loop", choice(LoopKind), reloadable=False,
           help="the event loop: uvloop (the default) or asyncio's own"),
    option("log_format", choice(LogFormat), example=LogFormat.JSON,
           help="session log on stdout: text for humans, json for one object per line "
           "(default: text)"),
    option("policy", PATH, metavar="FILE", example="/etc/tproxy/policy.toml",
           help="policy file (TOML): rules that allow, reset, redirect or send sessions through "
           "an upstream proxy, by address, port, TLS server name or HTTP Host; check it with "
           "'tproxy policy check'; SIGHUP re-reads it (default: allow everything)"),
    option("addon_files", PATHS, key="addon", metavar="FILE",
           example=["/etc/tproxy/addons/log_requests.py"],
           help="an addon: a Python file whose functions named after the hooks see, decide "
           "and change the sessions (see tproxy.addons.api and examples/); "
           "repeatable, run in the order given; check one with 'tproxy addon check'; SIGHUP "
           "re-reads them (default: none)"),
    option("capture_dir", PATH, metavar="DIR", example="/var/lib/tproxy/captures",
           help="write a pcapng file of what was relayed for each captured session (a policy "
           "rule with capture = true, or --capture-all) into DIR, which must exist and be "
           "writable; files are 0600 and hold whatever the client sent (default: no captures)"),
    option("capture_all", SWITCH,
           help="capture every session, not only those a policy rule chooses (needs "
           "--capture-dir)"),
    option("capture_max_bytes", BYTES, metavar="SIZE",
           help="stop capturing a session after this many bytes, e.g. 1M; the session goes on "
           "uncaptured and its close event says where the capture was cut (default: "
           f"{DEFAULT_CAPTURE_MAX_BYTES >> 20}M)"),
    option("capture_max_total_bytes", BYTES, key="capture_max_total", metavar="SIZE",
           example=1 << 30,
           help="keep the capture files in --capture-dir within this total, e.g. 10G, by "
           "deleting the oldest finished ones (default: no limit)"),
    option("capture_max_age_s", DURATION, metavar="DURATION", example=7 * 86400.0,
           help="delete finished capture files older than this: seconds, or 45s, 30m, 12h, 7d "
           "(default: kept for ever)"),
    option("ca_dir", PATH, key="ca", metavar="DIR", reloadable=False, example="/etc/tproxy/ca",
           help="the CA for TLS interception, made by 'tproxy ca create DIR': checked at "
           "start-up; rules with tls = \"intercept\" use it (default: none)"),
    option("tls_handshake_timeout_s", SECONDS, metavar="SECONDS",
           help="reset an intercepted session whose TLS handshake with the upstream or with "
           f"the client takes longer (default: {DEFAULT_TLS_HANDSHAKE_TIMEOUT_S:g})"),
    option("upstream_ca", PATH, metavar="FILE", example="/etc/tproxy/upstream-ca.pem",
           help="verify intercepted sessions' upstreams against the CA certificates in this PEM "
           "file instead of the system's trust store (default: the system's)"),
    option("keylog", PATH, metavar="FILE", reloadable=False, example="/var/lib/tproxy/keys.log",
           help="append intercepted sessions' TLS secrets (both legs) to FILE in the NSS key log "
           "format, so Wireshark can decrypt a capture; created 0600, refused if a symbolic "
           "link or readable by group or others; whoever reads it decrypts those sessions "
           "(default: none)"),
)  # fmt: skip
"""Every `tproxy run` option, in --help's order. The rows with a file key are exactly the
`ProxyConfig` fields (whose defaults are the options' defaults) but `DERIVED_FIELDS`; `config`
and `workers` say how to run, not what the proxy does, and exist on the command line only."""

DERIVED_FIELDS = frozenset({"matcher", "addons"})
"""`ProxyConfig` fields that no option sets: made from what the options name when loading."""

FILE_OPTIONS = tuple(spec for spec in RUN_OPTIONS if spec.file_key is not None)


def parse_config_file(text: str) -> dict[str, Any]:
    """ProxyConfig field values from the TOML text of a config file.

    Raises:
        ConfigError: not TOML, an unknown key, or a value of the wrong kind.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    return parse_table(FILE_OPTIONS, raw)


def render_example_file() -> str:
    """A config file that sets every key, as the module docstring and the README show it."""
    defaults = ProxyConfig()
    return render_example(FILE_OPTIONS, {s.name: getattr(defaults, s.name) for s in FILE_OPTIONS})


def reload_config(running: ProxyConfig, loaded: ProxyConfig) -> tuple[ProxyConfig, list[str]]:
    """What a reload applies: `loaded`, except the options that change only on restart.

    Args:
        running: the configuration in use.
        loaded: the configuration just read (file and command line).

    Returns:
        The configuration to use from now on (the running value of every restart-only option)
        and the file keys of the restart-only options that `loaded` would have changed, in
        --help's order.
    """
    kept = {
        spec.name: getattr(running, spec.name)
        for spec in FILE_OPTIONS
        if not spec.reloadable and getattr(loaded, spec.name) != getattr(running, spec.name)
    }
    names = [spec.file_key for spec in FILE_OPTIONS if spec.name in kept]
    return replace(loaded, **kept), [name for name in names if name is not None]


def restart_only_notice(names: list[str]) -> str | None:
    """The one notice a reload writes about the options it could not apply (None: all applied)."""
    if not names:
        return None
    verb = "changes" if len(names) == 1 else "change"
    return f"reload: {', '.join(names)} {verb} only on restart; kept as is"


def reload_from(
    running: ProxyConfig, load: Callable[[], ProxyConfig] | None
) -> tuple[ProxyConfig | None, list[str]]:
    """What a SIGHUP does, for the supervisor and a worker alike: the configuration to run with
    from now on (None: keep the running one) and the notices that say so, in order.

    `load` re-reads the file with the command line's overrides (raises ConfigError); None when
    there is no file.
    """
    if load is None:
        return None, ["reload: no --config, --policy or --addon file, nothing to reload"]
    try:
        loaded = load()
    except ConfigError as exc:
        return None, [f"reload failed, keeping the running configuration: {exc}"]
    new, restart_only = reload_config(running, loaded)
    try:
        check_interception(new)  # with the CA it keeps (`ca` changes only on restart)
    except ConfigError as exc:
        return None, [f"reload failed, keeping the running configuration: {exc}"]
    notice = restart_only_notice(restart_only)
    return new, [] if notice is None else [notice]


def check_interception(config: ProxyConfig) -> None:
    """Refuse a policy that intercepts TLS, or a key log, without a CA to forge with (pure).

    Run when a configuration is loaded (its policy is loaded after `build_config`) and again on
    a reload, with the CA the running proxy keeps: `ca` changes only on restart, so a reload
    that adds an intercepting rule and the CA together must fail, not intercept without one.

    Raises:
        ConfigError: naming `--keylog` or the first intercepting rule.
    """
    if config.ca_dir is not None:
        return
    if config.keylog is not None:
        raise ConfigError("--keylog (keylog) needs --ca (ca): only intercepted sessions have keys")
    if config.matcher is None:
        return
    names = config.matcher.policy.intercepting_rules
    if names:
        raise ConfigError(
            f'policy rule {names[0]!r} has tls = "intercept", but no --ca (ca) gives the CA '
            "that signs the certificates it forges ('tproxy ca create DIR' makes one)"
        )


def build_config(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> ProxyConfig:
    """Defaults, then the file's values, then the command line's; unknown names are a bug."""
    names = {f.name for f in fields(ProxyConfig)}
    merged = {**file_values, **overrides}
    unknown = set(merged) - names
    if unknown:
        raise AssertionError(f"not ProxyConfig fields: {sorted(unknown)}")
    config = replace(ProxyConfig(), **merged)
    if config.capture_all and config.capture_dir is None:
        raise ConfigError("--capture-all (capture_all) needs --capture-dir (capture_dir)")
    if config.mode is InterceptMode.REDIRECT and config.spoof_source:
        raise ConfigError(
            "--spoof-source (spoof_source) is not available in redirect mode: the server's "
            "replies to the client's address come back to the proxy only with the TPROXY rules "
            "(socket match and policy routing); use --mode tproxy to spoof"
        )
    return config
