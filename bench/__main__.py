"""`python -m bench` (as root): tproxy vs plain routing vs HAProxy (and, intercepting HTTPS, vs
mitmproxy), interleaved, with spreads.

Builds the namespace lab, then for each round runs every mode once, in an order that rotates from
round to round (A B C D, B C D A, ...), so that the machine's noise falls on all of them alike;
report.py pairs the measurements within each round and writes each ratio's spread over the rounds
into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.clients import add_clients, snat
from bench.measure import (
    GIB,
    HTTP_PORT,
    IPERF_PORT,
    PEER_PORT,
    TLS_PORT,
    check_https,
    connection_rate,
    idle_rss_per_session,
    iperf3,
    keepalive_rate,
    latency,
)
from bench.mitm import ensure_mitmdump, mitmproxy_version, venv_dir
from bench.modes import (
    BULK,
    CONN_RATE,
    HAPROXY_IDLE_SESSIONS,
    IDLE_RSS,
    LATENCY,
    SPECS,
    STREAM1,
    TLS_CONN_RATE,
    TLS_KEEPALIVE,
    TLS_NAME,
    Interception,
    Mode,
    cpus,
    render_haproxy_cfg,
    rss_bytes,
)
from bench.pinned import PAIR_SECONDS, PinnedError
from bench.pinned import measure as measure_pinned
from bench.pinned_report import IN_FULL_BENCHMARK, PinnedRun, render_section
from bench.report import (
    ADDON_CONTEXT,
    ADDON_TARGETS,
    CAPTURE_CONTEXT,
    CAPTURE_TARGETS,
    CONTEXT,
    INTERCEPT_CONTEXT,
    INTERCEPT_TARGETS,
    MODES,
    POLICY_TARGETS,
    TARGETS,
    Comparison,
    Relays,
    Verdict,
    render_comparisons,
    render_modes,
    render_relays,
    rotated,
    tally,
)
from tproxy.lab.services import (
    start_iperf_server,
    start_nginx,
    start_peer_server,
    start_tls_nginx,
)
from tproxy.lab.topology import Lab

RESULTS = Path(__file__).parent / "RESULTS.md"
Samples = dict[str, dict[str, list[float]]]


def _tproxy(lab: Lab, *args: str) -> None:
    lab.run(lab.router, [sys.executable, "-m", "tproxy", *args])


def _version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return "not installed"
    return (out.stdout or out.stderr).strip().splitlines()[0]


@dataclass
class Run:
    """What a run collected: the samples, and the conditions it ran under."""

    threads: int
    samples: Samples = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    orders: list[list[str]] = field(default_factory=list)
    load_at_round: list[float] = field(default_factory=list)
    log_lines: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    captured_bytes: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    relays: dict[str, list[Relays]] = field(default_factory=lambda: defaultdict(list))
    # HTTPS requests wrk counted as failed (a status other than 2xx/3xx, socket errors), per
    # round, per interception mode: all 0 in a sound run
    failed_requests: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))


def _interception(lab: Lab, modes: list[str]) -> Interception | None:
    """For the interception modes: nginx with TLS for `TLS_NAME` in the server namespace, one
    CA (`tproxy ca create`) for both proxies, and mitmproxy's own environment if needed."""
    if not any(SPECS[name].tls for name in modes):
        return None
    mitmdump = ensure_mitmdump() if any(SPECS[n].proxy == "mitmproxy" for n in modes) else None
    upstream_ca = start_tls_nginx(lab, lab.server, TLS_PORT, name=TLS_NAME)
    folder = Path(tempfile.mkdtemp(prefix=f"tproxy-bench-{lab.run_id}-ca-"))
    lab.cleanup_paths.append(folder)
    _tproxy(lab, "ca", "create", str(folder / "ca"))
    return Interception(folder / "ca", upstream_ca, mitmdump)


