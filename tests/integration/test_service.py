"""tproxy under systemd's notify protocol on the real path, default workers: a datagram socket
stands in for systemd's (NOTIFY_SOCKET, WATCHDOG_USEC). READY=1 comes once every worker serves
(a connection through the router works then); WATCHDOG=1 comes at the asked rate, stops while a
worker is stopped (SIGSTOP) and resumes when it continues; STOPPING=1 comes on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.conftest import apply_rules, curl, start_proxy
from tests.integration.test_workers import _children
from tproxy.core.worker_protocol import STALL_AFTER_S
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import HTTP_PORT, PEER_PORT, start_nginx, start_peer_server
from tproxy.lab.topology import Lab
from tproxy.service.units import PROXY_UNIT, UnitOptions, render_units

MIB = 1 << 20
WATCHDOG_USEC = 2_000_000  # systemd's WatchdogSec=2: tproxy feeds it every second


def _received(sock: socket.socket, seconds: float) -> list[bytes]:
    """Every datagram that arrives within `seconds`."""
    got = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(4096))
        except TimeoutError:
            break
    return got


def _first(sock: socket.socket, wanted: bytes, seconds: float) -> list[bytes]:
    """The datagrams up to and including the first that holds `wanted`."""
    got = []
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        got.append(sock.recv(4096))
        if wanted in got[-1]:
            return got
    raise AssertionError(f"no {wanted!r} within {seconds} s: {got}")


def _watchdogs(datagrams: list[bytes]) -> int:
    return sum(b"WATCHDOG=1" in d.split(b"\n") for d in datagrams)


def test_ready_watchdog_only_while_every_worker_answers_and_stopping(lab: Lab) -> None:
    start_nginx(lab, lab.server)
    apply_rules(lab, "--ports", str(HTTP_PORT))
    folder = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-notify-"))
    lab.cleanup_paths.append(folder)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(folder / "notify"))
    try:
        env = ["env", f"NOTIFY_SOCKET={folder / 'notify'}", f"WATCHDOG_USEC={WATCHDOG_USEC}"]
        proxy = ProxyProcess(lab, lab.router, [], wrapper=env)
        ready = _first(notify, b"READY=1", 15)
        assert not any(b"WATCHDOG" in d for d in ready[:-1])  # never before READY
        assert b"STATUS=2 workers, 0 active sessions" in ready[-1], ready
        assert len(proxy.named("listening")) == 2 or proxy.wait_for(
            lambda e: e.get("event") == "listening", "every worker", count=2
        )
        assert curl(lab, f"http://{lab.server.ipv4}:{HTTP_PORT}/")[0] == 200
        # Fed every second (WATCHDOG_USEC / 2).
        assert 3 <= _watchdogs(_received(notify, 4.5)) <= 6
        # A worker stopped: once it is silent past the stall limit, nothing feeds the watchdog.
        worker = _children(proxy.proc.pid)[0]
        time.sleep(0.2)
        lab.run(lab.router, ["kill", "-STOP", str(worker)])
        try:
            _received(notify, STALL_AFTER_S + 1)  # (fed until the stall limit)
            assert _watchdogs(_received(notify, 3)) == 0
        finally:
            lab.run(lab.router, ["kill", "-CONT", str(worker)])
        assert _watchdogs(_received(notify, 3)) >= 1  # answering again
        proxy.signal(signal.SIGTERM)
        stopping = _first(notify, b"STOPPING=1", 10)
        assert b"STATUS=draining" in stopping[-1], stopping
        assert proxy.proc.wait(timeout=30) == 0
    finally:
        notify.close()


def test_systemctl_stop_as_the_unit_says_drains_live_sessions(lab: Lab) -> None:
    """`systemctl stop` sends KillSignal= as the unit's KillMode= says: to the main process only
    (mixed), or to every process of the unit (control-group, systemd's default), where each
    worker would get SIGTERM twice (from systemd, and passed on by the supervisor) and cut
    every session at once. Stopped as the unit says, a live upload finishes intact."""
    unit = render_units(UnitOptions(command=("/usr/local/bin/tproxy",), rules_args=()))
    kill_mode = dict(
        line.split("=", 1) for line in unit[PROXY_UNIT].splitlines() if line.startswith("Kill")
    ).get("KillMode", "control-group")
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    proxy = start_proxy(lab, "--workers", "2")
    proxy.wait_for(lambda e: e.get("event") == "listening", "every worker", count=2)
    peer = str(lab.server.endpoint(PEER_PORT, 4))
    argv = [sys.executable, "-m", "tproxy.lab.peers", "upload", peer,
            "--bytes", str(8 * MIB), "--rate", str(8_000_000)]  # about 1 s  # fmt: skip
    upload = lab.start(lab.client, argv, stdout=subprocess.PIPE)
    proxy.wait_for(lambda e: e.get("event") == "upstream_connected", "the upload's session")
    if kill_mode == "control-group":  # every process; how close together depends on the
        for worker in _children(proxy.proc.pid):  # scheduler: apart, as they may well arrive
            os.kill(worker, signal.SIGTERM)
        time.sleep(0.2)
    proxy.signal(signal.SIGTERM)
    out, _ = upload.communicate(timeout=60)
    assert json.loads(out)["intact"], (kill_mode, out)
    assert proxy.proc.wait(10) == 0
    assert [e["reason"] for e in proxy.named("session_close")] == ["closed"], kill_mode
