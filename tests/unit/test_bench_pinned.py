from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from bench import pinned
from bench.pinned import count_closes, descendants, engine_argv, parse_wrk, tally_scrapes
from bench.pinned_engine import fixed_server, parse_hostport
from bench.pinned_report import (
    BY_NAME,
    COMPARISONS,
    IN_FULL_BENCHMARK,
    SCRAPED,
    VARIANTS,
    PinnedRun,
    Run,
    differences,
    judge,
    pair_order,
    problems,
    render_results,
    render_section,
    render_targets,
    slice_order,
    tally,
)
from bench.pinned_scrape import (
    ACCEPT,
    ScrapeError,
    closed_sessions,
    parse_response,
    render_request,
    scrape,
)
from bench.report import Verdict

from tproxy.core.config import LogFormat, ProxyConfig
from tproxy.engine.server import ProxyServer
from tproxy.observability.counters import Totals
from tproxy.observability.eventlog import EventLog
from tproxy.observability.prometheus import Process, render

ADDON = BY_NAME["addon"]


def test_pairs_alternate_which_variant_runs_first() -> None:
    assert pair_order("base", "policy", 4) == [
        ("base", "policy"), ("policy", "base"), ("base", "policy"), ("policy", "base")
    ]  # fmt: skip
    assert pair_order("a", "b", 1) == [("a", "b")]
    assert pair_order("a", "b", 0) == []


def test_slices_within_a_pair_go_abba() -> None:
    assert slice_order("a", "b", 4) == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert slice_order("b", "a", 3) == ["b", "a", "a", "b", "b", "a"]
    assert slice_order("a", "b", 0) == []


def test_every_comparison_names_known_variants() -> None:
    for comparison in COMPARISONS:
        assert comparison.a in VARIANTS
        assert comparison.b in VARIANTS
    assert {c.issue: c.bound_us for c in COMPARISONS} == {
        12: 5.0, 10: 10.0, 11: 5.0, 15: 3.0, None: None
    }  # fmt: skip
    assert BY_NAME["metrics"].a == "base" and BY_NAME["metrics"].b == "metrics"
    assert VARIANTS.keys() >= SCRAPED


def test_the_full_benchmark_runs_the_small_bounds_and_the_noise() -> None:
    assert set(IN_FULL_BENCHMARK) <= BY_NAME.keys()
    assert {"addon", "policy", "metrics", "noise"} <= set(IN_FULL_BENCHMARK)


def _run(
    pair: int, variant: str, cpu_per_conn_us: float, requests: int = 10_000,
    comparison: str = "addon", **kwargs: Any,
) -> Run:  # fmt: skip
    kwargs.setdefault("closes", {"splice": requests + 1_000})
    return Run(comparison, pair, variant, 1.5, requests, requests / 4,
               cpu_per_conn_us * requests / 1e6, warmup_requests=1_000, **kwargs)  # fmt: skip


def test_cpu_per_connection_is_cpu_over_requests() -> None:
    run = Run("addon", 1, "base", 0.0, 20_000, 5_000.0, 2.0)
    assert run.cpu_per_conn_us == pytest.approx(100.0)
    assert math.isnan(Run("addon", 1, "base", 0.0, 0, 0.0, 2.0).cpu_per_conn_us)


def test_a_difference_is_b_minus_a_within_each_pair_whatever_ran_first() -> None:
    runs = [
        _run(1, "base", 100.0), _run(1, "addon-unclaimed", 102.5),
        _run(2, "addon-unclaimed", 99.0), _run(2, "base", 101.0),  # B first: still B - A
        _run(3, "base", 100.0),  # its B is missing: no pair
        _run(1, "base", 50.0, comparison="policy"),  # another comparison's run
    ]  # fmt: skip
    found = differences(runs, ADDON, min_requests=1_000, connections=32, seconds=4)
    assert found == {1: pytest.approx(2.5), 2: pytest.approx(-2.0)}