def run(rounds: int, seconds: float, idle_sessions: int, modes: list[str]) -> Run:
    result = Run(threads=cpus())
    if any(SPECS[name].proxy == "mitmproxy" for name in modes):
        ensure_mitmdump()  # before the lab: installing it once takes a while
    with Lab() as lab:
        for host in (lab.client, lab.router):
            lab.sysctl(host, "net.ipv4.ip_local_port_range", "1024 65000")
        lab.sysctl(lab.client, "net.ipv4.tcp_tw_reuse", "1")
        # Set before the first apply so that removing the rules between modes never flips it:
        # a plain routing run after a spoofing run needs it off too.
        lab.sysctl(lab.router, "net.ipv4.ip_early_demux", "0")
        # wrk's connections and the idle sessions come from 64 client addresses in every mode
        # (`bench.clients`): tproxy steers each client to one worker, so one address would load
        # one worker only.
        add_clients(lab)
        snat(lab, True)
        start_nginx(lab, lab.server, HTTP_PORT)
        start_iperf_server(lab, lab.server, IPERF_PORT)
        start_peer_server(lab, lab.server, PEER_PORT)
        interception = _interception(lab, modes)
        ports = f"{HTTP_PORT},{TLS_PORT},{IPERF_PORT},{PEER_PORT}"
        for round_no in range(1, rounds + 1):
            order = rotated(modes, round_no)
            result.orders.append(order)
            result.load_at_round.append(os.getloadavg()[0])
            for name in order:
                print(f"round {round_no}/{rounds}: {name} ({MODES[name]})", flush=True)
                began = time.monotonic()
                if name == "routing":
                    _tproxy(lab, "rules", "remove")
                elif SPECS[name].proxy == "mitmproxy":  # NAT: its transparent mode's way
                    _tproxy(lab, "rules", "apply", "--ports", ports, "--mode", "redirect")
                else:
                    _tproxy(lab, "rules", "apply", "--ports", ports, "--when-down", "pass")
                mode = Mode(lab, name, result.threads, interception)
                mode.start()
                try:
                    failed = _measure_round(lab, mode, seconds, idle_sessions,
                                            result.samples[name])  # fmt: skip
                    if mode.spec.tls:
                        result.failed_requests[name].append(failed)
                    if mode.log_path is not None:
                        result.log_lines[name].append(mode.log_lines())
                    if mode.spec.capture:
                        result.captured_bytes[name].append(mode.captured_bytes())
                finally:
                    mode.stop()
                if mode.log_path is not None and mode.spec.proxy == "tproxy":
                    # Read once stopped: every session closed and logged by then.
                    result.relays[name].append(mode.relays())
                print(f"  ({time.monotonic() - began:.0f} s)", flush=True)
    return result


def _measure_round(
    lab: Lab, mode: Mode, seconds: float, idle_sessions: int, into: dict[str, list[float]]
) -> int:
    """Run the mode's tests into `into`; returns the HTTPS requests that failed (0 without)."""
    tests = mode.spec.tests
    if BULK in tests or STREAM1 in tests:
        cpu_s = moved = 0.0
        runs: tuple[tuple[int, bool, str], ...] = (
            (1, False, "stream1_up"), (1, True, "stream1_down"),
            (4, False, "stream4_up"), (4, True, "stream4_down"))  # fmt: skip
        if BULK not in tests:  # STREAM1: one stream each way only
            runs = runs[:2]
        for streams, reverse, key in runs:
            result = iperf3(lab, mode, seconds, streams, reverse)
            into[key].append(result["gbps"])
            if streams == 1:
                cpu_s += result["cpu_s"]
                moved += result["bytes"]
            print(f"  {key}: {result['gbps']:.2f} Gbit/s", flush=True)
        if mode.spec.proxy != "routing" and moved:
            into["cpu_per_gib"].append(cpu_s / (moved / GIB))
    if CONN_RATE in tests:
        found = connection_rate(lab, mode, seconds)
        into["conn_rate"].append(found["rate"])
        line = f"  conn_rate: {found['rate']:.0f}/s"
        if mode.spec.proxy != "routing" and found["requests"]:
            into["cpu_per_conn"].append(found["cpu_s"] / found["requests"] * 1e6)
            line += f", proxy CPU {into['cpu_per_conn'][-1]:.1f} µs/connection"
        print(line, flush=True)
    if LATENCY in tests:
        lat = latency(lab, seconds)
        for pct in ("p50", "p99"):
            if pct in lat:
                into[f"latency_{pct}"].append(lat[pct])
        print(f"  latency: {lat}", flush=True)
    if IDLE_RSS in tests:
        count = idle_sessions
        if mode.spec.proxy == "haproxy":
            count = min(idle_sessions, HAPROXY_IDLE_SESSIONS)
        rss = idle_rss_per_session(lab, mode, count)
        into["idle_rss"].append(rss)
        print(f"  idle RSS: {rss:.2f} KiB/session at {count}", flush=True)
    return _measure_https(lab, mode, seconds, into) if mode.spec.tls else 0


