from __future__ import annotations

import pytest
from bench.report import (
    MODES,
    TARGETS,
    Comparison,
    Kind,
    Verdict,
    per_round,
    render_comparisons,
    render_modes,
    render_spread,
    rotated,
    tally,
    verdict,
)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([1.01, 1.2, 1.5], Verdict.MET),
        ([1.0, 1.0], Verdict.MET),  # on the bound clears "at least"
        ([0.7, 0.8, 0.99], Verdict.MISSED),
        ([0.9, 1.1], Verdict.INCONCLUSIVE),
        ([0.99, 1.0], Verdict.INCONCLUSIVE),  # the median clears it, one round does not
        ([], Verdict.NO_DATA),
        ([1.5], Verdict.INCONCLUSIVE),  # one round: no spread, no verdict
        ([0.5], Verdict.INCONCLUSIVE),
    ],
)
def test_higher_is_better_verdicts(values: list[float], expected: Verdict) -> None:
    assert verdict(values, 1.0, higher_is_better=True) is expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.5, 0.9, 1.0], Verdict.MET),  # on the bound clears "at most"
        ([1.01, 1.3], Verdict.MISSED),
        ([0.9, 1.01], Verdict.INCONCLUSIVE),
        ([], Verdict.NO_DATA),
    ],
)
def test_lower_is_better_verdicts(values: list[float], expected: Verdict) -> None:
    assert verdict(values, 1.0, higher_is_better=False) is expected


def test_ratios_are_paired_within_each_round_not_taken_from_medians() -> None:
    # HAProxy had a busy round 2; tproxy a busy round 3. Ratio of medians: 100/100 = 1.0,
    # but round by round tproxy was 10% behind every time.
    samples = {
        "tproxy-splice": {"conn_rate": [90.0, 45.0, 81.0]},
        "haproxy": {"conn_rate": [100.0, 50.0, 90.0]},
    }
    comparison = Comparison("conn_rate", "tproxy-splice", "haproxy", bound=1.0)
    assert per_round(samples, comparison) == pytest.approx([0.9, 0.9, 0.9])
    assert verdict(per_round(samples, comparison), 1.0, True) is Verdict.MISSED


def test_differences_and_values_per_round() -> None:
    samples = {
        "tproxy-splice": {"latency_p50": [120.0, 130.0], "idle_rss": [1.3, 1.5]},
        "haproxy": {"latency_p50": [118.0, 115.0]},
    }
    latency = Comparison("latency_p50", "tproxy-splice", "haproxy", Kind.DIFFERENCE, 10.0)
    assert per_round(samples, latency) == pytest.approx([2.0, 15.0])
    assert verdict(per_round(samples, latency), 10.0, False) is Verdict.INCONCLUSIVE
    rss = Comparison("idle_rss", "tproxy-splice", None, Kind.VALUE, 2.0)
    assert per_round(samples, rss) == [1.3, 1.5]
    assert verdict(per_round(samples, rss), 2.0, False) is Verdict.MET


def test_rounds_that_do_not_line_up_are_not_paired() -> None:
    samples = {"tproxy-splice": {"conn_rate": [1.0, 2.0]}, "haproxy": {"conn_rate": [1.0]}}
    comparison = Comparison("conn_rate", "tproxy-splice", "haproxy", bound=1.0)
    assert per_round(samples, comparison) == []
    assert "**no data**" in render_comparisons(samples, [comparison])[2]


def test_a_zero_denominator_leaves_that_round_out() -> None:
    samples = {"tproxy-splice": {"conn_rate": [1.0, 2.0]}, "haproxy": {"conn_rate": [0.0, 2.0]}}
    assert per_round(samples, Comparison("conn_rate", "tproxy-splice", "haproxy")) == [1.0]


def test_the_order_rotates_so_every_mode_leads_once() -> None:
    modes = ["a", "b", "c"]
    orders = [rotated(modes, r) for r in range(1, 5)]
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert {order[0] for order in orders[:3]} == set(modes)
    assert rotated([], 3) == []


def test_targets_name_known_modes_and_metrics() -> None:
    for target in TARGETS:
        assert target.subject in MODES
        assert target.versus is None or target.versus in MODES
        assert target.bound is not None


def test_rendered_rows_show_rounds_spread_bound_and_verdict() -> None:
    samples = {
        "tproxy-splice": {"stream1_up": [13.0, 14.0, 15.0]},
        "routing": {"stream1_up": [16.0, 16.0, 16.0]},
    }
    comparison = Comparison("stream1_up", "tproxy-splice", "routing", bound=0.8)
    row = render_comparisons(samples, [comparison])[2]
    assert row == (
        "| 1 stream up (client → server): tproxy-splice / routing | 0.812, 0.875, 0.938 | "
        "0.875 (0.812 to 0.938) | ≥ 0.8× | **met** |"
    )
    assert tally(samples, [comparison])[Verdict.MET] == 1


def test_informational_rows_have_no_verdict() -> None:
    samples = {"haproxy": {"conn_rate": [2.0]}, "haproxy-nolog": {"conn_rate": [3.0]}}
    row = render_comparisons(samples, [Comparison("conn_rate", "haproxy-nolog", "haproxy")])[2]
    assert row.endswith("| 1.500 (1 round) | — | — |")
    assert tally(samples, [Comparison("conn_rate", "haproxy-nolog", "haproxy")]) == dict.fromkeys(
        Verdict, 0
    )


def test_mode_table_marks_tests_a_mode_did_not_run() -> None:
    samples = {"routing": {"conn_rate": [100.0, 120.0]}, "haproxy-nolog": {}}
    lines = render_modes(samples)
    assert lines[0] == "| metric | routing | haproxy-nolog |"
    assert (
        lines[2]
        == "| new connections/s (HTTP, Connection: close) (conn/s) | 110 (100 to 120) | — |"
    )
    assert len(lines) == 3


def test_spread_formatting() -> None:
    assert render_spread([], 2) == "n/a"
    assert render_spread([1.234], 2) == "1.23 (1 round)"
    assert render_spread([3.0, 1.0, 2.0], 1) == "2.0 (1.0 to 3.0)"
