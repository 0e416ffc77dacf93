"""Set up and tear down each mode in the router namespace: routing, HAProxy, tproxy, mitmproxy.

Every proxy gets the same number of threads or workers, set explicitly: one per CPU this process
may run on (`os.sched_getaffinity(0)`), HAProxy's `nbthread` and tproxy's `--workers` alike
(mitmproxy has no such setting: it runs one event loop, in one process).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.mitm import render_mitmdump_argv, render_mitmproxy_ca
from bench.policy import render_policy
from bench.report import Relays
from tproxy.lab.services import wait_listening
from tproxy.lab.topology import Lab, stop_process, wait_until

PROXY_PORT = 1800
ADDONS_DIR = Path(__file__).parent / "addons"

# The interception modes' server name: the web server's certificate is for it, wrk and curl ask
# for it (SNI and Host), and the policy intercepts `*.bench.test`.
TLS_NAME = "www.bench.test"

# Idle sessions held through HAProxy for the RSS test. Under the 20,000-descriptor hard limit
# HAProxy 2.6 sets its own maxconn to 7,988 with splice (2 descriptors per session, plus
# `maxpipes` = maxconn / 4 pipes of 2 reserved): beyond that, connections wait in the listen
# backlog until HAProxy's 120 s timeouts close older sessions, so holding 9,000 stalled every
# round for two minutes and measured fewer live sessions than it divided by.
HAPROXY_IDLE_SESSIONS = 7500

# The tests, grouped: iperf3 one and four streams each way (with the proxy's CPU per GiB),
# new connections/s (with the proxy's CPU per connection), keep-alive latency, RSS per idle
# session; STREAM1 is the one-stream half of BULK alone (each way, with the CPU per GiB).
BULK, CONN_RATE, LATENCY, IDLE_RSS = "bulk", "conn_rate", "latency", "idle_rss"
STREAM1 = "stream1"
# HTTPS to nginx through the proxy (issue 13): new connections/s with `Connection: close` (with
# the proxy's CPU per connection), and requests/s on keep-alive connections (with its CPU per
# request).
TLS_CONN_RATE, TLS_KEEPALIVE = "tls_conn_rate", "tls_keepalive"


@dataclass(frozen=True)
class ModeSpec:
    proxy: str  # "routing", "haproxy", "tproxy" or "mitmproxy"
    tests: frozenset[str]
    splice: str = ""  # HAProxy: "forced" or "auto"; tproxy: its --relay
    log: bool = False  # the session log written to a file (else none, or /dev/null for tproxy)
    policy: bool = False  # tproxy: `--policy` with bench/policy.py's 50 rules
    # tproxy: "all" for `--capture-all`, "rules" for the policy's redirect rules capturing
    # (which no benchmark connection matches); either way `--capture-dir` and no size limit.
    capture: str = ""
    # tproxy: `--addon` of bench/addons/NAME.py ("unclaimed": claims nothing; "identity": claims
    # every session and passes its bytes on unchanged)
    addon: str = ""
    # tproxy: `--policy` with one rule on `sni = ["*.bench.test"]` that says this `tls`
    # ("intercept": with `--ca` and `--upstream-ca`; "passthrough": relayed encrypted)
    tls: str = ""


_ALL = frozenset({BULK, CONN_RATE, LATENCY, IDLE_RSS})

_TLS = frozenset({TLS_CONN_RATE, TLS_KEEPALIVE})

# Logging costs per connection, not per byte: a bulk test opens one connection and the latency
# test four, so only the connection-rate test is run both with and without logs. splice-auto
# decides per transfer whether to splice; it is measured where transfers are small (connection
# rate and latency), while bulk transfers compare against forced splice, HAProxy's best there.
SPECS: dict[str, ModeSpec] = {
    "routing": ModeSpec("routing", frozenset({BULK, CONN_RATE, LATENCY})),
    "haproxy": ModeSpec("haproxy", _ALL, "forced", log=True),
    "haproxy-auto": ModeSpec("haproxy", frozenset({CONN_RATE, LATENCY}), "auto", log=True),
    "haproxy-nolog": ModeSpec("haproxy", frozenset({CONN_RATE}), "forced"),
    "haproxy-auto-nolog": ModeSpec("haproxy", frozenset({CONN_RATE}), "auto"),
    "tproxy-splice": ModeSpec("tproxy", _ALL, "splice", log=True),
    # tproxy-splice plus a 50-rule policy that sniffs every connection: only what issue 10's
    # rows compare with tproxy-splice (CPU per connection, one long stream each way).
    "tproxy-policy": ModeSpec(
        "tproxy", frozenset({STREAM1, CONN_RATE}), "splice", log=True, policy=True
    ),
    # Issue 11: every session captured (one long stream each way, against tproxy-copy), and
    # tproxy-policy with capture configured on rules that match no connection.
    "tproxy-capture": ModeSpec("tproxy", frozenset({STREAM1}), "splice", log=True, capture="all"),
    "tproxy-policy-capture": ModeSpec(
        "tproxy", frozenset({CONN_RATE}), "splice", log=True, policy=True, capture="rules"
    ),
    # Issue 12: an addon that claims nothing (CPU per connection against tproxy-splice, and one
    # long stream each way that must still splice), and one that claims every session and
    # passes its bytes on unchanged (one long stream each way, against tproxy-copy).
    "tproxy-addon": ModeSpec(
        "tproxy", frozenset({STREAM1, CONN_RATE}), "splice", log=True, addon="unclaimed"
    ),
    "tproxy-addon-identity": ModeSpec(
        "tproxy", frozenset({STREAM1}), "splice", log=True, addon="identity"
    ),
    "tproxy-splice-nolog": ModeSpec("tproxy", frozenset({CONN_RATE}), "splice"),
    "tproxy-copy": ModeSpec("tproxy", frozenset({BULK, CONN_RATE, LATENCY}), "copy", log=True),
    # Issue 13: HTTPS intercepted by tproxy (its own CA, the server's certificate verified), the
    # same HTTPS relayed encrypted under the same rule with `tls = "passthrough"` (what
    # interception adds, per connection and per request), and mitmproxy intercepting it in
    # transparent mode behind tproxy's own rules in REDIRECT mode, with the same CA and the same
    # upstream CA. mitmproxy writes no log (`-q`), which favours it.
    "tproxy-intercept": ModeSpec("tproxy", _TLS, "splice", log=True, tls="intercept"),
    "tproxy-tls-passthrough": ModeSpec("tproxy", _TLS, "splice", log=True, tls="passthrough"),
    "mitmproxy": ModeSpec("mitmproxy", _TLS, tls="intercept"),
}


def cpus() -> int:
    """The CPUs this process may run on: each proxy gets one thread or worker per CPU."""
    return len(os.sched_getaffinity(0))


def render_haproxy_cfg(threads: int, splice: str, log: bool, port: int = PROXY_PORT) -> str:
    """HAProxy 2.6 in transparent mode; with `log`, `option tcplog` lines go to stdout (`-db`
    keeps it in the foreground; the caller points stdout at a file: no syslog daemon needed)."""
    splice_options = (
        ["option splice-auto"] if splice == "auto"
        else ["option splice-request", "option splice-response"]
    )  # fmt: skip
    lines = [
        "global",
        f"    nbthread {threads}",
        "    tune.pipesize 1048576",
        *(["    log stdout format raw local0"] if log else []),
        "defaults",
        "    mode tcp",
        *(["    log global", "    option tcplog"] if log else []),
        "    timeout connect 5s",
        "    timeout client 120s",
        "    timeout server 120s",
        *(f"    {option}" for option in splice_options),
        "frontend transparent",
        f"    bind 0.0.0.0:{port} transparent",
        f"    bind :::{port} transparent v6only",
        "    default_backend original_destination",
        "backend original_destination",
        "    source 0.0.0.0 usesrc clientip",
        "    server original 0.0.0.0:0",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Interception:
    """What the interception modes share in a run: one CA (`tproxy ca create`: `ca.crt`,
    `ca.key`) for tproxy and mitmproxy alike, the web server's self-signed certificate (both
    proxies verify the upstream against it), and mitmproxy's `mitmdump` (None without the
    mitmproxy mode)."""

    ca_dir: Path
    upstream_ca: Path
    mitmdump: Path | None = None


def render_tls_policy(tls: str) -> str:
    """The policy of the interception modes: HTTPS to `*.bench.test` gets `tls` ("intercept"
    or "passthrough"); nothing else is matched (default allow)."""
    return f"""[[rule]]