def _measure_https(lab: Lab, mode: Mode, seconds: float, into: dict[str, list[float]]) -> int:
    """The interception modes' tests, after one request by curl that proves whose certificate
    the client got (it also puts the forged leaf in the proxy's cache)."""
    assert mode.interception is not None
    tests, failed = mode.spec.tests, 0
    intercepting = mode.spec.tls == "intercept"
    check_https(lab, mode.interception.ca_dir / "ca.crt" if intercepting
                else mode.interception.upstream_ca)  # fmt: skip
    if TLS_CONN_RATE in tests:
        found = connection_rate(lab, mode, seconds, https=True)
        into["tls_conn_rate"].append(found["rate"])
        into["tls_cpu_per_conn"].append(found["cpu_s"] / max(found["requests"], 1) * 1e6)
        failed += int(found["failed"])
        print(f"  tls_conn_rate: {found['rate']:.0f}/s, proxy CPU "
              f"{into['tls_cpu_per_conn'][-1]:.0f} µs/connection", flush=True)  # fmt: skip
    if TLS_KEEPALIVE in tests:
        found = keepalive_rate(lab, mode, seconds)
        into["tls_keepalive_rps"].append(found["rate"])
        into["tls_cpu_per_request"].append(found["cpu_s"] / max(found["requests"], 1) * 1e6)
        failed += int(found["failed"])
        print(f"  tls_keepalive: {found['rate']:.0f} requests/s, proxy CPU "
              f"{into['tls_cpu_per_request'][-1]:.1f} µs/request", flush=True)  # fmt: skip
    # The same reading as the idle-memory test's (VmRSS of every process of the proxy), once
    # several thousand sessions have come and gone: what the proxy holds after the tests.
    into["tls_rss"].append(rss_bytes(mode.pids()) / (1 << 20))
    if failed:
        print(f"  {failed} HTTPS requests failed", file=sys.stderr, flush=True)
    return failed


def _tests_of(name: str) -> str:
    spec = SPECS[name]
    names = {BULK: "iperf3 + CPU/GiB", STREAM1: "iperf3 1 stream + CPU/GiB",
             CONN_RATE: "conn/s" if spec.proxy == "routing" else "conn/s + CPU/conn",
             LATENCY: "latency", IDLE_RSS: "idle RSS",
             TLS_CONN_RATE: "HTTPS conn/s + CPU/conn",
             TLS_KEEPALIVE: "HTTPS keep-alive req/s + CPU/request"}  # fmt: skip
    return ", ".join(names[t] for t in names if t in spec.tests)


def _verdicts(samples: Samples, targets: Sequence[Comparison]) -> str:
    """`1 met, 2 MISSED`: how many of `targets` got each verdict."""
    counts = tally(samples, targets)
    return ", ".join(f"{counts[v]} {v.value}" for v in Verdict if counts[v])


