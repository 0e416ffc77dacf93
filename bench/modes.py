"""Set up and tear down each mode in the router namespace: routing, HAProxy, tproxy."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import wait_listening
from tproxy.lab.topology import Lab, stop_process

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
        self._proxy: ProxyProcess | None = None
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
        relay = self.name.removeprefix("tproxy-")
        args = ["--spoof-source", "--relay", relay]
        self._proxy = ProxyProcess(self.lab, self.lab.router, args)
        workers = os.cpu_count() or 1
        self._proxy.wait_for(lambda e: e.get("event") == "listening", "the workers", count=workers)

    def pids(self) -> list[int]:
        if self._haproxy is not None:
            return [self._haproxy.pid]
        if self._proxy is not None:
            pid = self._proxy.proc.pid
            return [pid, *children(pid)]
        return []

    def stop(self) -> None:
        if self._haproxy is not None:
            stop_process(self._haproxy)
            self.lab.forget(self._haproxy)
            self._haproxy = None
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None


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
PYTHON = sys.executable
