"""systemd unit files for a router running tproxy: pure text, made from the options given.

Two units, because the rules and the proxy must live apart:

* `tproxy-rules.service` applies the interception rules (`tproxy rules apply ...`) as a oneshot
  with `RemainAfterExit=yes`: they stay while the proxy restarts, crashes or is stopped, so
  diverted connections keep getting what `--when-down` promises (refused at once by default)
  instead of slipping past uninspected. `systemctl stop tproxy-rules` removes them.
* `tproxy.service` runs the proxy, `Type=notify` (READY=1 once every listener is bound and the
  workers are up; STOPPING=1 while it drains; `STATUS=` says how many sessions are live),
  with a watchdog, reload by `tproxy reload` (SIGHUP's reload, answered once done), as an
  unprivileged user holding only the capabilities it needs (CAP_NET_ADMIN for transparent
  sockets and marks; CAP_NET_BIND_SERVICE when it listens below port 1024), and systemd's
  sandboxing options that still let it work. It `Wants=` the rules (starting it applies them)
  but is not bound to them (stopping it leaves them).

`render_units` makes both; `tproxy service-unit` prints them (or writes them), and the files in
`contrib/systemd/` are these units for the defaults (a test keeps them equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

RULES_UNIT: Final = "tproxy-rules.service"
PROXY_UNIT: Final = "tproxy.service"
DEFAULT_USER: Final = "tproxy"
WATCHDOG_S: Final = 30
"""How long the proxy may go without `WATCHDOG=1` (it sends one every 15 s while every worker
answers its heartbeat) before systemd restarts it."""


@dataclass(frozen=True)
class UnitOptions:
    """What the units say.

    Args:
        command: how to run tproxy (an absolute path, and `-m tproxy` after a Python).
        rules_args: `tproxy rules apply`'s options (`--ports` at least).
        run_args: `tproxy run`'s options.
        user: the user the proxy runs as (None: root, which the unit then says is not advised).
        bind_service: the proxy listens below port 1024 (CAP_NET_BIND_SERVICE).
        writable: paths the proxy writes besides the journal (the capture directory, the key
            log's directory): everything else is read-only to it.
        drain_timeout_s: `--drain-timeout`, for how long systemd waits for a stop.
        readable: paths the proxy reads (its interpreter, configuration, CA, policy, addons):
            one under /home, /root or /run/user makes the unit say `ProtectHome=read-only`.
        reload_args: how `tproxy reload` finds the control socket: `--control PATH` as the
            proxy was given it, or `--config FILE` whose `control` key says; none: the default.
    """

    command: tuple[str, ...]
    rules_args: tuple[str, ...]
    run_args: tuple[str, ...] = ()
    user: str | None = DEFAULT_USER
    bind_service: bool = False
    writable: tuple[str, ...] = field(default=())
    drain_timeout_s: float = 30.0
    readable: tuple[str, ...] = field(default=())
    reload_args: tuple[str, ...] = ()


_HOMES: Final = ("/home", "/root", "/run/user")
"""What `ProtectHome=yes` hides from the service."""


def quote(arg: str, *, command_line: bool = True) -> str:
    """`arg` as one item of a systemd setting (systemd.syntax(7) "Quoting"; not the shell's:
    systemd takes a quote only around a whole item, so shlex.quote's `'a'"'"'b'` is not one,
    and C escapes work inside quotes too). `%` is a specifier there (`%%`); on a command line
    `$` expands a variable, even quoted (`$$`), and a lone `;` separates commands (`\\;`).

    Raises:
        ValueError: a control character (a unit file is lines of text).
    """
    if any(ord(c) < 0x20 or c == "\x7f" for c in arg):
        raise ValueError(f"{arg!r}: a control character cannot be put in a unit file")
    text = arg.replace("%", "%%")
    if command_line:
        text = text.replace("$", "$$")
        if arg == ";":
            return "\\;"
    if arg and not any(c in arg for c in " \t\"'\\"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _exec(options: UnitOptions, *args: str) -> str:
    """A command line as systemd reads it (`quote` for each item; the program itself is never
    expanded)."""
    program, *rest = (*options.command, *args)
    return " ".join((quote(program, command_line=False), *(quote(a) for a in rest)))


def under_homes(path: str) -> bool:
    """Whether `ProtectHome=yes` hides `path`."""
    return any(path == home or path.startswith(home + "/") for home in _HOMES)


def rules_unit(options: UnitOptions) -> str:
    apply = _exec(options, "rules", "apply", *options.rules_args)
    remove = _exec(options, "rules", "remove")
    return f"""\
# tproxy's interception rules: nftables and policy routing (tproxy rules apply).
# A oneshot that stays "active" after applying them: restarting, stopping or a crash of
# tproxy.service leaves them in place, so diverted connections get what --when-down promises.
# `systemctl stop tproxy-rules` removes them.
[Unit]
Description=tproxy interception rules (nftables, policy routing)
Documentation=man:nft(8) man:ip-rule(8)
After=network-pre.target nftables.service
Before=network.target {PROXY_UNIT}
Wants=network-pre.target
# nftables.service flushes the whole ruleset when it stops, restarts or reloads (Debian's
# /etc/nftables.conf starts with `flush ruleset`): apply ours again after it.
PartOf=nftables.service
ReloadPropagatedFrom=nftables.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart={apply}
ExecReload={apply}
ExecStop={remove}

[Install]
WantedBy=multi-user.target
"""


def proxy_unit(options: UnitOptions) -> str:
    caps = "CAP_NET_ADMIN" + (" CAP_NET_BIND_SERVICE" if options.bind_service else "")
    run = _exec(options, "run", *options.run_args)
    if options.user is None:
        who = "# Runs as root (no --user given): consider a user of its own, see the README.\n"
    else:
        who = f"User={options.user}\nGroup={options.user}\n"
    writable = "".join(
        f"ReadWritePaths={quote(path, command_line=False)}\n" for path in options.writable
    )
    paths = (*options.command, *options.readable, *options.writable)
    homes = any(under_homes(path) for path in paths)
    stop_s = int(options.drain_timeout_s) + 15
    reload = _exec(options, "reload", *options.reload_args)
    return f"""\
# tproxy, the transparent proxy: Type=notify (ready once every listener is bound and the
# workers are up), a watchdog that only the workers' heartbeats keep fed, reload with
# `tproxy reload` (configuration, policy and addons, as SIGHUP does, over the control socket:
# it returns once every worker has reloaded, and an invalid file, which keeps the running
# configuration, fails `systemctl reload`).
[Unit]
Description=tproxy transparent TCP proxy
Wants={RULES_UNIT} network-online.target
After={RULES_UNIT} network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={run}
ExecReload={reload}
# SIGTERM drains: live sessions may finish for --drain-timeout, then the rest are reset.
# To the supervisor only (mixed): it passes it on to the workers, and a worker that got a
# second SIGTERM straight from systemd (control-group) would cut every session at once.
KillMode=mixed
KillSignal=SIGTERM
TimeoutStopSec={stop_s}
WatchdogSec={WATCHDOG_S}
Restart=on-failure
RestartSec=1
LimitNOFILE=65536
{who}AmbientCapabilities={caps}
CapabilityBoundingSet={caps}
NoNewPrivileges=yes
ProtectSystem=strict
{writable}ProtectHome={"read-only" if homes else "yes"}
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
SystemCallArchitectures=native
RuntimeDirectory=tproxy
RuntimeDirectoryMode=0750
UMask=0077

[Install]
WantedBy=multi-user.target
"""


def render_units(options: UnitOptions) -> dict[str, str]:
    """Both units, by file name."""
    return {RULES_UNIT: rules_unit(options), PROXY_UNIT: proxy_unit(options)}


def listens_below_1024(listen: Sequence[tuple[str, int]]) -> bool:
    return any(0 < port < 1024 for _, port in listen)