def test_a_pair_with_an_invalid_run_is_left_out() -> None:
    runs = [
        _run(1, "base", 100.0), _run(1, "addon-unclaimed", 101.0),
        _run(2, "base", 100.0), _run(2, "addon-unclaimed", 150.0, socket_errors=3),
    ]  # fmt: skip
    assert differences(runs, ADDON, min_requests=1_000, connections=32, seconds=4) == {
        1: pytest.approx(1.0)
    }


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, []),
        ({"socket_errors": 2}, ["wrk: 2 socket errors"]),
        ({"bad_status": 1}, ["wrk: 1 non-2xx/3xx responses"]),
        ({"requests": 999, "closes": {"splice": 1_999}}, ["999 requests, fewer than 1000"]),
        # the proxy relayed fewer than wrk completed: not this proxy, or not by splice
        (
            {"closes": {"splice": 10_999}},
            ["10999 close events relayed by splice for 11000 requests"],
        ),
        (
            {"closes": {"copy": 11_000}},
            [
                "0 close events relayed by splice for 11000 requests",
                "11000 close events not relayed by splice",
            ],
        ),
        # cut at the end of each wrk run and wrk's address checks: allowed, not more
        ({"closes": {"splice": 11_000 + 40, "none": 26}}, []),
        ({"closes": {"splice": 11_000 + 67}}, ["11067 close events for 11000 requests"]),
        ({"closes": {"splice": 11_000 + 165}, "wrk_runs": 5}, []),
        (
            {"closes": {"splice": 11_000 + 166}, "wrk_runs": 5},
            ["11166 close events for 11000 requests"],
        ),
    ],
)
def test_problems(changes: dict[str, Any], expected: list[str]) -> None:
    run = _run(1, "base", 100.0, **changes)
    assert problems(run, min_requests=1_000, connections=32, seconds=4) == expected


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, []),
        ({"scrapes": 7}, []),  # a second's slack: 1-second slices, scrapes a second apart
        ({"scrapes": 6}, ["6 scrapes in 8 s measured"]),
        ({"scrape_errors": 1}, ["1 scrapes failed"]),
        ({"scraped_closes": 0}, ["the metrics counted 0 closed sessions, the log 11000"]),
        ({"scraped_closes": 11_001}, ["the metrics counted 11001 closed sessions, the log 11000"]),
    ],
)
def test_problems_of_a_scraped_variant(changes: dict[str, Any], expected: list[str]) -> None:
    changes = {"scrapes": 8, "scraped_closes": 10_500, **changes}
    run = _run(1, "metrics", 100.0, comparison="metrics", **changes)
    assert problems(run, min_requests=1_000, connections=32, seconds=8) == expected
    # a variant that is not scraped has no scrapes to count
    assert problems(_run(1, "base", 100.0), min_requests=1_000, connections=32, seconds=8) == []


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([2.1, 3.0, 4.9, 5.0], Verdict.MET),  # on the bound clears "at most"
        ([5.1, 6.0, 9.0], Verdict.MISSED),
        ([1.0, 6.0], Verdict.INCONCLUSIVE),
        ([2.0], Verdict.INCONCLUSIVE),  # one pair: no spread
        ([], Verdict.NO_DATA),
    ],
)
def test_verdict_needs_every_pair_on_one_side(values: list[float], expected: Verdict) -> None:
    assert judge(values, 5.0) is expected


def test_the_aa_check_has_no_verdict() -> None:
    runs = [_run(1, "base", 100.0, comparison="noise"),
            _run(1, "base-again", 100.5, comparison="noise")]  # fmt: skip
    pinned = _pinned(runs, ["noise"], 1)
    assert judge([0.5], None) is None
    assert render_targets(pinned)[2] == (
        "| proxy CPU per connection: base-again minus base (A/A: the noise) | 0.5 | "
        "0.5 (0.5 to 0.5) | — | — |"
    )
    assert tally(pinned) == "no target"


def _pinned(runs: list[Run], comparisons: list[str], pairs: int) -> PinnedRun:
    return PinnedRun(runs=runs, comparisons=comparisons, pairs=pairs, seconds=4, warmup_s=1,
                     connections=32, min_requests=1_000, pinned=True, load_cpu=0, proxy_cpu=1,
                     facts={"started": "2026-12-01 10:00 UTC"})  # fmt: skip


