"""Set up and tear down each mode in the router namespace: routing, HAProxy, tproxy."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tproxy.lab.services import wait_listening
from tproxy.lab.topology import Lab, stop_process, wait_until

PROXY_PORT = 1800

HAPROXY_CFG = """\
global
    tune.pipesize 1048576
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
    option splice-request
    option splice-response
frontend transparent
    bind 0.0.0.0:{port} transparent
    bind :::{port} transparent v6only
    default_backend original_destination
backend original_destination
    source 0.0.0.0 usesrc clientip
    server original 0.0.0.0:0
"""


class Mode:
    """A running mode: `pids()` are the processes whose CPU and memory count as the proxy's."""

    def __init__(self, lab: Lab, name: str) -> None:
        self.lab = lab
        self.name = name
        self._tproxy: subprocess.Popen[Any] | None = None
        self._haproxy: subprocess.Popen[Any] | None = None

    def start(self) -> None:
        if self.name == "routing":
            return
        if self.name == "haproxy":
            workdir = Path(tempfile.mkdtemp(prefix="tproxy-bench-haproxy-"))
            self.lab.cleanup_paths.append(workdir)
            cfg = workdir / "haproxy.cfg"
            cfg.write_text(HAPROXY_CFG.format(port=PROXY_PORT))
            self._haproxy = self.lab.start(self.lab.router, ["haproxy", "-db", "-f", str(cfg)])
            wait_listening(self.lab, self.lab.router, PROXY_PORT, "haproxy")
            return
        # The session log goes to a file, as in a deployment: a reader parsing it in the
        # benchmark's own process would compete with the proxy for the same cores.
        relay = self.name.removeprefix("tproxy-")
        workdir = Path(tempfile.mkdtemp(prefix="tproxy-bench-log-"))
        self.lab.cleanup_paths.append(workdir)
        log = workdir / "sessions.jsonl"
        argv = [sys.executable, "-m", "tproxy", "run", "--log-format", "json", "--spoof-source",
                "--relay", relay]  # fmt: skip
        with log.open("wb") as out:
            self._tproxy = self.lab.start(self.lab.router, argv, stdout=out)
        workers = os.cpu_count() or 1
        wait_until(lambda: log.read_text().count('"event":"listening"') >= workers, 10,
                   "the workers to listen")  # fmt: skip

    def pids(self) -> list[int]:
        if self._haproxy is not None:
            return [self._haproxy.pid]
        if self._tproxy is not None:
            return [self._tproxy.pid, *children(self._tproxy.pid)]
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
