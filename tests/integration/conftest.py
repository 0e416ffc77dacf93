"""Fixtures for the integration tests: each test gets its own namespace lab, always torn down.

These tests drive the real kernel path (nftables TPROXY, policy routing, veth pairs) and need
root; without it they skip with that reason. Only 198.18.0.0/15 and 2001:db8::/32 are used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tproxy.core.endpoint import IPAddress
from tproxy.engine.steering import worker_for
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import (
    HTTP_PORT,
    PEER_PORT,
    TLS_NAME,
    TLS_PORT,
    start_nginx,
    start_peer_server,
    start_tls_server,
)
from tproxy.lab.topology import Host, Lab, wait_until

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in this directory needs root: mark it `root` (a conftest's `pytestmark` would
    mark nothing; `-m "not root"` selects the tests an unprivileged user can run)."""
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.root)


NOT_ROOT = os.geteuid() != 0
# Runs a command as root with every capability dropped: what an unprivileged user gets, while the
# files stay readable (the checkout may sit in a directory only root can enter).
WITHOUT_CAPABILITIES = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
ROOT_REASON = "needs root: builds network namespaces and nftables rules (run as root or in CI)"


def _built_lab(*, bridge: bool) -> Iterator[Lab]:
    if NOT_ROOT:
        pytest.skip(ROOT_REASON)
    for tool in ("nft", "ip", "curl", "iperf3", "nginx"):
        if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}"):
            pytest.fail(f"{tool} is not installed: run scripts/bootstrap")
    with Lab(bridge=bridge) as built:
        yield built


@pytest.fixture
def lab() -> Iterator[Lab]:
    """client -- router -- server, each side its own subnet."""
    yield from _built_lab(bridge=False)


@pytest.fixture
def bridge_lab() -> Iterator[Lab]:
    """client -- bridge -- server, one subnet; the bridge (br0) has a management address."""
    yield from _built_lab(bridge=True)


def tproxy_cli(lab: Lab, host: Host, *args: str, check: bool = True) -> str:
    """Run `python -m tproxy ARGS` in a namespace; return its stdout."""
    result = lab.run(host, [sys.executable, "-m", "tproxy", *args], check=check)
    return result.stdout.decode()


def apply_rules(lab: Lab, *args: str) -> None:
    tproxy_cli(lab, lab.router, "rules", "apply", *args)


@pytest.fixture
def served_lab(lab: Lab) -> Lab:
    """The lab with nginx (port 80) and the checksum server (port 9000) running in the server."""
    start_nginx(lab, lab.server, HTTP_PORT)
    start_peer_server(lab, lab.server, PEER_PORT)
    return lab


def start_proxy(lab: Lab, *args: str, default_workers: bool = False) -> ProxyProcess:
    """`tproxy run ARGS` in the router, one process unless ARGS say otherwise (so descriptor
    and memory probes see every session); `default_workers=True` runs what a user gets without
    `--workers` (one worker per CPU, supervised) and waits until every worker listens."""
    own_choice = default_workers or "--workers" in args
    argv = list(args) if own_choice else ["--workers", "1", *args]
    proxy = ProxyProcess(lab, lab.router, argv)
    proxy.wait_listening()
    if default_workers:
        expected = os.cpu_count() or 1
        proxy.wait_for(lambda e: e.get("event") == "listening", "every worker", count=expected)
    return proxy


def client_json(
    lab: Lab, argv: Sequence[str], timeout_s: float = 120, host: Host | None = None
) -> dict[str, Any]:
    """Run a `tproxy.lab.peers` client in the client namespace (or `host`'s); return its JSON
    verdict."""
    result = lab.run(
        host or lab.client, [sys.executable, "-m", "tproxy.lab.peers", *argv], timeout_s,
        check=False,
    )  # fmt: skip
    try:
        parsed: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        pytest.fail(f"peers {argv} printed no verdict: {result.stderr.decode(errors='replace')}")
    return parsed


def curl(lab: Lab, url: str, host: Host | None = None) -> tuple[int, str]:
    """GET `url` from the client (or `host`); return the HTTP status (0 if none) and the body."""
    argv = ["curl", "-sS", "--max-time", "10", "-w", "\n%{http_code}", url]
    result = lab.run(host or lab.client, argv, check=False)
    body, _, status = result.stdout.decode(errors="replace").rpartition("\n")
    return int(status or 0), body


def client_per_worker(lab: Lab, workers: int, family: int = 4) -> dict[int, IPAddress]:
    """One extra client address for each of `workers` workers (by the steering program's own
    arithmetic), by worker, added to the client namespace."""
    chosen: dict[int, IPAddress] = {}
    for i in range(16, 256):
        # (IPv6 clients are steered by /64: one /64 each)
        ip = ipaddress.ip_address(f"198.18.1.{i}" if family == 4 else f"2001:db8:1:{i:x}::2")
        chosen.setdefault(worker_for(ip, workers), ip)
        if len(chosen) == workers:
            break
    for ip in chosen.values():
        lab.add_client_address(ip)
    return chosen


@contextlib.contextmanager
def held_tls_session(lab: Lab) -> Iterator[ProxyProcess]:
    """A TLS session held open through the router (openssl s_client to the lab's TLS server,
    the SNI `TLS_NAME`), with the workers a user gets; yields the proxy once it connected
    upstream, and ends the client however the block ends."""
    start_tls_server(lab, lab.server)
    apply_rules(lab, "--ports", str(TLS_PORT))
    proxy = start_proxy(lab, default_workers=True)
    client = lab.start(
        lab.client,
        ["openssl", "s_client", "-quiet", "-no_ign_eof", "-servername", TLS_NAME,
         "-connect", f"{lab.server.ipv4}:{TLS_PORT}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        wait_until(lambda: bool(proxy.named("upstream_connected")), 10, "the session")
        yield proxy
    finally:
        if client.stdin is not None:
            client.stdin.close()
        client.wait(timeout=10)
