"""The namespace lab: three network namespaces wired as client ── router ── server.

    client ns                    router ns (tproxy runs here)                server ns
    198.18.1.2/24   ── veth ──   198.18.1.1/24 | 198.18.2.1/24   ── veth ──   198.18.2.2/24
    2001:db8:1::2/64             2001:db8:1::1 | 2001:db8:2::1                2001:db8:2::2/64

or, with `Lab(bridge=True)`, as one subnet with a Linux bridge in the middle namespace (which
keeps the "router" role: it is where tproxy runs), the bridge holding a management address:

    client ns                    bridge ns: br0 = to-client + to-server      server ns
    198.18.3.2/24   ── veth ──   br0 198.18.3.1/24, 2001:db8:3::1/64 ── veth ── 198.18.3.3/24
    2001:db8:3::2/64                                                         2001:db8:3::3/64

Only addresses from the benchmarking range (198.18.0.0/15) and the documentation prefix
(2001:db8::/32) are used, and no route leads anywhere else. Names carry a random id so parallel
runs never collide; `Lab` is a context manager that always tears everything down (processes it
started, by PID, then the namespaces), also on errors and Ctrl-C. The demo and the integration
tests use this same class.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tproxy.core.endpoint import Endpoint, IPAddress


class LabError(Exception):
    """The lab could not be built; the message is one sentence for the operator."""


@dataclass(frozen=True)
class Host:
    """One namespace's role, name and addresses (the ones the other hosts reach it by)."""

    role: str
    netns: str
    ipv4: IPAddress
    ipv6: IPAddress

    def endpoint(self, port: int, family: int = 4) -> Endpoint:
        return Endpoint(self.ipv4 if family == 4 else self.ipv6, port)


def _ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


