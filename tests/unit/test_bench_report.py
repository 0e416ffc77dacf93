from __future__ import annotations

import pytest
from bench.report import (
    ADDON_CONTEXT,
    ADDON_TARGETS,
    INTERCEPT_CONTEXT,
    INTERCEPT_TARGETS,
    MODES,
    POLICY_TARGETS,
    TARGETS,
    Comparison,
    Kind,
    Relays,
    Spread,
    Verdict,
    judge,
    own_spread,
    per_round,
    render_comparisons,
    render_modes,
    render_relays,
    render_spread,
    rotated,
    tally,
    unchanged_verdict,
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


def test_the_policy_targets_name_known_modes_and_are_all_judged() -> None:
    for target in POLICY_TARGETS:
        assert target.subject == "tproxy-policy" and target.versus == "tproxy-splice"
        assert target.bound is not None or target.kind is Kind.UNCHANGED
    cpu = POLICY_TARGETS[0]
    assert (cpu.metric, cpu.kind, cpu.bound) == ("cpu_per_conn", Kind.DIFFERENCE, 10.0)


def test_cpu_per_connection_difference_is_judged_round_by_round() -> None:
    samples = {
        "tproxy-policy": {"cpu_per_conn": [160.0, 171.5, 158.0]},
        "tproxy-splice": {"cpu_per_conn": [152.0, 160.0, 150.5]},
    }
    row = render_comparisons(samples, [POLICY_TARGETS[0]])[2]
    assert row == (
        "| proxy CPU per connection (HTTP, Connection: close): tproxy-policy minus tproxy-splice "
        "| 8.0, 11.5, 7.5 | 8.0 (7.5 to 11.5) | ≤ 10 µs | **inconclusive** |"
    )
    samples["tproxy-policy"]["cpu_per_conn"] = [160.0, 165.0, 158.0]
    assert tally(samples, POLICY_TARGETS[:1])[Verdict.MET] == 1


@pytest.mark.parametrize(
    ("ratios", "expected"),
    [
        ([0.98, 1.03, 1.0, 0.97], Verdict.MET),  # both sides of 1, median 0.99 in the band
        ([0.95, 1.0], Verdict.MET),  # a round on 1.0 counts as both sides
        ([0.80, 0.85, 0.82], Verdict.MISSED),  # always slower, and by more than the noise
        ([1.20, 1.25], Verdict.MISSED),  # always faster counts as changed too
        ([0.97, 0.98, 0.99], Verdict.INCONCLUSIVE),  # one side, but within the noise
        ([0.80, 0.82, 1.01], Verdict.INCONCLUSIVE),  # both sides, median outside the band
        ([1.0], Verdict.INCONCLUSIVE),  # one round decides nothing
        ([], Verdict.NO_DATA),
    ],
)
def test_unchanged_within_the_spread(ratios: list[float], expected: Verdict) -> None:
    assert unchanged_verdict(ratios, Spread(1.0, 0.95, 1.05)) is expected


def test_unchanged_without_a_reference_spread_has_no_data() -> None:
    assert unchanged_verdict([0.9, 1.1], None) is Verdict.NO_DATA


def test_the_reference_spread_is_the_versus_modes_own_over_its_median() -> None:
    samples = {
        "tproxy-policy": {"stream1_up": [11.0, 12.5, 12.0]},
        "tproxy-splice": {"stream1_up": [12.0, 11.0, 13.2]},
    }
    comparison = POLICY_TARGETS[1]
    band = own_spread(samples, comparison)
    assert band is not None
    assert (band.low, band.high) == pytest.approx((11.0 / 12.0, 13.2 / 12.0))
    # ratios 0.917, 1.136, 0.909: both sides of 1, median 0.917 within 0.917-1.1
    assert per_round(samples, comparison) == pytest.approx([11 / 12, 12.5 / 11, 12 / 13.2])
    row = render_comparisons(samples, [comparison])[2]
    assert row == (
        "| 1 stream up (client → server): tproxy-policy / tproxy-splice | 0.917, 1.136, 0.909 | "
        "0.917 (0.909 to 1.136) | unchanged: rounds on both sides of 1, median within "
        "tproxy-splice's spread (0.917 to 1.100) | **met** |"
    )
    one_round = {m: {"stream1_up": v["stream1_up"][:1]} for m, v in samples.items()}
    assert own_spread(one_round, comparison) is None
    assert judge(one_round, comparison) is Verdict.NO_DATA


def test_cpu_per_connection_shows_a_decimal_in_the_mode_table() -> None:
    lines = render_modes({"tproxy-splice": {"cpu_per_conn": [150.04, 152.66]}})
    assert lines[2] == (
        "| proxy CPU per connection (HTTP, Connection: close) (µs) | 151.3 (150.0 to 152.7) |"
    )


def test_the_addon_target_is_cpu_per_connection_within_5_us_of_tproxy_splice() -> None:
    assert [(t.metric, t.subject, t.versus, t.kind, t.bound) for t in ADDON_TARGETS] == [
        ("cpu_per_conn", "tproxy-addon", "tproxy-splice", Kind.DIFFERENCE, 5.0)
    ]
    samples = {
        "tproxy-addon": {"cpu_per_conn": [151.0, 153.5, 150.0]},
        "tproxy-splice": {"cpu_per_conn": [150.0, 150.0, 149.0]},
    }
    row = render_comparisons(samples, ADDON_TARGETS)[2]
    assert row == (
        "| proxy CPU per connection (HTTP, Connection: close): tproxy-addon minus tproxy-splice "
        "| 1.0, 3.5, 1.0 | 1.0 (1.0 to 3.5) | ≤ 5 µs | **met** |"
    )
    samples["tproxy-addon"]["cpu_per_conn"] = [151.0, 156.0, 150.0]  # one round 6 µs over
    assert judge(samples, ADDON_TARGETS[0]) is Verdict.INCONCLUSIVE
    samples["tproxy-addon"]["cpu_per_conn"] = [156.0, 157.0, 154.5]  # every round over
    assert tally(samples, ADDON_TARGETS)[Verdict.MISSED] == 1


def test_the_addon_rows_without_a_target() -> None:
    for row in ADDON_CONTEXT:
        assert row.bound is None and row.kind in (Kind.RATIO, Kind.DIFFERENCE)
        assert row.subject in MODES and row.versus in MODES
    # The unclaimed addon against tproxy-splice, the identity addon against the copy relay.
    assert {(r.subject, r.versus) for r in ADDON_CONTEXT} == {
        ("tproxy-addon", "tproxy-splice"), ("tproxy-addon-identity", "tproxy-copy")
    }  # fmt: skip
    identity = [r for r in ADDON_CONTEXT if r.subject == "tproxy-addon-identity"]
    assert [(r.metric, r.kind) for r in identity] == [
        ("stream1_up", Kind.RATIO), ("stream1_down", Kind.RATIO), ("cpu_per_gib", Kind.RATIO),
        ("cpu_per_gib", Kind.DIFFERENCE),
    ]  # fmt: skip
    samples = {
        "tproxy-addon-identity": {"stream1_down": [2.0, 2.5], "cpu_per_gib": [9.0, 8.0]},
        "tproxy-copy": {"stream1_down": [4.0, 5.0], "cpu_per_gib": [3.0, 3.5]},
    }
    rows = render_comparisons(samples, identity)
    assert rows[3] == (
        "| 1 stream down (server → client): tproxy-addon-identity / tproxy-copy | 0.500, 0.500 "
        "| 0.500 (0.500 to 0.500) | — | — |"
    )
    assert rows[5] == (
        "| proxy CPU per GiB relayed: tproxy-addon-identity minus tproxy-copy | 6.00, 4.50 | "
        "5.25 (4.50 to 6.00) | — | — |"
    )


def test_relays_count_close_events_and_the_share_of_bytes_spliced() -> None:
    found = Relays()
    for relay, up, down, spliced in [("splice", 100, 1 << 30, 1 << 30), ("splice", 10, 0, 0),
                                     (None, 0, 0, 0)]:  # fmt: skip
        found.add({"relay": relay, "bytes_up": up, "bytes_down": down, "spliced_bytes": spliced})
    assert found.closes == {"splice": 2, "none": 1}
    assert found.describe() == "none 1, splice 2 (100.0% of 1.00 GiB spliced)"
    claimed = Relays({"addon": 4}, bytes_moved=3 << 30)
    assert claimed.describe() == "addon 4 (0.0% of 3.00 GiB spliced)"
    assert Relays().describe() == "no close events"
    lines = render_relays({"tproxy-addon-identity": [claimed, claimed], "tproxy-copy": []})
    assert lines[2] == (
        "| tproxy-addon-identity | addon 4 (0.0% of 3.00 GiB spliced); addon 4 (0.0% of 3.00 GiB "
        "spliced) |"
    )
    assert lines[3] == "| tproxy-copy | n/a |"


def test_the_interception_targets_are_ten_times_mitmproxys_rates_in_every_round() -> None:
    assert [(t.metric, t.subject, t.versus, t.kind, t.bound) for t in INTERCEPT_TARGETS] == [
        ("tls_conn_rate", "tproxy-intercept", "mitmproxy", Kind.RATIO, 10.0),
        ("tls_keepalive_rps", "tproxy-intercept", "mitmproxy", Kind.RATIO, 10.0),
    ]
    samples = {
        "tproxy-intercept": {"tls_conn_rate": [600.0, 560.0, 620.0],
                             "tls_keepalive_rps": [17000.0, 16000.0, 18000.0]},
        "mitmproxy": {"tls_conn_rate": [150.0, 140.0, 40.0],
                      "tls_keepalive_rps": [700.0, 800.0, 720.0]},
    }  # fmt: skip
    rows = render_comparisons(samples, INTERCEPT_TARGETS)
    assert rows[2] == (
        "| new HTTPS connections/s (Connection: close): tproxy-intercept / mitmproxy | 4.000, "
        "4.000, 15.500 | 4.000 (4.000 to 15.500) | ≥ 10× | **inconclusive** |"
    )
    assert rows[3].endswith("| ≥ 10× | **met** |")
    samples["mitmproxy"]["tls_conn_rate"] = [150.0, 140.0, 150.0]
    assert tally(samples, INTERCEPT_TARGETS) == {
        Verdict.MET: 1, Verdict.MISSED: 1, Verdict.INCONCLUSIVE: 0, Verdict.NO_DATA: 0
    }  # fmt: skip


def test_the_interception_rows_without_a_target() -> None:
    for row in INTERCEPT_CONTEXT:
        assert row.bound is None and row.subject == "tproxy-intercept"
        assert row.versus in ("mitmproxy", "tproxy-tls-passthrough")
    # What interception adds to the same HTTPS passed through, per connection and per request.
    added = [r for r in INTERCEPT_CONTEXT if r.kind is Kind.DIFFERENCE]
    assert [(r.metric, r.versus) for r in added] == [
        ("tls_cpu_per_conn", "tproxy-tls-passthrough"),
        ("tls_cpu_per_request", "tproxy-tls-passthrough"),
    ]
    samples = {
        "tproxy-intercept": {"tls_cpu_per_conn": [1032.4, 1010.0]},
        "tproxy-tls-passthrough": {"tls_cpu_per_conn": [296.0, 300.2]},
    }
    assert render_comparisons(samples, added[:1])[2] == (
        "| proxy CPU per HTTPS connection (Connection: close): tproxy-intercept minus "
        "tproxy-tls-passthrough | 736, 710 | 723 (710 to 736) | — | — |"
    )


def test_https_rates_and_cpu_show_whole_numbers_in_the_mode_table() -> None:
    samples = {"mitmproxy": {"tls_keepalive_rps": [729.4, 731.0],
                             "tls_cpu_per_request": [881.7, 870.2],
                             "tls_rss": [95.5, 96.25]}}  # fmt: skip
    lines = render_modes(samples)
    assert lines[2:] == [
        "| HTTPS requests/s on 32 keep-alive connections (req/s) | 730 (729 to 731) |",
        "| proxy CPU per HTTPS request (keep-alive) (µs) | 876 (870 to 882) |",
        "| proxy RSS after the HTTPS tests (all its processes) (MiB) | 95.88 (95.50 to 96.25) |",
    ]
