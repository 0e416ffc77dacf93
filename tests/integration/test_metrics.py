"""Prometheus metrics on the real path (issue 15), with the workers a user gets: after sessions
the test made from two clients, each steered to its own worker, `/metrics` counts exactly those
sessions and their bytes (summed over the workers, by rule and close reason), `promtool check
metrics` finds nothing to say, and the counts stay when a worker is killed and restarted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import apply_rules, client_json, client_per_worker, start_proxy
from tproxy.core.endpoint import IPAddress
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import PEER_PORT, start_peer_server
from tproxy.lab.topology import Lab, wait_until

WORKERS = os.cpu_count() or 1
METRICS = "127.0.0.1:9464"
RESET_PORT = 9001
PROMTOOL = Path(sys.executable).with_name("promtool")
POLICY = f"""
[[rule]]
name = "peers"
ports = [{PEER_PORT}]
action = "allow"

[[rule]]
name = "closed-port"
ports = [{RESET_PORT}]
action = "reset"
"""
DOWNLOAD_BYTES = 100_000
PER_CLIENT = 3

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(lab: Lab, *headers: str) -> str:
    argv = ["curl", "-sS", "--max-time", "5", *[f"-H{h}" for h in headers],
            f"http://{METRICS}/metrics"]  # fmt: skip
    return lab.run(lab.router, argv).stdout.decode()


def _samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    return sum(
        value for (sample, have), value in samples.items()
        if sample == name and set(labels.items()) <= set(have)
    )  # fmt: skip


def _policy(lab: Lab) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-metrics-"))
    lab.cleanup_paths.append(folder)
    path = folder / "policy.toml"
    path.write_text(POLICY)
    return path


def _download(lab: Lab, source: IPAddress, seed: int) -> dict[str, Any]:
    peer = f"{lab.server.ipv4}:{PEER_PORT}"
    return client_json(lab, ["download", peer, "--bytes", str(DOWNLOAD_BYTES), "--seed",
                             str(seed), "--source", str(source)])  # fmt: skip


def test_metrics_count_the_sessions_and_bytes_made_over_every_worker(lab: Lab) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", f"{PEER_PORT},{RESET_PORT}")
    clients = client_per_worker(lab, WORKERS)
    proxy = start_proxy(lab, "--policy", str(_policy(lab)), "--metrics-listen", METRICS,
                        default_workers=True)  # fmt: skip
    up = 0
    for worker, source in sorted(clients.items()):
        for i in range(PER_CLIENT):
            seed = worker * 100 + i
            verdict = _download(lab, source, seed)
            assert verdict["intact"], verdict
            up += len(f"DOWNLOAD {DOWNLOAD_BYTES} {seed}\n")
    refused = client_json(lab, ["probe", f"{lab.server.ipv4}:{RESET_PORT}", "--send", "hi"])
    assert "ECONNRESET" in (refused["connect"], refused["read"]), refused
    sessions = WORKERS * PER_CLIENT + 1
    closes = proxy.wait_for(lambda e: e.get("event") == "session_close", "every close",
                            count=sessions)  # fmt: skip
    assert {c["worker"] for c in closes} == set(range(1, WORKERS + 1)), "not every worker served"

    def counted() -> Samples:
        return _samples(_scrape(lab))

    wait_until(lambda: _value(counted(), "tproxy_sessions_opened_total") == sessions, 10,
               "the heartbeats to carry every session")  # fmt: skip
    samples = counted()
    downloads = WORKERS * PER_CLIENT
    assert _total(samples, "tproxy_sessions_closed_total", reason="closed", action="allow",
                  rule="peers") == downloads, samples  # fmt: skip
    assert _total(samples, "tproxy_sessions_closed_total", reason="policy_reset",
                  action="reset", rule="closed-port") == 1, samples  # fmt: skip
    assert _total(samples, "tproxy_sessions_closed_total") == sessions
    assert _value(samples, "tproxy_relayed_bytes_total", direction="up", rule="peers") == up
    assert (_value(samples, "tproxy_relayed_bytes_total", direction="down", rule="peers")
            == downloads * DOWNLOAD_BYTES)  # fmt: skip
    assert _value(samples, "tproxy_upstream_connect_seconds_count") == downloads
    assert _value(samples, "tproxy_upstream_connect_seconds_bucket", le="+Inf") == downloads
    assert 0 < _value(samples, "tproxy_upstream_connect_seconds_sum") < downloads
    assert _value(samples, "tproxy_sessions_active") == 0
    assert _value(samples, "tproxy_workers") == WORKERS
    assert _total(samples, "tproxy_build_info") == 1

    # promtool, Prometheus' own linter, has nothing to say about names, types, units or help.
    checked = subprocess.run([str(PROMTOOL), "check", "metrics"], input=_scrape(lab).encode(),
                             capture_output=True, timeout=30, check=False)  # fmt: skip
    assert checked.returncode == 0 and not checked.stdout.strip(), checked
    assert not checked.stderr.strip(), checked.stderr.decode()

    # A worker killed: restarted, and what it counted stays counted (no counter goes down).
    _kill_worker(proxy, closes[0]["worker"])
    wait_until(lambda: _value(counted(), "tproxy_worker_restarts_total") == 1, 15,
               "the worker's restart")  # fmt: skip
    after = counted()
    assert _value(after, "tproxy_sessions_opened_total") == sessions
    assert _total(after, "tproxy_sessions_closed_total") == sessions
    assert _value(after, "tproxy_relayed_bytes_total", direction="up", rule="peers") == up
    assert _value(after, "tproxy_upstream_connect_seconds_count") == downloads


def test_the_endpoint_speaks_openmetrics_when_asked_and_refuses_other_paths(lab: Lab) -> None:
    start_proxy(lab, "--metrics-listen", METRICS, default_workers=True)
    text = _scrape(lab, "Accept: application/openmetrics-text; version=1.0.0")
    assert text.rstrip().endswith("# EOF"), text[-200:]
    assert "tproxy_sessions_opened_total 0" in text, text
    status = lab.run(lab.router, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  f"http://{METRICS}/secrets"]).stdout  # fmt: skip
    assert status == b"404"
    status = lab.run(lab.router, ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  "-X", "POST", f"http://{METRICS}/metrics"]).stdout  # fmt: skip
    assert status == b"405"


def test_one_worker_with_metrics_runs_supervised_and_a_taken_port_stops_the_start(
    lab: Lab,
) -> None:
    proxy = start_proxy(lab, "--workers", "1", "--metrics-listen", METRICS)
    assert "tproxy_workers 1.0" in _scrape(lab)
    second = ProxyProcess(lab, lab.router, ["--workers", "1", "--listen", "127.0.0.1:1900",
                                            "--control", "/run/tproxy-second.sock",
                                            "--metrics-listen", METRICS])  # fmt: skip
    code = second.proc.wait(timeout=20)
    stderr = second.stderr_text()
    assert code == 1 and f"--metrics-listen {METRICS}" in stderr, stderr
    assert proxy.proc.poll() is None


def test_a_takeover_hands_the_metrics_port_over_without_a_failed_scrape(lab: Lab) -> None:
    old = start_proxy(lab, "--metrics-listen", METRICS, default_workers=True)
    started = _value(_samples(_scrape(lab)), "tproxy_start_time_seconds")
    failures: list[str] = []
    start_times: list[float] = []  # as each scrape said: the old one's, then the new one's
    stop = threading.Event()

    def scrape_all_along() -> None:
        while not stop.is_set():
            done = lab.run(lab.router, ["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}",
                                        f"http://{METRICS}/metrics"], check=False)  # fmt: skip
            body, _, status = done.stdout.decode().rpartition("\n")
            if status != "200":
                failures.append(done.stderr.decode() or status)
            else:
                start_times.append(_value(_samples(body), "tproxy_start_time_seconds"))
            time.sleep(0.02)

    scraper = threading.Thread(target=scrape_all_along)
    scraper.start()
    new = ProxyProcess(lab, lab.router, ["--takeover", "--metrics-listen", METRICS])
    try:
        new.wait_for(lambda e: e.get("event") == "listening", "every new worker", count=WORKERS)
        wait_until(lambda: old.proc.poll() is not None, 60, "the old tproxy to drain and exit")
        time.sleep(0.5)
        stop.set()
        scraper.join(timeout=30)
        assert not failures, failures
        # Never the two in turn (a scraper would see the counters reset again and again): the
        # old one until it stops, then the new one (its own start time).
        assert start_times == sorted(start_times) and len(set(start_times)) == 2, start_times
        assert start_times[0] == started < start_times[-1]
    finally:
        stop.set()
        new.stop()


def _kill_worker(proxy: ProxyProcess, worker: int) -> None:
    """SIGKILL worker `worker` (its PID asked of the supervisor through a listing)."""
    count = len(proxy.named("sessions"))
    proxy.signal(signal.SIGUSR1)
    listing = proxy.wait_for(lambda e: e.get("event") == "sessions", "a listing", count=count + 1)
    os.kill(int(next(w["pid"] for w in listing[-1]["workers"] if w["worker"] == worker)),
            signal.SIGKILL)  # fmt: skip