class Lab:
    """Client, router and server namespaces; `with Lab() as lab:` builds, then always destroys."""

    BRIDGE = "br0"

    def __init__(self, run_id: str | None = None, *, bridge: bool = False) -> None:
        self.run_id = run_id or secrets.token_hex(3)
        self.bridged = bridge
        prefix = f"tp{self.run_id}"
        # The router is reached by the client on its client-side addresses.
        middle, client, router, server = (
            ("bridge", ("198.18.3.2", "2001:db8:3::2"), ("198.18.3.1", "2001:db8:3::1"),
             ("198.18.3.3", "2001:db8:3::3"))
            if bridge else
            ("router", ("198.18.1.2", "2001:db8:1::2"), ("198.18.1.1", "2001:db8:1::1"),
             ("198.18.2.2", "2001:db8:2::2"))
        )  # fmt: skip
        self.client = Host("client", f"{prefix}-client", _ip(client[0]), _ip(client[1]))
        self.router = Host("router", f"{prefix}-{middle}", _ip(router[0]), _ip(router[1]))
        self.server = Host("server", f"{prefix}-server", _ip(server[0]), _ip(server[1]))
        self._processes: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self.cleanup_paths: list[Path] = []
        self._cleanups: list[Callable[[], object]] = []

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        try:
            self.build()
        except BaseException:
            self.destroy()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.destroy()

    def build(self) -> None:
        if os.geteuid() != 0:
            raise LabError("the lab builds network namespaces and needs root: run it with sudo")
        for tool in ("ip", "nft"):
            if shutil.which(tool) is None:
                raise LabError(f"'{tool}' was not found: run scripts/bootstrap first")
        for host in (self.client, self.router, self.server):
            self._sh(["ip", "netns", "add", host.netns])
            self._created.append(host.netns)
            self._sh(["ip", "-n", host.netns, "link", "set", "lo", "up"])
            # No duplicate address detection: a tentative link-local address delays neighbour
            # discovery, and with it the first IPv6 connection, by a second.
            for scope in ("all", "default"):
                self.sysctl(host, f"net.ipv6.conf.{scope}.accept_dad", "0")
                # A new namespace may inherit the host's defaults (devconf_inherit_init_net):
                # the lab's reverse-path filtering is the kernel's default, whatever the host's.
                self.sysctl(host, f"net.ipv4.conf.{scope}.rp_filter", "0")
        c, r, s = self.client.netns, self.router.netns, self.server.netns
        # The veth pairs are created inside the router namespace: interface names only have to
        # be unique per namespace, so parallel labs never collide.
        self._sh(["ip", "-n", r, "link", "add", "to-client", "type", "veth",
                  "peer", "name", "eth0", "netns", c])  # fmt: skip
        self._sh(["ip", "-n", r, "link", "add", "to-server", "type", "veth",
                  "peer", "name", "eth0", "netns", s])  # fmt: skip
        if self.bridged:
            self._build_bridge()
        else:
            self._build_routes()

    def _build_routes(self) -> None:
        c, r, s = self.client.netns, self.router.netns, self.server.netns
        addresses = [
            (c, "eth0", "198.18.1.2/24", "2001:db8:1::2/64"),
            (r, "to-client", "198.18.1.1/24", "2001:db8:1::1/64"),
            (r, "to-server", "198.18.2.1/24", "2001:db8:2::1/64"),
            (s, "eth0", "198.18.2.2/24", "2001:db8:2::2/64"),
        ]
        for ns, dev, v4, v6 in addresses:
            self._sh(["ip", "-n", ns, "addr", "add", v4, "dev", dev])
            self._sh(["ip", "-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad"])
            self._sh(["ip", "-n", ns, "link", "set", dev, "up"])
        for ns, gw4, gw6 in (
            (c, "198.18.1.1", "2001:db8:1::1"),
            (s, "198.18.2.1", "2001:db8:2::1"),
        ):
            self._sh(["ip", "-n", ns, "route", "add", "default", "via", gw4])
            self._sh(["ip", "-n", ns, "-6", "route", "add", "default", "via", gw6])
        # Permanent neighbour entries: the first IPv6 packet on a fresh veth otherwise waits ~1 s
        # for neighbour discovery, which would show up as a 1 s connect in every first test.
        links = [(c, "eth0", r, "to-client"), (s, "eth0", r, "to-server")]
        for ns, dev, peer_ns, peer_dev in links:
            self._pin_neighbours(ns, dev, peer_ns, peer_dev)
            self._pin_neighbours(peer_ns, peer_dev, ns, dev)
        self.sysctl(self.router, "net.ipv4.ip_forward", "1")
        self.sysctl(self.router, "net.ipv6.conf.all.forwarding", "1")

    def _build_bridge(self) -> None:
        c, r, s = self.client.netns, self.router.netns, self.server.netns
        br = self.BRIDGE
        self._sh(["ip", "-n", r, "link", "add", br, "type", "bridge"])
        for port in ("to-client", "to-server"):
            self._sh(["ip", "-n", r, "link", "set", port, "master", br])
            self._sh(["ip", "-n", r, "link", "set", port, "up"])
        addresses = [
            (c, "eth0", "198.18.3.2/24", "2001:db8:3::2/64"),
            (r, br, "198.18.3.1/24", "2001:db8:3::1/64"),
            (s, "eth0", "198.18.3.3/24", "2001:db8:3::3/64"),
        ]
        for ns, dev, v4, v6 in addresses:
            self._sh(["ip", "-n", ns, "addr", "add", v4, "dev", dev])
            self._sh(["ip", "-n", ns, "-6", "addr", "add", v6, "dev", dev, "nodad"])
            self._sh(["ip", "-n", ns, "link", "set", dev, "up"])
        # A bridge takes the lowest MAC of its ports unless it has one of its own: pin it, as
        # the README tells bridge users to, so the rules' MAC stays the bridge's.
        mac = json.loads(self._out(["ip", "-j", "-n", r, "link", "show", "dev", br]))[0]["address"]
        self._sh(["ip", "-n", r, "link", "set", br, "address", mac])
        ends = [(c, "eth0"), (r, br), (s, "eth0")]
        for ns, dev in ends:
            for peer_ns, peer_dev in ends:
                if peer_ns != ns:
                    self._pin_neighbours(ns, dev, peer_ns, peer_dev)

    def _pin_neighbours(self, ns: str, dev: str, peer_ns: str, peer_dev: str) -> None:
        """Tell `ns` the MAC address of every address `peer_ns` has on `peer_dev`."""
        link = json.loads(self._out(["ip", "-j", "-n", peer_ns, "link", "show", "dev", peer_dev]))
        addresses = json.loads(
            self._out(["ip", "-j", "-n", peer_ns, "addr", "show", "dev", peer_dev])
        )
        for info in addresses[0]["addr_info"]:
            if info.get("scope") == "link":
                continue
            self._sh(["ip", "-n", ns, "neigh", "replace", info["local"], "lladdr",
                      link[0]["address"], "dev", dev, "nud", "permanent"])  # fmt: skip

    def destroy(self) -> None:
        """Stop every process this lab started (by PID), then delete its namespaces."""
        for cleanup in reversed(self._cleanups):
            cleanup()
        self._cleanups.clear()
        for proc in reversed(self._processes):
            stop_process(proc)
        self._processes.clear()
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._created.clear()
        for path in self.cleanup_paths:
            shutil.rmtree(path, ignore_errors=True)
        self.cleanup_paths.clear()

    def add_client_address(self, ip: IPAddress) -> None:
        """One more address on the client (many clients behind one interface), known to the
        router without address resolution. Routed lab only. An IPv6 address outside the
        client's /64 (another client, as tproxy keys IPv6 clients by /64) gets a host route on
        the router."""
        plen, extra = (64, ["nodad"]) if ip.version == 6 else (24, [])
        c, r = self.client.netns, self.router.netns
        if ip.version == 6 and ip not in ipaddress.ip_network(f"{self.client.ipv6}/64", False):
            plen = 128
            self._sh(["ip", "-n", r, "-6", "route", "replace", f"{ip}/128", "dev", "to-client"])
        self._sh(["ip", "-n", c, "addr", "add", f"{ip}/{plen}", "dev", "eth0", *extra])
        link = json.loads(self._out(["ip", "-j", "-n", c, "link", "show", "dev", "eth0"]))
        self._sh(["ip", "-n", r, "neigh", "replace", str(ip), "lladdr", link[0]["address"],
                  "dev", "to-client", "nud", "permanent"])  # fmt: skip

    # --- running things in a namespace -----------------------------------------------------

    def sysctl(self, host: Host, name: str, value: str) -> None:
        self._sh(["ip", "netns", "exec", host.netns, "sysctl", "-qw", f"{name}={value}"])

    def run(
        self, host: Host, argv: Sequence[str], timeout_s: float = 60, check: bool = True,
        stdin: bytes | None = None,
    ) -> subprocess.CompletedProcess[bytes]:  # fmt: skip
        """Run a command in `host`'s namespace to completion."""
        result = subprocess.run(
            ["ip", "netns", "exec", host.netns, *argv],
            capture_output=True,
            timeout=timeout_s,
            check=False,
            input=stdin,
        )
        if check and result.returncode != 0:
            raise LabError(
                f"{' '.join(argv)} in {host.role} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}"
            )
        return result

    def start(
        self,
        host: Host,
        argv: Sequence[str],
        stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.DEVNULL,
        stdin: int | IO[Any] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running command in `host`'s namespace; `destroy` stops it. It leads a
        process group of its own, so a test can signal that group as a terminal would."""
        proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, *argv],
            stdout=stdout,
            stderr=stderr,
            stdin=stdin,
            start_new_session=True,
        )
        self._processes.append(proc)
        return proc

    def on_destroy(self, cleanup: Callable[[], object]) -> None:
        """Call `cleanup` first thing in `destroy` (before processes are stopped)."""
        self._cleanups.append(cleanup)

    def forget(self, proc: subprocess.Popen[Any]) -> None:
        """The caller stopped `proc` itself."""
        if proc in self._processes:
            self._processes.remove(proc)

    def _sh(self, argv: Sequence[str]) -> None:
        self._out(argv)

    def _out(self, argv: Sequence[str]) -> str:
        result = subprocess.run(list(argv), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise LabError(f"'{' '.join(argv)}' failed: {result.stderr.strip()}")
        return result.stdout


def stop_process(proc: subprocess.Popen[Any], timeout_s: float = 5.0) -> int | None:
    """SIGTERM, wait, then SIGKILL: only ever the process we started, by its PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()
    return proc.returncode


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.02) -> None:
    """Poll `predicate()` until it is true; raise LabError naming `what` at the deadline."""
    deadline_at = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline_at:
            raise LabError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)