def test_rendered_targets_table() -> None:
    runs = []
    for pair, (first, second) in enumerate(pair_order("base", "addon-unclaimed", 3), start=1):
        for variant in (first, second):
            runs.append(_run(pair, variant, 100.0 + (2.0 * pair if variant != "base" else 0)))
    runs += [_run(1, "base", 100.0, comparison="policy"),
             _run(1, "policy", 130.0, comparison="policy", bad_status=1),
             _run(2, "policy", 112.0, comparison="policy"),
             _run(2, "base", 100.0, comparison="policy")]  # fmt: skip
    pinned = _pinned(runs, ["addon", "policy"], 3)
    assert render_targets(pinned) == [
        "| comparison | per pair (µs) | median (min-max) | target | verdict |",
        "|---|---|---|---|---|",
        "| proxy CPU per connection: addon-unclaimed minus base (issue 12) | 2.0, 4.0, 6.0 | "
        "4.0 (2.0 to 6.0) | ≤ 5 µs | **inconclusive** |",
        "| proxy CPU per connection: policy minus base (issue 10) | 12.0 (2 of 3 pairs invalid, "
        "left out) | 12.0 (12.0 to 12.0) | ≤ 10 µs | **inconclusive** |",
    ]
    assert tally(pinned) == "2 inconclusive"
    text = render_results(pinned)
    assert text.startswith("# Pinned A/B results\n")
    assert "## Targets: 2 inconclusive" in text
    assert "wrk on CPU 0, the proxies on CPU 1" in text
    assert "| policy | 1 | policy | 1.50 | 10,000 | 2500 | 1.30 | 130.0 | splice 11,000 | NO: " \
           "wrk: 1 non-2xx/3xx responses |" in text  # fmt: skip


def test_the_full_benchmarks_section() -> None:
    runs = [_run(1, "base", 100.0), _run(1, "addon-unclaimed", 101.0),
            _run(2, "addon-unclaimed", 102.0), _run(2, "base", 100.0)]  # fmt: skip
    pinned = _pinned(runs, ["addon"], 2)
    pinned.facts.update(load_before="`before`", load_after="`after`")
    lines = render_section(pinned)
    assert lines[0] == "## Pinned A/B (issues 12), `bench/pinned.py` after the rounds: 1 met"
    assert "Load (`uptime`) before: `before`; after: `after`." in lines[2]
    assert lines[4:7] == render_targets(pinned)[:3]
    assert "| base | splice relay, no policy, no addon | 100.0 (100.0 to 100.0) | 2500 " \
           "(2500 to 2500) | 2 |" in lines  # fmt: skip


def test_unpinned_runs_say_so() -> None:
    pinned = _pinned([], ["addon"], 8)
    pinned.pinned, pinned.load_cpu, pinned.proxy_cpu = False, None, None
    text = render_results(pinned)
    assert "unpinned: this process may run on fewer than 2 CPUs" in text
    assert "**no data**" in text


def test_a_run_survives_json() -> None:
    pinned = _pinned([_run(1, "base", 100.0, closes={"splice": 11_000, "none": 3})], ["addon"], 1)
    again = PinnedRun.from_json(json.loads(json.dumps(pinned.to_json())))
    assert again == pinned


def test_parse_wrk() -> None:
    out = """Running 4s test @ http://127.0.0.1:1800/
  1 threads and 32 connections
  34306 requests in 4.00s, 6.22MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:   8574.21
"""
    assert parse_wrk(out) == (34306, 8574.21, 3, 4)
    clean = "  100 requests in 1.00s, 1MB read\nRequests/sec:   100.00\n"
    assert parse_wrk(clean) == (100, 100.0, 0, 0)


def test_count_closes_by_relay() -> None:
    lines = [
        {"event": "listening"},
        {"event": "session_open", "relay": None},
        {"event": "session_close", "relay": "splice"},
        {"event": "session_close", "relay": "splice"},
        {"event": "session_close", "relay": None},
    ]
    log = io.BytesIO(b"".join(json.dumps(x, separators=(",", ":")).encode() + b"\n" for x in lines))
    assert count_closes(log) == {"splice": 2, "none": 1}


def test_engine_argv_per_variant(tmp_path: Path) -> None:
    base = engine_argv("base", tmp_path)
    assert base[1:4] == ["-m", "bench.pinned_engine", "127.0.0.1:80"]
    assert base[base.index("--listen") + 1] == "127.0.0.1:1800"
    assert engine_argv("base", tmp_path, 1801)[-1] == "127.0.0.1:1801"
    assert engine_argv("base-again", tmp_path) == base
    for option in ("--spoof-source", "--log-format", "--listen"):
        assert option in base
    assert base[base.index("--relay") + 1] == "splice"
    assert base[base.index("--workers") + 1] == "1"
    assert base[base.index("--loop") + 1] == "uvloop"
    assert "--policy" not in base and "--addon" not in base
    policy = engine_argv("policy", tmp_path)
    assert Path(policy[policy.index("--policy") + 1]).read_text().count("[[rule]]") == 50
    capture = engine_argv("capture-configured", tmp_path)
    assert "capture = true" in Path(capture[capture.index("--policy") + 1]).read_text()
    assert Path(capture[capture.index("--capture-dir") + 1]).is_dir()
    addon = engine_argv("addon-unclaimed", tmp_path)
    assert addon[addon.index("--addon") + 1].endswith("bench/addons/unclaimed.py")
    assert "--metrics-listen" not in base and "--control" not in base
    metrics = engine_argv("metrics", tmp_path)
    assert metrics[: len(base)] == base
    # each side of a pair its own metrics port; the control socket not in /run
    assert metrics[metrics.index("--metrics-listen") + 1] == "127.0.0.1:9464"
    other = engine_argv("metrics", tmp_path, 1801)
    assert other[other.index("--metrics-listen") + 1] == "127.0.0.1:9465"
    control = Path(metrics[metrics.index("--control") + 1])
    assert control.parent == tmp_path
    assert control != Path(other[other.index("--control") + 1])