name = "bench-https"
sni = ["*.bench.test"]
action = "allow"
tls = "{tls}"
"""


def render_tproxy_argv(
    spec: ModeSpec,
    workers: int,
    policy: Path | None = None,
    captures: Path | None = None,
    interception: Interception | None = None,
) -> list[str]:
    """The command line of a tproxy mode: `policy` is its policy file (with `spec.policy` or
    `spec.tls`), `captures` its capture directory (with `spec.capture`), `interception` its CA
    and upstream CA (with `spec.tls == "intercept"`)."""
    argv = [sys.executable, "-m", "tproxy", "run", "--log-format", "json", "--spoof-source",
            "--relay", spec.splice, "--workers", str(workers)]  # fmt: skip
    if spec.policy or spec.tls:
        assert policy is not None
        argv += ["--policy", str(policy)]
    if spec.tls == "intercept":
        assert interception is not None
        argv += ["--ca", str(interception.ca_dir), "--upstream-ca", str(interception.upstream_ca)]
    if spec.capture:
        assert captures is not None
        argv += ["--capture-dir", str(captures), "--capture-max-bytes", "1T"]
        if spec.capture == "all":
            argv.append("--capture-all")
    if spec.addon:
        argv += ["--addon", str(addon_path(spec.addon))]
    return argv


class Mode:
    """A running mode: `pids()` are the processes whose CPU and memory count as the proxy's."""

    def __init__(
        self, lab: Lab, name: str, threads: int, interception: Interception | None = None
    ) -> None:
        self.lab = lab
        self.name = name
        self.spec = SPECS[name]
        self.threads = threads
        self.interception = interception
        self.log_path: Path | None = None
        self._tproxy: subprocess.Popen[Any] | None = None
        self._haproxy: subprocess.Popen[Any] | None = None
        self._mitmdump: subprocess.Popen[Any] | None = None
        self._captures: Path | None = None

    def start(self) -> None:
        if self.spec.proxy == "routing":
            return
        workdir = Path(tempfile.mkdtemp(prefix=f"tproxy-bench-{self.name}-"))
        self.lab.cleanup_paths.append(workdir)
        if self.spec.log:
            self.log_path = workdir / "sessions.log"
        if self.spec.proxy == "haproxy":
            cfg = workdir / "haproxy.cfg"
            cfg.write_text(render_haproxy_cfg(self.threads, self.spec.splice, self.spec.log))
            argv = ["haproxy", "-db", "-f", str(cfg)]
            if self.log_path is None:
                self._haproxy = self.lab.start(self.lab.router, argv)
            else:
                with self.log_path.open("wb") as out:
                    self._haproxy = self.lab.start(self.lab.router, argv, stdout=out)
            wait_listening(self.lab, self.lab.router, PROXY_PORT, "haproxy")
            return
        if self.spec.proxy == "mitmproxy":
            self._start_mitmdump(workdir)
            return
        # The session log goes to a file, as in a deployment: a reader parsing it in the
        # benchmark's own process would compete with the proxy for the same cores. tproxy cannot
        # turn its session log off, so "no log" sends it to /dev/null: the lines are still
        # rendered and written, only the file system's part of the cost is gone.
        policy = None
        if self.spec.policy:
            policy = workdir / "policy.toml"
            policy.write_text(render_policy(capture=self.spec.capture == "rules"))
        elif self.spec.tls:
            policy = workdir / "policy.toml"
            policy.write_text(render_tls_policy(self.spec.tls))
        if self.spec.capture:
            self._captures = workdir / "captures"
            self._captures.mkdir(mode=0o700)
        argv = render_tproxy_argv(
            self.spec, self.threads, policy, self._captures, self.interception
        )
        if self.log_path is None:
            self._tproxy = self.lab.start(self.lab.router, argv)
            pid = self._tproxy.pid
            wait_until(lambda: _workers_waiting(pid, self.threads), 10, "the workers to listen")
        else:
            log = self.log_path
            with log.open("wb") as out:
                self._tproxy = self.lab.start(self.lab.router, argv, stdout=out)
            wait_until(lambda: log.read_text().count('"event":"listening"') >= self.threads, 10,
                       "the workers to listen")  # fmt: skip

    def _start_mitmdump(self, workdir: Path) -> None:
        """mitmdump in transparent mode on the proxy port, its configuration directory holding
        the run's CA (the caller applied tproxy's rules in REDIRECT mode)."""
        assert self.interception is not None and self.interception.mitmdump is not None
        confdir = workdir / "mitmproxy"
        confdir.mkdir(mode=0o700)
        ca = self.interception.ca_dir
        pem = confdir / "mitmproxy-ca.pem"
        pem.touch(mode=0o600)
        pem.write_bytes(render_mitmproxy_ca((ca / "ca.key").read_bytes(),
                                            (ca / "ca.crt").read_bytes()))  # fmt: skip
        argv = render_mitmdump_argv(
            self.interception.mitmdump, confdir, self.interception.upstream_ca, PROXY_PORT
        )
        with (workdir / "mitmdump.out").open("wb") as out:
            self._mitmdump = self.lab.start(self.lab.router, argv, stdout=out, stderr=out)
        # Importing mitmproxy takes a few seconds on this machine.
        wait_listening(self.lab, self.lab.router, PROXY_PORT, "mitmdump", timeout_s=30)

    def log_lines(self) -> int:
        """Lines in the session log so far (0 without one): proof that the proxy logged."""
        if self.log_path is None:
            return 0
        with self.log_path.open("rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))

    def relays(self) -> Relays:
        """What the session log's close events say carried the sessions so far (nothing
        without a log): proof that an addon's sessions stayed on splice, or went through it."""
        found = Relays()
        if self.log_path is None:
            return found
        with self.log_path.open("rb") as f:
            for line in f:
                if b'"event":"session_close"' in line:
                    found.add(json.loads(line))
        return found

    def pids(self) -> list[int]:
        if self._haproxy is not None:
            return [self._haproxy.pid]
        if self._tproxy is not None:
            return [self._tproxy.pid, *children(self._tproxy.pid)]
        if self._mitmdump is not None:  # one process (`ip netns exec` execs it): any children
            return [self._mitmdump.pid, *children(self._mitmdump.pid)]
        return []

    def stop(self) -> None:
        if self._haproxy is not None:
            stop_process(self._haproxy)
            self.lab.forget(self._haproxy)
            self._haproxy = None
        if self._tproxy is not None:
            stop_process(self._tproxy, timeout_s=40)
            self.lab.forget(self._tproxy)
            self._tproxy = None
        if self._mitmdump is not None:
            stop_process(self._mitmdump)
            self.lab.forget(self._mitmdump)
            self._mitmdump = None
        if self._captures is not None:  # gigabytes each round: give the disk back at once
            shutil.rmtree(self._captures, ignore_errors=True)
            self._captures = None

    def captured_bytes(self) -> int:
        """What the capture files hold so far (0 without captures): proof that it captured."""
        if self._captures is None:
            return 0
        return sum(p.stat().st_size for p in self._captures.iterdir())


def addon_path(name: str) -> Path:
    """The file of a mode's `addon` (bench/addons/NAME.py)."""
    return ADDONS_DIR / f"{name}.py"


def _workers_waiting(pid: int, workers: int) -> bool:
    """Without a log to read: every worker forked and blocked in epoll_wait (its loop is up).
    One worker runs in the supervisor's place, without children."""
    found = children(pid) if workers > 1 else [pid]
    if len(found) < workers:
        return False
    for child in found:
        try:
            if "epoll" not in Path(f"/proc/{child}/wchan").read_text():
                return False
        except OSError:
            return False
    return True


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes so far (from /proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / _CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


_CLK_TCK = float(
    subprocess.run(["getconf", "CLK_TCK"], capture_output=True, text=True, check=True).stdout
)
