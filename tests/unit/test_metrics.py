"""The metrics' counting, summing and rendering (no sockets): what a worker counts, what the
supervisor sums across workers (a dead one's counts kept), what Prometheus gets -- and that no
snapshot a worker could send makes the supervisor raise."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from tproxy.core.worker_protocol import Heartbeat, decode, encode
from tproxy.observability.counters import (
    CONNECT_BOUNDS_S,
    MAX_SERIES,
    OTHER_RULE,
    Counters,
    SnapshotError,
    Sums,
    Totals,
)
from tproxy.observability.prometheus import METRICS, Process, render

README = Path(__file__).resolve().parents[2] / "README.md"
PROMTOOL = Path(sys.executable).with_name("promtool")
PROCESS = Process("0.1.0", 1_790_000_000.0, 2, 1)


def _worker_counts() -> Counters:
    counters = Counters()
    counters.session_closed("closed", "allow", "web", "tls", up=100, down=1000)
    counters.session_closed("closed", "allow", "web", "tls", up=1, down=2)
    counters.session_closed("policy_reset", "reset", "ads", None, up=0, down=0)
    counters.session_closed("loop_refused", "allow", None, None, up=0, down=0)
    counters.connected(0.0004)
    counters.connected(0.003)
    counters.connected(60.0)
    counters.refuse("max_connections")
    counters.sniffed("tls")
    counters.sniffed("silent")
    counters.captures += 1
    counters.addon_failed("log_requests", "client_data")
    counters.addon_failed(None, "session_start")
    return counters


def _beat(worker: int, counters: Counters | None, **live: list[int]) -> Heartbeat:
    metrics = None if counters is None else counters.snapshot(dict(live.items()))
    return Heartbeat(worker, 1000 + worker, active=1, opened=5, bytes_up=7, bytes_down=9,
                     metrics=metrics)  # fmt: skip


def test_a_worker_counts_each_close_by_its_labels_and_bytes_by_rule() -> None:
    snapshot = _worker_counts().snapshot({"web": [5, 50]})
    assert sorted(map(tuple, snapshot["closed"]), key=str) == sorted([
        ("closed", "allow", "web", "tls", 2), ("policy_reset", "reset", "ads", None, 1),
        ("loop_refused", "allow", None, None, 1),
    ], key=str)  # fmt: skip
    moved = {row[0]: row[1:] for row in snapshot["rule_bytes"]}
    assert moved == {"web": [106, 1052], "ads": [0, 0], None: [0, 0]}
    # <= 0.5 ms, <= 5 ms (the fourth bound), and above every bound.
    assert snapshot["connect"][0] == 1 and snapshot["connect"][3] == 1
    assert snapshot["connect"][-1] == 1 and sum(snapshot["connect"]) == 3
    # A connection refused as a loop counts as a refusal too, next to the accept loop's.
    assert snapshot["refused"] == {"max_connections": 1, "loop": 1}
    assert snapshot["sniffs"] == {"tls": 1, "silent": 1}
    assert snapshot["addon_errors"] == [["log_requests", "client_data", 1],
                                        ["", "session_start", 1]]  # fmt: skip
    json.dumps(snapshot)  # it travels as JSON


def test_past_max_series_new_label_sets_count_under_other_rules() -> None:
    counters = Counters()
    for i in range(MAX_SERIES + 10):
        counters.session_closed("closed", "allow", f"rule-{i}", None, up=1, down=1)
    assert len(counters.closed) == MAX_SERIES + 1
    assert counters.closed[("closed", "allow", OTHER_RULE, None)] == 10
    assert counters.rule_bytes[OTHER_RULE] == [10, 10]


def test_sums_add_workers_and_keep_a_dead_workers_counts() -> None:
    sums = Sums()
    sums.heard(decode(encode(_beat(1, _worker_counts(), web=[5, 50]))))  # type: ignore[arg-type]
    sums.heard(_beat(2, _worker_counts()))
    total = sums.totals()
    assert (total.opened, total.active, total.bytes_up) == (10, 2, 14)
    assert total.closed[("closed", "allow", "web", "tls")] == 4
    assert total.rule_bytes["web"] == [106 + 101, 1052 + 1002]
    assert total.connect_counts[-1] == 2
    sums.gone(1)
    after = sums.totals()
    assert after.active == 1, "a dead worker's sessions are not live"
    assert (after.opened, after.closed, after.rule_bytes) == (10, total.closed, total.rule_bytes)
    # Restarted, it counts from zero again: the sums go on from where they were.
    sums.heard(_beat(1, Counters()))
    assert sums.totals().closed == total.closed and sums.totals().opened == 15


def test_a_malformed_or_missing_snapshot_keeps_the_workers_last_one() -> None:
    sums = Sums()
    sums.heard(_beat(1, _worker_counts()))
    before = sums.totals()
    sums.heard(Heartbeat(1, 1001, 3, 6, 70, 90, {"closed": "nonsense"}))
    after = sums.totals()
    assert sums.rejected == 1
    assert (after.opened, after.active, after.bytes_up) == (6, 3, 70)  # the heartbeat's own
    assert after.closed == before.closed and after.rule_bytes == before.rule_bytes
    # A heartbeat whose metrics were too large to send: the same.
    sums.heard(Heartbeat(1, 1001, 3, 7, 70, 90, None))
    assert sums.totals().closed == before.closed and sums.totals().opened == 7


def test_bytes_shown_under_a_rule_never_move_to_other_rules() -> None:
    counters = Counters()
    for i in range(MAX_SERIES - 1):
        counters.session_closed("closed", "allow", f"rule-{i}", None, up=1, down=1)
    # A live session of a new rule takes the last place; then the table is full.
    shown = counters.snapshot({"late": [40, 400]})
    assert ["late", 40, 400] in shown["rule_bytes"]
    counters.session_closed("closed", "allow", "later", None, up=5, down=5)
    assert counters.rule_bytes[OTHER_RULE] == [5, 5]
    # The live one closes with more bytes: they stay under its name, and so every sum grows.
    for reason in ("upstream_reset", "idle_timeout", "killed"):  # new close series too
        counters.session_closed(reason, "allow", "late", None, up=50, down=500)
    assert counters.rule_bytes["late"] == [150, 1500]
    assert counters.closed[("killed", "allow", OTHER_RULE, None)] == 1  # a new series: full


def test_a_connect_time_on_a_bound_counts_in_that_bounds_bucket() -> None:
    counters = Counters()
    counters.connected(CONNECT_BOUNDS_S[2])
    counters.connected(CONNECT_BOUNDS_S[2] * 1.0001)
    assert counters.connect_counts[2] == 1 and counters.connect_counts[3] == 1


@given(st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=12), inner,
                                                                  max_size=8),
    max_leaves=40,
))  # fmt: skip
def test_any_json_is_a_snapshot_or_a_snapshot_error(body: Any) -> None:
    try:
        totals = Totals.from_json(body)
    except SnapshotError:
        return
    render(totals, PROCESS)  # and whatever passed renders


@given(st.dictionaries(
    st.sampled_from(["closed", "rule_bytes", "connect", "connect_sum_s", "refused", "sniffs",
                     "captures", "capture_failures", "addon_errors"]),
    st.lists(st.lists(st.none() | st.integers(-1, 3) | st.text(max_size=3), max_size=5),
             max_size=4) | st.integers(-1, 3) | st.floats(),
))  # fmt: skip
def test_near_miss_snapshots_never_raise_anything_else(body: dict[str, Any]) -> None:
    good = _worker_counts().snapshot({})
    with contextlib.suppress(SnapshotError):
        Totals.from_json(good | body)


def _exposed(totals: Totals, accept: str = "") -> dict[tuple[str, tuple[Any, ...]], float]:
    body, _ = render(totals, PROCESS, accept)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_prometheus_sees_the_sums_with_bounded_labels() -> None:
    sums = Sums()
    sums.heard(_beat(1, _worker_counts(), web=[5, 50]))
    sums.heard(_beat(2, _worker_counts()))
    exposed = _exposed(sums.totals())
    closed = (("action", "allow"), ("proto", "tls"), ("reason", "closed"), ("rule", "web"))
    assert exposed[("tproxy_sessions_closed_total", closed)] == 4
    default = (("action", "allow"), ("proto", ""), ("reason", "loop_refused"), ("rule", ""))
    assert exposed[("tproxy_sessions_closed_total", default)] == 2
    assert exposed[("tproxy_relayed_bytes_total", (("direction", "down"), ("rule", "web")))] == (
        1052 + 1002
    )
    assert exposed[("tproxy_connections_refused_total", (("cause", "loop"),))] == 2
    assert exposed[("tproxy_upstream_connect_seconds_bucket", (("le", "0.0005"),))] == 2
    assert exposed[("tproxy_upstream_connect_seconds_bucket", (("le", "10.0"),))] == 4
    assert exposed[("tproxy_upstream_connect_seconds_bucket", (("le", "+Inf"),))] == 6
    assert exposed[("tproxy_upstream_connect_seconds_count", ())] == 6
    assert exposed[("tproxy_upstream_connect_seconds_sum", ())] == pytest.approx(
        2 * (0.0004 + 0.003 + 60)
    )
    assert exposed[("tproxy_sessions_active", ())] == 2
    assert exposed[("tproxy_worker_restarts_total", ())] == 1
    assert exposed[("tproxy_addon_errors_total", (("addon", ""), ("hook", "session_start")))] == 2
    info = [key for key in exposed if key[0] == "tproxy_build_info"]
    assert len(info) == 1 and ("version", "0.1.0") in info[0][1]
    names = {family.name for family in text_string_to_metric_families(render(
        sums.totals(), PROCESS)[0].decode())}  # fmt: skip
    assert names == {re.sub(r"_total$", "", name) for name, _, _ in METRICS}


def test_openmetrics_when_the_scraper_asks_for_it() -> None:
    body, content_type = render(Totals(), PROCESS, "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    body, content_type = render(Totals(), PROCESS)
    assert content_type.startswith("text/plain") and b"# EOF" not in body


@pytest.mark.skipif(not PROMTOOL.exists(), reason="promtool not installed (scripts/bootstrap)")
def test_promtool_has_nothing_to_say() -> None:
    sums = Sums()
    sums.heard(_beat(1, _worker_counts(), web=[5, 50]))
    body, _ = render(sums.totals(), PROCESS)
    checked = subprocess.run([str(PROMTOOL), "check", "metrics"], input=body,
                             capture_output=True, timeout=30, check=False)  # fmt: skip
    assert checked.returncode == 0, checked
    assert not checked.stdout.strip() and not checked.stderr.strip(), checked


def test_connect_bounds_grow() -> None:
    assert list(CONNECT_BOUNDS_S) == sorted(set(CONNECT_BOUNDS_S))


def test_the_readme_lists_every_metric_with_its_type_and_labels() -> None:
    text = README.read_text()
    rows = {
        match.group(1): (match.group(2), match.group(3))
        for match in re.finditer(r"^\| `(tproxy_\w+)` \| (\w+) \| ([^|]*) \|", text, re.M)
    }
    expected = {name: (kind, ", ".join(f"`{label}`" for label in labels) or "-")
                for name, kind, labels in METRICS}  # fmt: skip
    assert {name: (kind, labels.strip()) for name, (kind, labels) in rows.items()} == expected


@pytest.mark.skipif(not PROMTOOL.exists(), reason="promtool not installed (scripts/bootstrap)")
def test_the_readmes_sample_alerts_are_a_valid_rule_file(tmp_path: Path) -> None:
    text = README.read_text()
    start = text.index("```yaml\ngroups:")
    rules = tmp_path / "tproxy.rules.yml"
    rules.write_text(text[start + len("```yaml\n") : text.index("```", start + 7)])
    checked = subprocess.run([str(PROMTOOL), "check", "rules", str(rules)],
                             capture_output=True, timeout=30, check=False)  # fmt: skip
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    assert b"SUCCESS: 4 rules found" in checked.stdout, checked.stdout
