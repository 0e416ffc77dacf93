"""`tproxy run --workers N`: each client address steered to one worker, a dead worker comes back
with its own socket, a stalled one is noticed, the supervisor lists every worker's sessions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from tests.integration.conftest import apply_rules, client_json, client_per_worker, start_proxy
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import PEER_PORT, start_peer_server
from tproxy.lab.topology import Lab, wait_until


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _host(client: str) -> str:
    return client.rsplit(":", 1)[0].strip("[]")


def _workers_by_client(proxy: ProxyProcess, since: int = 0) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = defaultdict(set)
    for event in proxy.named("session_open")[since:]:
        seen[_host(event["client"])].add(event["worker"])
    return seen


@pytest.mark.parametrize("family", [4, 6])
def test_each_client_stays_on_its_worker_through_a_restart(lab: Lab, family: int) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    proxy = start_proxy(lab, "--workers", "2")
    proxy.wait_for(lambda e: e.get("event") == "listening", "both workers", count=2)
    clients = client_per_worker(lab, 2, family)
    peer = str(lab.server.endpoint(PEER_PORT, family))
    for ip in clients.values():
        result = client_json(lab, ["swarm", peer, "--count", "100", "--source", str(ip)])
        assert result["outcomes"] == {"intact": 100}, result
    # The kernel ran the steering program on nft's own listener lookup: every session of a
    # client went to the worker the program's arithmetic names, and both workers served.
    expected = {str(ip): {worker} for worker, ip in clients.items()}
    assert _workers_by_client(proxy) == expected

    # Kill worker 1 outright: the supervisor starts a new one, which gets worker 1's socket
    # back, so worker 1's client is served by worker 1 again.
    opened = len(proxy.named("session_open"))
    workers = _children(proxy.proc.pid)
    assert len(workers) == 2
    victim = _worker_pid(proxy, 1)
    os.kill(victim, signal.SIGKILL)
    proxy.wait_for(lambda e: "worker 1" in e.get("message", "") and "restarting it" in
                   e.get("message", ""), "the restart notice")  # fmt: skip
    wait_until(lambda: len(proxy.named("listening")) == 3, 10, "the new worker to listen")
    assert len(_children(proxy.proc.pid)) == 2
    for ip in clients.values():
        again = client_json(lab, ["swarm", peer, "--count", "50", "--source", str(ip)])
        assert again["outcomes"] == {"intact": 50}, again
    assert _workers_by_client(proxy, since=opened) == expected

    # SIGHUP without --config: the supervisor says, once for all workers, there is nothing to
    # reload (the workers' reload is shown by the log-format test below).
    proxy.signal(signal.SIGHUP)
    said = proxy.wait_for(lambda e: "nothing to reload" in e.get("message", ""), "the notice")
    assert [e["worker"] for e in said] == [0]

    assert proxy.stop() == 0
    assert len(proxy.named("stopped")) == 2  # each worker drained and said so


def _worker_pid(proxy: ProxyProcess, worker: int) -> int:
    """The PID of worker `worker` now, asked of the supervisor through its listing."""
    count = len(proxy.named("sessions"))
    proxy.signal(signal.SIGUSR1)
    listing = proxy.wait_for(lambda e: e.get("event") == "sessions", "a listing", count=count + 1)
    return int(next(w["pid"] for w in listing[-1]["workers"] if w["worker"] == worker))


def test_a_second_tproxy_on_the_same_port_is_refused(lab: Lab) -> None:
    proxy = start_proxy(lab, "--workers", "2")
    # One worker (no supervisor, no control socket): the port is taken. Several: the running
    # proxy's control socket answers first, and the line says what to do.
    for workers, why in (("1", "already in use"), ("2", "another tproxy is running")):
        second = ProxyProcess(lab, lab.router, ["--workers", workers])
        assert second.proc.wait(10) == 1
        assert why in second.stderr_text()
        second.stop()
    assert proxy.proc.poll() is None


def test_the_supervisor_lists_every_workers_sessions(lab: Lab) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    proxy = start_proxy(lab, "--workers", "2")
    proxy.wait_for(lambda e: e.get("event") == "listening", "both workers", count=2)
    clients = client_per_worker(lab, 2)
    peer = str(lab.server.endpoint(PEER_PORT))
    holders = []
    try:
        for worker, ip in clients.items():
            argv = [sys.executable, "-m", "tproxy.lab.peers", "hold", peer,
                    "--count", str(worker + 1), "--source", str(ip)]  # fmt: skip
            holder = lab.start(lab.client, argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE)
            holders.append(holder)
            assert holder.stdout is not None
            assert json.loads(holder.stdout.readline()) == {"ready": worker + 1}
        proxy.signal(signal.SIGUSR1)
        listing = proxy.wait_for(lambda e: e.get("event") == "sessions", "the listing")[0]
    finally:
        for holder in holders:
            assert holder.stdin is not None
            holder.stdin.close()
            holder.wait(10)
    assert listing["missing"] == []
    assert listing.get("worker") == 0  # the supervisor's
    by_worker = {w["worker"]: w for w in listing["workers"]}
    assert sorted(by_worker) == [1, 2]
    opened = proxy.named("session_open")
    for worker, ip in clients.items():
        entry = by_worker[worker]
        assert entry["active"] == worker + 1
        assert entry["pid"] in _children(proxy.proc.pid)
        assert {_host(s["client"]) for s in entry["sessions"]} == {str(ip)}
        ids = {e["session"] for e in opened if e["worker"] == worker}
        assert {s["id"] for s in entry["sessions"]} == ids


def test_a_stalled_worker_is_noticed_and_so_is_its_recovery(lab: Lab) -> None:
    proxy = start_proxy(lab, "--workers", "2")
    proxy.wait_for(lambda e: e.get("event") == "listening", "both workers", count=2)
    victim = _worker_pid(proxy, 2)
    assert victim in _children(proxy.proc.pid)  # a process this test started
    os.kill(victim, signal.SIGSTOP)
    try:
        stalled = proxy.wait_for(lambda e: "no heartbeat" in e.get("message", ""), "the notice")
    finally:
        os.kill(victim, signal.SIGCONT)
    assert stalled[0]["message"].startswith(f"worker 2 (pid {victim}) sent no heartbeat for 3")
    assert stalled[0]["worker"] == 0
    back = proxy.wait_for(lambda e: "answering again" in e.get("message", ""), "the recovery")
    assert back[0]["message"].startswith(f"worker 2 (pid {victim}) is answering again")
    assert len(proxy.find(lambda e: "no heartbeat" in e.get("message", ""))) == 1
    assert proxy.stop() == 0


def test_workers_stop_when_the_supervisor_is_killed(lab: Lab) -> None:
    proxy = start_proxy(lab, "--workers", "2")
    proxy.wait_for(lambda e: e.get("event") == "listening", "both workers", count=2)
    workers = _children(proxy.proc.pid)
    assert len(workers) == 2
    proxy.proc.kill()  # SIGKILL: no forwarding, no cleanup in the supervisor
    proxy.proc.wait(10)
    # Each worker reads EOF on its channel, drains and exits rather than serve unsupervised.
    wait_until(lambda: not any(os.path.exists(f"/proc/{pid}") for pid in workers), 10,
               "the orphaned workers to exit")  # fmt: skip
    gone = proxy.find(lambda e: "the supervisor is gone" in e.get("message", ""))
    assert sorted(e["worker"] for e in gone) == [1, 2]


def test_sighup_reloads_the_supervisor_and_the_workers_it_restarts(
    lab: Lab, tmp_path: Path
) -> None:
    """After a reload to JSON, the supervisor's own notices are JSON too (not a mix of text and
    JSON on one stdout), the reload is reported once for all workers, and a worker that dies
    later comes back with the reloaded file."""
    config = tmp_path / "tproxy.toml"
    config.write_text('log_format = "text"\n')
    proxy = ProxyProcess(lab, lab.router, ["--workers", "2", "--config", str(config)],
                         log_format=None)  # fmt: skip
    proxy.wait_for(lambda e: " listening on " in e.get("line", ""), "two text listeners", count=2)
    config.write_text('log_format = "json"\nloop = "asyncio"\n')
    proxy.signal(signal.SIGHUP)
    proxy.wait_for(lambda e: "reloaded" in e.get("message", ""), "the reload notice")
    os.kill(_worker_pid(proxy, 1), signal.SIGKILL)
    # The supervisor's notice of the restart, and the new worker's ready line, both in JSON.
    proxy.wait_for(lambda e: e.get("worker") == 0 and "restarting" in e.get("message", ""),
                   "the supervisor's restart notice, in JSON")  # fmt: skip
    proxy.wait_for(lambda e: e.get("event") == "listening", "the restarted worker, in JSON")
    assert proxy.stop() == 0
    notices = proxy.named("notice")
    assert any(e["worker"] == 0 and "stopping 2 workers" in e["message"] for e in notices)
    # One notice for the whole proxy names what needs a restart, and one says it reloaded.
    about_loop = [e for e in notices if "loop" in e["message"]]
    assert [(e["worker"], e["message"]) for e in about_loop] == [
        (0, "reload: loop changes only on restart; kept as is")
    ]
    assert [e["message"] for e in notices if "reloaded" in e["message"]] == [
        "reloaded the configuration in 2 workers"
    ]


def test_sigusr1_lists_without_a_supervisor_and_never_kills_a_worker(lab: Lab) -> None:
    single = start_proxy(lab)  # --workers 1: no supervisor
    single.signal(signal.SIGUSR1)
    listing = single.wait_for(lambda e: e.get("event") == "sessions", "the listing")[0]
    assert listing["workers"] == [
        {"worker": 0, "pid": single.proc.pid, "active": 0, "sessions": [], "truncated": False}
    ]
    assert single.stop() == 0

    proxy = start_proxy(lab, "--workers", "2", "--listen", "0.0.0.0:1801")
    proxy.wait_for(lambda e: e.get("event") == "listening", "both workers", count=2)
    worker = _worker_pid(proxy, 1)
    os.kill(worker, signal.SIGUSR1)  # as `pkill -USR1 tproxy` would
    assert _worker_pid(proxy, 1) == worker  # still the same process: not killed, not restarted
    assert not [e for e in proxy.named("notice") if "ended with" in e["message"]]
    assert proxy.stop() == 0
