"""The measurements, each run from the client namespace against the server, whatever the mode."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from bench.modes import TLS_NAME, Mode, cpu_seconds, rss_bytes
from tproxy.lab.topology import Lab, LabError, stop_process

IPERF_PORT = 5201
HTTP_PORT = 80
TLS_PORT = 443
PEER_PORT = 9000
GIB = 1 << 30
HTTPS_SCRIPT = Path(__file__).parent / "https.lua"


def iperf3(lab: Lab, mode: Mode, seconds: float, streams: int, reverse: bool) -> dict[str, float]:
    """Throughput in Gbit/s, and the proxy's CPU seconds and the bytes moved meanwhile."""
    argv = ["iperf3", "-c", str(lab.server.ipv4), "-p", str(IPERF_PORT), "-t", f"{seconds:g}",
            "-P", str(streams), "-J"]  # fmt: skip
    if reverse:
        argv.append("-R")
    cpu_before = cpu_seconds(mode.pids())
    result = lab.run(lab.client, argv, timeout_s=seconds + 30, check=False)
    cpu = cpu_seconds(mode.pids()) - cpu_before
    report = json.loads(result.stdout)
    if "error" in report:
        raise LabError(f"iperf3 failed in {mode.name}: {report['error']}")
    received = report["end"]["sum_received"]
    return {"gbps": received["bits_per_second"] / 1e9, "bytes": received["bytes"], "cpu_s": cpu}


def wrk_url(lab: Lab) -> str:
    """What wrk requests: its Host header is this URL's `host:port` (`198.18.2.2:80`)."""
    return f"http://{lab.server.ipv4}:{HTTP_PORT}/"


def https_url() -> str:
    """What wrk requests over HTTPS: the name is the SNI and the Host header; `bench/https.lua`
    connects it to the server's address."""
    return f"https://{TLS_NAME}/"


def render_wrk_argv(lab: Lab, args: list[str], seconds: float, *, https: bool = False) -> list[str]:
    """wrk's command line: one thread, plain HTTP to the server's address, or HTTPS to
    `TLS_NAME` connected to that address by `bench/https.lua` (`env` passes it on: `ip netns
    exec` keeps the environment)."""
    argv = ["wrk", "-t1", "-d", f"{seconds:g}s", *args]
    if not https:
        return [*argv, wrk_url(lab)]
    return ["env", f"WRK_CONNECT_TO={lab.server.ipv4}", *argv, "-s", str(HTTPS_SCRIPT),
            https_url()]  # fmt: skip


def _wrk(lab: Lab, args: list[str], seconds: float, *, https: bool = False) -> str:
    argv = render_wrk_argv(lab, args, seconds, https=https)
    result = lab.run(lab.client, argv, timeout_s=seconds + 30, check=False)
    out = result.stdout.decode()
    if "Requests/sec" not in out:
        raise LabError(f"wrk failed: {out} {result.stderr.decode()}")
    return out


def parse_wrk(out: str) -> dict[str, float]:
    """wrk's requests/s, the requests it completed, and those with a status other than 2xx or
    3xx plus its socket errors (connect, read, write, timeout), which should all be 0."""
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in ", out).group(1))  # type: ignore[union-attr]
    failed = 0
    if found := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        failed += int(found.group(1))
    if found := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                          r"timeout (\d+)", out):  # fmt: skip
        failed += sum(int(n) for n in found.groups())
    return {"rate": rate, "requests": requests, "failed": failed}


def connection_rate(
    lab: Lab, mode: Mode, seconds: float, connections: int = 32, *, https: bool = False
) -> dict[str, float]:
    """New connections per second: every request on a new connection (Connection: close); and
    the proxy's CPU seconds meanwhile and the requests wrk completed (one per connection)."""
    cpu_before = cpu_seconds(mode.pids())
    out = _wrk(lab, ["-c", str(connections), "-H", "Connection: close"], seconds, https=https)
    cpu = cpu_seconds(mode.pids()) - cpu_before
    errors = re.search(r"Socket errors: .*", out)
    if errors:
        print(f"  wrk: {errors.group(0)}", file=sys.stderr)
    return {**parse_wrk(out), "cpu_s": cpu}


def keepalive_rate(lab: Lab, mode: Mode, seconds: float, connections: int = 32) -> dict[str, float]:
    """HTTPS requests per second on `connections` keep-alive connections (opened once, at the
    start), and the proxy's CPU seconds meanwhile."""
    cpu_before = cpu_seconds(mode.pids())
    out = _wrk(lab, ["-c", str(connections)], seconds, https=True)
    cpu = cpu_seconds(mode.pids()) - cpu_before
    return {**parse_wrk(out), "cpu_s": cpu}


def check_https(lab: Lab, ca: Path) -> None:
    """One HTTPS request the way wrk's go, by curl trusting only `ca`: proof that the proxy
    presented a certificate `ca` issued (our CA when intercepting, the server's own when passing
    through; wrk verifies nothing) and that the server answered. Its leaf is then cached.

    Raises:
        LabError: not a 200 over a certificate `ca` vouches for."""
    argv = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
            "--cacert", str(ca), "--resolve", f"{TLS_NAME}:{TLS_PORT}:{lab.server.ipv4}",
            "--http1.1", https_url()]  # fmt: skip
    done = lab.run(lab.client, argv, timeout_s=20, check=False)
    if done.stdout.decode() != "200":
        raise LabError(f"HTTPS through the proxy failed, trusting {ca}: "
                       f"{done.stdout.decode()} {done.stderr.decode().strip()}")  # fmt: skip


_UNITS = {"us": 1.0, "ms": 1e3, "s": 1e6}


def latency(lab: Lab, seconds: float, connections: int = 4) -> dict[str, float]:
    """Keep-alive request latency percentiles in µs, at a moderate load."""
    out = _wrk(lab, ["-c", str(connections), "--latency"], seconds)
    found = {}
    for pct, value, unit in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", out, re.M):
        found[f"p{pct}"] = float(value) * _UNITS[unit]
    return found


def idle_rss_per_session(lab: Lab, mode: Mode, sessions: int) -> float:
    """User-space RSS per idle session, in KiB: hold `sessions` open and compare."""
    before = rss_bytes(mode.pids())
    argv = [sys.executable, "-m", "tproxy.lab.peers", "hold", str(lab.server.endpoint(PEER_PORT)),
            "--count", str(sessions)]  # fmt: skip
    holder = lab.start(lab.client, argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
    assert holder.stdout is not None
    try:
        line = holder.stdout.readline()
        ready = json.loads(line)["ready"] if line else 0
        if ready < sessions:
            raise LabError(f"only {ready} of {sessions} idle sessions came up in {mode.name}")
        after = rss_bytes(mode.pids())
    finally:
        stop_process(holder)
        lab.forget(holder)
    return (after - before) / sessions / 1024