def write_results(
    result: Run,
    argv: list[str],
    started: float,
    elapsed_s: float,
    *,
    load: tuple[str, str],
    output: Path = RESULTS,
    pinned: PinnedRun | None = None,
) -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown")  # fmt: skip
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    samples = result.samples
    rounds = len(result.orders)
    summary = _verdicts(samples, TARGETS)
    policy_summary = _verdicts(samples, POLICY_TARGETS)
    capture_summary = _verdicts(samples, CAPTURE_TARGETS)
    addon_summary = _verdicts(samples, ADDON_TARGETS)
    intercept_summary = _verdicts(samples, INTERCEPT_TARGETS)
    mitmproxy = mitmproxy_version(venv_dir() / "bin" / "mitmdump") if "mitmproxy" in samples else ""
    failed = "; ".join(
        f"{name} {', '.join(str(n) for n in counts)}"
        for name, counts in result.failed_requests.items()
    )
    captured = "; ".join(
        f"{name} {', '.join(f'{n / GIB:.2f}' for n in sizes)} GiB"
        for name, sizes in result.captured_bytes.items()
    )
    log_lines = "; ".join(
        f"{name} {', '.join(str(n) for n in lines)}" for name, lines in result.log_lines.items()
    )
    lines = [
        "# Benchmark results",
        "",
        f"Run on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))} in "
        f"{elapsed_s / 60:.1f} min: `{' '.join(argv)}`, {rounds} rounds.",
        "",
        f"Machine: {platform.node()}, Linux {platform.release()}, {os.cpu_count()} × {cpu}, "
        f"{mem_gib:.0f} GiB; this process may run on {result.threads} of them. The load "
        "generators, servers and proxy share these cores, so only ratios within one run mean "
        "anything. Python "
        f"{platform.python_version()}; {_version(['haproxy', '-v'])}; "
        f"{_version(['nginx', '-v'])}; {_version(['iperf3', '--version'])}; "
        f"{_version(['wrk', '--version'])}"
        + (f"; {mitmproxy} (its own environment, `bench/mitm.py`)." if mitmproxy else "."),
        "",
        f"Load on the machine (`uptime`) before: {load[0]}; after: {load[1]}; 1-minute "
        "load average at the start of each round: "
        f"{', '.join(f'{x:.2f}' for x in result.load_at_round)}.",
        "",
        "## Method",
        "",
        "**Threads.** Both proxies get one thread or worker per CPU this process may run on "
        f"(`os.sched_getaffinity(0)`: {result.threads}), set explicitly: HAProxy "
        f"`nbthread {result.threads}`, tproxy `--workers {result.threads}`.",
        "",
        "**Modes**, in the router namespace of the lab (client → router → server, veth pairs); "
        "HAProxy 2.6 in transparent mode (`bind … transparent`, `server 0.0.0.0:0`, `source "
        "0.0.0.0 usesrc clientip`, 1 MiB pipes), tproxy with `--spoof-source`, uvloop:",
        "",
        "| mode | what | tests |",
        "|---|---|---|",
        *(f"| {name} | {MODES[name]} | {_tests_of(name)} |" for name in MODES if name in samples),
        "",
        "**Clients.** wrk's connections (the connection-rate and latency tests) and the idle "
        "sessions come from 64 client addresses in every mode: the client namespace "
        "source-NATs each new connection to the next of them (`bench/clients.py`). tproxy "
        "steers each client address to one worker, and a router serves many clients; from one "
        "address, one tproxy worker would take all the load while HAProxy used every thread.",
        "",
        "**Logging.** With logs, HAProxy writes one `option tcplog` line per connection with "
        "`log stdout format raw local0` (HAProxy 2.6 needs no syslog daemon for that) and `-db`, "
        "stdout redirected to a file; tproxy writes its JSON session log (three lines per "
        "connection, written together once per loop iteration) to a file. Without logs, HAProxy "
        "has no `log` line at all; tproxy cannot turn its session log off, so its lines are "
        "rendered and written to /dev/null: that variant still pays for rendering, which "
        "favours HAProxy. Logging costs per connection, so only the connection-rate test runs "
        "in both variants: a bulk test opens one connection and the latency test four. Session "
        f"log lines written per round: {log_lines or 'none'}.",
        "",
        "**splice-auto** (HAProxy splices only when it expects a large transfer) is measured "
        "next to forced splice (`option splice-request`, `option splice-response`) for the "
        "connection-rate and latency tests, where transfers are small; bulk transfers, CPU per "
        "GiB and idle memory use forced splice, HAProxy's best for them.",
        "",
        "**Order and spread.** Each round runs every mode once, the order rotated by one mode "
        "per round (round 1: " + ", ".join(result.orders[0] if result.orders else []) + "). "
        "A ratio is computed within each round from that round's measurements, and reported as "
        "the median and min-max over the rounds. A target is **met** only when every round's "
        "figure clears it, **MISSED** only when every round's figure falls short, and "
        "**inconclusive** otherwise (always, with a single round: one figure has no spread).",
        "",
        "**Tests**: iperf3 one and four streams each way; wrk `Connection: close`, 32 "
        "connections, against a small nginx response (new connections/s); wrk keep-alive, 4 "
        "connections (latency percentiles); idle sessions held open by the lab's `peers hold` "
        "(RSS of the proxy's processes before and after, divided by the sessions; HAProxy at "
        f"{HAPROXY_IDLE_SESSIONS:,}, below the maxconn of 7,988 it sets itself with splice under "
        "the 20,000-descriptor hard limit); proxy CPU seconds (user+system of its processes) "
        "per GiB during the single-stream runs; proxy CPU per connection: the same CPU seconds "
        "during the connection-rate run divided by the requests wrk completed (one per "
        "connection with `Connection: close`), in µs (from /proc/PID/stat in clock ticks of "
        "10 ms: about 0.5 µs per tick at 20,000 connections).",
        "",
        "**The policy** (`tproxy-policy`, issue 10): tproxy-splice exactly, plus `--policy` "
        "with the 50 rules rendered by `bench/policy.py`: 45 rules on destinations in "
        "198.19.0.0/16 (some also on ports, a third of them lists that include port 80) that "
        "no benchmark connection goes to, `reset` and `redirect` mixed, then 5 `reset` rules "
        "on `sni` or `sni_or_host` globs on every address, default allow: every connection "
        "waits for the client's first bytes (wrk's request head, iperf3's cookie), is "
        "sniffed, matches no name, and is allowed. The matcher remembers its first answer per "
        "client address, destination and port (2,048 at most): the benchmark's 64 clients "
        "going to one server and port hit it after their first connection, which a router's "
        "traffic (many destinations) does less often; a miss costs a few µs more of bit-set "
        "lookups. It runs only what its rows need: the "
        "connection rate with CPU per connection, and iperf3 one stream each way. Its CPU "
        'target is a per-round difference, judged like the others. "Unchanged within the '
        "spread\" for a long stream has no bound of its own and is judged against the run's "
        "noise twice: direction (with no change, each round's tproxy-policy / tproxy-splice "
        f"ratio is as likely above 1.0 as below it; all {rounds} rounds on one side happen by "
        f"chance 1 time in {2 ** max(rounds - 1, 0)}) and size (the median ratio against "
        "tproxy-splice's own round-to-round "
        "spread, its min and max over its median). **Met** when the rounds fall on both sides "
        "of 1.0 and the median lies within that spread, **MISSED** when every round falls on "
        "one side and the median outside it, **inconclusive** otherwise.",
        "",
        "**Captures** (issue 11): `tproxy-capture` is tproxy-splice with `--capture-all "
        "--capture-dir DIR --capture-max-bytes 1T`: every session is relayed through Python and "
        "written, whole, as pcapng into a directory on the machine's disk (through the page "
        "cache; the kernel's writeback threads are not counted as the proxy's CPU); it runs "
        "iperf3 one stream each way, compared with tproxy-copy (the copy relay without "
        "capture). `tproxy-policy-capture` is tproxy-policy with `--capture-dir` and `capture "
        "= true` on its 22 redirect rules, which no benchmark connection matches: capture "
        "configured but not matching, its CPU per connection against tproxy-policy's. Capture "
        f"files written per round (deleted after each): {captured or 'none'}.",
        "",
        "**Addons** (issue 12): `tproxy-addon` is tproxy-splice with `--addon "
        "bench/addons/unclaimed.py`, whose `session_start` returns None and claims nothing and "
        "whose `session_end` does nothing: both hooks run for every session, which still "
        "relays by splice; its CPU per connection against tproxy-splice's, and iperf3 one "
        "stream each way against tproxy-splice. `tproxy-addon-identity` is tproxy-splice with "
        "`--addon bench/addons/identity.py`, which claims every session and returns each chunk "
        "unchanged from `client_data` and `server_data`: every byte goes through Python; iperf3 "
        "one stream each way and CPU per GiB against tproxy-copy (the copy relay without "
        "addons). Which relay carried each mode's sessions is read from its session log's close "
        "events (`relay`, `spliced_bytes`) once each round has stopped the proxy, below.",
        "",
        "**TLS interception** (issue 13): `tproxy-intercept` is tproxy-splice with `--policy` "
        'of one rule, `sni = ["*.bench.test"]` with `tls = "intercept"`, `--ca` of a CA made by '
        "`tproxy ca create` for this run and `--upstream-ca` of the web server's certificate; "
        "`mitmproxy` is mitmproxy's mitmdump (installed by pip into an environment of the "
        "benchmark's own, never the project's) in transparent mode on the same port, behind "
        "tproxy's own rules in REDIRECT mode (`tproxy rules apply --mode redirect`: NAT, the "
        "original destination from conntrack, the upstream connection from the router's "
        "address), with the same CA (its `mitmproxy-ca.pem`: key and certificate) and the same "
        "upstream CA (`ssl_verify_upstream_trusted_ca`), and `-q` (no log: tproxy writes its "
        "session log, so this favours mitmproxy); it runs one event loop in one process, tproxy "
        f"{result.threads} workers. Both forge a leaf per name with one key (tproxy's made at "
        "start, mitmproxy's its CA's) and cache it, so after the first connection a handshake "
        "costs no key generation and no signature on a certificate; each round's first "
        "request, by curl trusting only the CA, proves whose certificate the client got and "
        "fills the cache. `tproxy-tls-passthrough` is the same rule with `tls = "
        '"passthrough"`: the same HTTPS, sniffed and relayed encrypted by splice; intercepting '
        "minus passing through is what interception adds (the two handshakes, the cached leaf, "
        "the relay through TLS). The server is nginx with TLS in the server namespace "
        "(`start_tls_nginx`: a self-signed P-256 certificate for www.bench.test; nginx 1.22 "
        "speaks TLS 1.2 at most, so the upstream leg is TLS 1.2, ECDHE-ECDSA, and the client "
        "leg, wrk's OpenSSL to the proxy, TLS 1.3). wrk requests `https://www.bench.test/`, "
        "which it sends as the SNI and the Host header, and `bench/https.lua` connects it to "
        "the server's address (the lab has no DNS). wrk verifies no certificate, and it "
        "resumes each connection's TLS session on the next one (OpenSSL keeps it across "
        "`SSL_clear`): 99% of its ClientHellos to either proxy offer a TLS 1.3 pre-shared key, "
        "which both accept (checked with `openssl s_client -sess_in` and a capture), so the "
        "client leg is an ECDHE handshake without a certificate or signature, as a returning "
        "client's is; the upstream leg is a full TLS 1.2 handshake on every connection with "
        "either proxy (neither resumes toward the server: a certificate in every upstream "
        "handshake of the capture). Tests: wrk "
        "`Connection: close` over HTTPS, 32 connections (new intercepted connections/s, and the "
        "proxy's CPU over them: µs per connection), and wrk keep-alive over HTTPS, 32 "
        "connections (requests/s, and the proxy's CPU per request), each for the run's "
        "measurement time, the CPU read from /proc as for the other modes; then the RSS of all "
        "the proxy's processes (VmRSS, as the idle-memory test reads it). HTTPS requests wrk "
        f"counted as failed (status or socket errors), per round: {failed or 'none'}.",
        "",
        f"## Targets (issue 4), for the splice relay: {summary}",
        "",
        *render_comparisons(samples, TARGETS),
        "",
        f"## Targets (issue 10), the policy's cost: {policy_summary}",
        "",
        *render_comparisons(samples, POLICY_TARGETS),
        "",
        f"## Targets (issue 11), capture configured but not matching: {capture_summary}",
        "",
        *render_comparisons(samples, CAPTURE_TARGETS),
        "",
        "## Capturing a session, against the copy relay (issue 11, no target)",
        "",
        *render_comparisons(samples, CAPTURE_CONTEXT),
        "",
        f"## Targets (issue 12), an addon that claims nothing: {addon_summary}",
        "",
        *render_comparisons(samples, ADDON_TARGETS),
        "",
        "## Addons: unclaimed against splice, claimed (identity) against copy (issue 12, "
        "no target)",
        "",
        *render_comparisons(samples, ADDON_CONTEXT),
        "",
        f"## Targets (issue 13), TLS interception against mitmproxy: {intercept_summary}",
        "",
        *render_comparisons(samples, INTERCEPT_TARGETS),
        "",
        "## TLS interception: CPU against mitmproxy, and against passing the same HTTPS through "
        "(issue 13, no target)",
        "",
        *render_comparisons(samples, INTERCEPT_CONTEXT),
        "",
        "## Which relay carried the sessions (the session log's close events)",
        "",
        *render_relays(result.relays),
        "",
        *([*render_section(pinned), ""] if pinned is not None else []),
        "## Other comparisons (no target)",
        "",
        *render_comparisons(samples, CONTEXT),
        "",
        "## Each mode: median (min-max over rounds)",
        "",
        *render_modes(samples),
        "",
        "## Every sample, in round order",
        "",
    ]
    for mode, metrics in samples.items():
        for metric, values in metrics.items():
            lines.append(f"- {mode} {metric}: {', '.join(f'{v:.3f}' for v in values)}")
    lines += ["", "## HAProxy's configuration (forced splice, with logs)", "", "```",
              render_haproxy_cfg(result.threads, "forced", log=True).rstrip(), "```"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    output.write_text(text)
    return text


def _uptime() -> str:
    out = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    return f"`{out}`"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("--idle-sessions", type=int, default=10_000)
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help="comma-separated subset of the modes, run in this order in the first round "
        f"(default: all of them: {', '.join(MODES)}); e.g. issue 12's rows alone: "
        "--modes tproxy-splice,tproxy-copy,tproxy-addon,tproxy-addon-identity; issue 13's: "
        "--modes tproxy-intercept,tproxy-tls-passthrough,mitmproxy",
    )
    parser.add_argument(
        "--results",
        type=Path,
        default=RESULTS,
        help="the Markdown file to write (default: bench/RESULTS.md); a focused run or a smoke "
        "run may keep the full run's results by writing elsewhere",
    )
    parser.add_argument("--no-pinned", action="store_true",
                        help="skip the pinned A/B of issues 12, 10 and 15 and its A/A check "
                        "after the rounds (`python -m bench.pinned`, 16-second pairs: "
                        "about 28 min)")  # fmt: skip
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("the benchmark builds network namespaces: run it as root", file=sys.stderr)
        return 1
    modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"unknown modes: {', '.join(unknown)} (known: {', '.join(MODES)})")
    started = time.time()
    load_before = _uptime()
    result = run(args.rounds, args.seconds, args.idle_sessions, modes)
    pinned = None
    if not args.no_pinned:
        try:
            pinned = measure_pinned(8, PAIR_SECONDS, list(IN_FULL_BENCHMARK))
        except PinnedError as exc:
            print(f"pinned A/B: {exc}", file=sys.stderr)
    text = write_results(result, ["python", "-m", "bench", *sys.argv[1:]], started,
                         time.time() - started, load=(load_before, _uptime()),
                         output=args.results, pinned=pinned)  # fmt: skip
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
