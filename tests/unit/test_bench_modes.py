from __future__ import annotations

import os

from bench.modes import BULK, CONN_RATE, LATENCY, SPECS, cpus, render_haproxy_cfg
from bench.report import MODES, TARGETS


def _test_of(metric: str) -> str:
    if metric.startswith(("stream", "cpu")):
        return BULK
    return LATENCY if metric.startswith("latency") else metric


def test_every_mode_has_a_spec_and_every_target_is_measured_on_both_sides() -> None:
    assert set(SPECS) == set(MODES)
    for target in TARGETS:
        test = _test_of(target.metric)
        assert test in SPECS[target.subject].tests
        if target.versus is not None:
            assert test in SPECS[target.versus].tests


def test_the_connection_rate_runs_with_and_without_logs_and_both_splice_modes() -> None:
    variants = {(s.proxy, s.splice, s.log) for s in SPECS.values() if CONN_RATE in s.tests}
    for splice in ("forced", "auto"):
        assert {("haproxy", splice, True), ("haproxy", splice, False)} <= variants
    assert {("tproxy", "splice", True), ("tproxy", "splice", False)} <= variants


def test_threads_follow_the_cpus_this_process_may_use() -> None:
    assert cpus() == len(os.sched_getaffinity(0))


def test_haproxy_threads_splice_and_logging_are_explicit() -> None:
    logged = render_haproxy_cfg(3, "forced", log=True).splitlines()
    assert "    nbthread 3" in logged
    assert "    log stdout format raw local0" in logged
    assert {"    log global", "    option tcplog"} <= set(logged)
    assert {"    option splice-request", "    option splice-response"} <= set(logged)
    quiet = render_haproxy_cfg(3, "auto", log=False)
    assert "    option splice-auto\n" in quiet
    assert "log" not in quiet
    assert "splice-request" not in quiet