def test_descendants_are_found_through_proc() -> None:
    # a process that forks one child, as a supervisor forks its worker
    code = ("import subprocess, sys, time; child = subprocess.Popen(['sleep', '30']); "
            "print(child.pid, flush=True); sys.stdin.read(); child.kill()")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert descendants(parent.pid) == [child]
        assert child in descendants(os.getpid())
        assert descendants(child) == []
    finally:
        parent.communicate("")
    assert descendants(parent.pid) == []  # gone: nothing, no error


def test_tally_scrapes() -> None:
    lines = ['{"closed": 10}', '{"error": "ConnectionRefusedError: refused"}', '{"closed": 25}',
             '{"clos']  # the last cut short by the scraper's stop  # fmt: skip
    assert tally_scrapes(lines) == (3, 1, 25)
    assert tally_scrapes([]) == (0, 0, 0)
    assert tally_scrapes(['{"error": "x"}']) == (1, 1, 0)


def _exposition(accept: str, closed: dict[Any, int]) -> bytes:
    totals = Totals(closed=closed)
    return render(totals, Process("0.1.0", 1.7e9, 1, 0), accept)[0]


@pytest.mark.parametrize("accept", [ACCEPT, ""])  # OpenMetrics (Prometheus's ask), plain text
def test_closed_sessions_sums_the_close_series(accept: str) -> None:
    closed = {("eof", "allow", None, None): 1200, ("upstream_refused", "allow", "r1", "tls"): 3}
    assert closed_sessions(_exposition(accept, closed)) == 1203
    assert closed_sessions(_exposition(accept, {})) == 0
    with pytest.raises(ScrapeError, match="no tproxy_sessions_closed_total"):
        closed_sessions(b"# EOF\n")


def test_parse_response() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
    assert parse_response(head + b"hello") == b"hello"
    with pytest.raises(ScrapeError, match="4 bytes of body for Content-Length 5"):
        parse_response(head + b"hell")
    with pytest.raises(ScrapeError, match=r"answered .HTTP/1\.1 404 Not Found."):
        parse_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(ScrapeError, match="no complete response head"):
        parse_response(b"HTTP/1.1 200 OK\r\n")
    request = render_request("127.0.0.1", 9464)
    assert request.startswith(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9464\r\n")
    assert f"Accept: {ACCEPT}\r\n".encode() in request and request.endswith(b"\r\n\r\n")


def test_a_scrape_asks_as_prometheus_does_and_reads_the_count() -> None:
    body = _exposition(ACCEPT, {("eof", "allow", None, None): 42})
    asked: list[bytes] = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        addr = server.getsockname()

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                asked.append(conn.recv(65536))
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close"
                             b"\r\n\r\n%s" % (len(body), body))  # fmt: skip

        thread = threading.Thread(target=answer)
        thread.start()
        try:
            assert scrape(addr) == 42
        finally:
            thread.join(5)
    assert asked == [render_request(*addr)]


def test_parse_hostport() -> None:
    assert parse_hostport("127.0.0.1:80") == ("127.0.0.1", 80)
    for bad in ("127.0.0.1", ":80", "host:port"):
        with pytest.raises(ValueError):
            parse_hostport(bad)


def test_the_fixed_server_sends_every_session_to_its_destination() -> None:
    server_class = fixed_server(("127.0.0.1", 80))
    assert issubclass(server_class, ProxyServer)
    server = server_class(ProxyConfig(), EventLog(LogFormat.JSON, io.StringIO()), listeners=[])
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # getsockname(), the TPROXY lookup, would say this
        assert server._ctx.destination(sock) == ("127.0.0.1", 80)


def test_the_listening_ports_are_kept_out_of_the_ephemeral_range() -> None:
    reserved = {int(port) for port in pinned.reserved_ports().split(",")}
    assert reserved == {80, *pinned.PROXY_PORTS, *pinned.METRICS_PORTS.values()}
