"""`tproxy top`'s screen as a user reads it: totals with rates from two polls, one row per rule
(the default one named so), the busiest sessions first and as many as fit, client-controlled
text shown literally (never as rich markup or a terminal escape), and answers of any shape
drawn without an exception."""

from __future__ import annotations

import copy
import io
import json
import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from tproxy.observability.top_view import (
    Histogram,
    TopView,
    estimate_quantile,
    parse_sessions,
    parse_stats,
)

HOSTILE_SNI = "[bold]x[/bold]\x1b[2J\n"


def stats_answer(**changes: Any) -> dict[str, Any]:
    answer: dict[str, Any] = {
        "ok": True,
        "version": "0.1.0",
        "uptime_s": 3723.4,
        "workers": {"running": 2, "restarts": 1},
        "active": 3,
        "opened": 120,
        "bytes_up": 10_000,
        "bytes_down": 2_000_000,
        "closed": [
            {"reason": "closed", "action": "allow", "rule": "web", "proto": "tls", "count": 10},
            {
                "reason": "client_reset",
                "action": "allow",
                "rule": "web",
                "proto": "tls",
                "count": 2,
            },
            {"reason": "policy_reset", "action": "reset", "rule": None, "proto": None, "count": 5},
        ],
        "rule_bytes": [
            {"rule": "web", "bytes_up": 9_000, "bytes_down": 1_900_000},
            {"rule": None, "bytes_up": 1_000, "bytes_down": 100_000},
        ],
        "refused": {"max_connections": 0, "per_client_connections": 2},
        "sniffs": {"tls": 3, "silent": 1},
        "captures": 4,
        "capture_failures": 1,
        "addon_errors": [{"addon": "x", "hook": "client_data", "count": 1}],
        "connect": {
            "bounds_s": [0.0005, 0.001, 0.005, 0.01],
            "counts": [10, 50, 30, 9, 1],
            "sum_s": 0.3,
            "count": 100,
        },
    }
    answer.update(changes)
    return answer


def session(
    number: int, up: int, down: int, *, sni: str | None = "example.com", rule: str | None = "web"
) -> dict[str, Any]:
    return {
        "id": f"01kbj9dq7010{number}",
        "client": f"198.18.0.2:{40000 + number}",
        "dst": "198.19.0.2:443",
        "sni": sni,
        "rule": rule,
        "relay": "splice",
        "bytes_up": up,
        "bytes_down": down,
        "age_s": 75.0,
        "idle_s": 1.0,
    }


def sessions_answer(
    *per_worker: list[dict[str, Any]],
    missing: list[int] | None = None,
) -> dict[str, Any]:
    return {
        "ok": True,
        "workers": [
            {
                "worker": i + 1,
                "pid": 100 + i,
                "active": len(listed),
                "truncated": False,
                "sessions": listed,
            }
            for i, listed in enumerate(per_worker)
        ],
        "missing": missing or [],
    }


def screen(view: TopView, height: int = 40, width: int = 160) -> str:
    console = Console(record=True, width=width, height=height, file=io.StringIO())
    console.print(view.render(height, width))
    return console.export_text()


def line_with(text: str, start: str) -> str:
    """The one line that starts with `start`, or contains it if none starts with it."""
    lines = text.splitlines()
    [line] = [line for line in lines if line.startswith(start)] or [
        line for line in lines if start in line
    ]
    return line


def two_polls() -> TopView:
    view = TopView()
    view.update(
        10.0,
        stats_answer(),
        sessions_answer(
            [session(1, 100, 200), session(2, 1000, 50_000)],
            [session(3, 5, 5, sni=None, rule=None)],
            missing=[3],
        ),
    )
    # Two seconds later: 20 more sessions, 4 KiB more up, 1 MiB more down; session 1 moved
    # 10 KiB in the meantime, session 2 nothing, session 3 is gone and session 4 is new.
    view.update(
        12.0,
        stats_answer(opened=140, bytes_up=14_096, bytes_down=3_048_576),
        sessions_answer(
            [session(1, 100, 10_440), session(2, 1000, 50_000)],
            [session(4, 3000, 0, sni=HOSTILE_SNI, rule=None)],
            missing=[3],
        ),
    )
    return view


def test_the_totals_show_rates_between_the_last_two_polls() -> None:
    text = screen(two_polls())
    assert "tproxy 0.1.0" in text and "up 1h02m" in text, text
    assert "workers 2 running, 1 restarted" in text, text
    assert re.search(r"3 live +10\.0/s new +140 opened +17 closed, 7 not clean", text), text
    bytes_line = line_with(text, "bytes")
    assert "up 13.8 KiB (2.0 KiB/s)" in bytes_line, bytes_line
    assert "down 2.9 MiB (512.0 KiB/s)" in bytes_line, bytes_line
    assert "refused   2: per_client_connections 2" in text, text
    assert "sniffed   4: tls 3, silent 1" in text, text
    assert "1 error (x client_data 1)   captures 4, 1 failed" in text, text


def test_the_first_poll_has_no_rates_yet() -> None:
    view = TopView()
    view.update(1.0, stats_answer(), sessions_answer([session(1, 1, 2)]))
    text = screen(view)
    assert "-/s new" in text and "(-/s)" in text, text


def test_connect_times_are_estimated_from_the_buckets() -> None:
    # 100 connects: 10 under 0.5 ms, 50 in 0.5-1 ms, 30 in 1-5 ms, 9 in 5-10 ms, 1 above.
    connect_line = line_with(screen(two_polls()), "connect")
    assert "mean 3.00 ms" in connect_line, connect_line
    assert "p50 0.90 ms" in connect_line, connect_line  # 0.5 + 0.5 * 40/50
    assert "p99 10.0 ms" in connect_line, connect_line
    assert "(100 connects since start)" in connect_line, connect_line


def test_a_quantile_in_the_inf_bucket_is_a_lower_bound() -> None:
    histogram = Histogram(bounds_s=(0.001, 0.01), counts=(1, 0, 9), sum_s=1.0, count=10)
    assert estimate_quantile(histogram, 0.5) == (0.01, True)
    assert estimate_quantile(histogram, 0.05) == (0.0005, False)
    assert estimate_quantile(Histogram((0.001,), (0, 0), 0.0, 0), 0.5) is None
    line = line_with(
        screen(
            _with_stats(
                connect={"bounds_s": [0.001, 0.01], "counts": [1, 0, 9], "sum_s": 1.0, "count": 10}
            )
        ),
        "connect",
    )
    assert "p50 >10.0 ms" in line, line


def _with_stats(**changes: Any) -> TopView:
    view = TopView()
    view.update(1.0, stats_answer(**changes), sessions_answer())
    return view


def test_one_row_per_rule_with_live_closed_and_not_clean_sessions() -> None:
    text = screen(two_polls())
    web = line_with(text, "web ").split()
    default = line_with(text, "(default) ").split()
    # RULE LIVE CLOSED NOT-CLEAN UP DOWN: web has 2 live (sessions 1 and 2), 12 closed of which
    # 2 were reset; the default 1 live (session 4), 5 closed, all reset by the policy.
    assert web[:4] == ["web", "2", "12", "2"], web
    assert " ".join(web[4:]) == "8.8 KiB 1.8 MiB", web
    assert default[:4] == ["(default)", "1", "5", "5"], default
    rules = [line.split()[0] for line in text.splitlines() if line.startswith(("web", "(def"))]
    assert rules == ["web", "(default)"], rules  # the most bytes first


def test_the_busiest_sessions_since_the_previous_poll_come_first() -> None:
    text = screen(two_polls())
    ids = re.findall(r"^01kbj9dq7010\d", text, re.MULTILINE)
    # Session 1 moved 10,240 bytes since the poll before, session 4 (new) 3,000, session 2
    # none, though it moved the most bytes in all.
    assert ids == ["01kbj9dq70101", "01kbj9dq70104", "01kbj9dq70102"], text
    first = line_with(text, "01kbj9dq70101")
    assert "5.0 KiB/s" in first and "1m15s" in first and "example.com" in first, first
    assert "0 B/s" in line_with(text, "01kbj9dq70102"), text


def test_before_a_second_poll_the_sessions_with_the_most_bytes_come_first() -> None:
    view = TopView()
    view.update(
        1.0,
        stats_answer(),
        sessions_answer([session(1, 10, 10), session(2, 99, 99)], [session(3, 50, 50)]),
    )
    ids = re.findall(r"^01kbj9dq7010\d", screen(view), re.MULTILINE)
    assert ids == ["01kbj9dq70102", "01kbj9dq70103", "01kbj9dq70101"], ids


def test_client_controlled_text_is_shown_literally_and_escaped() -> None:
    view = TopView()
    view.update(
        1.0,
        stats_answer(rule_bytes=[{"rule": "[red]r\x07", "bytes_up": 1, "bytes_down": 2}]),
        sessions_answer([session(1, 1, 1, sni=HOSTILE_SNI, rule="[red]r\x07")]),
    )
    console = Console(record=True, width=160, height=40, file=io.StringIO(), force_terminal=True)
    console.print(view.render(40, 160))
    text = console.export_text()
    assert "[bold]x[/bold]\\x1b[2J\\x0a" in text, text  # as sent, escaped, not bold
    assert "[red]r\\x07" in text, text
    raw = console.export_text(styles=True)
    assert "\x1b[2J" not in raw and "\x07" not in raw, repr(raw)
    # Read as markup, "[bold]x[/bold]" would have drawn an "x" of its own, in bold.
    lines = console.render_lines(view.render(40, 160), pad=False)
    assert not [segment for line in lines for segment in line if segment.text == "x"]


def test_the_sessions_shown_are_as_many_as_fit_the_height() -> None:
    view = TopView()
    view.update(1.0, stats_answer(), sessions_answer([session(i, i * 100, 0) for i in range(50)]))
    for height in (15, 24, 40):
        text = screen(view, height=height)
        assert len(text.splitlines()) <= height, (height, text)
        shown = len(re.findall(r"^01kbj9dq7010", text, re.MULTILINE))
        assert shown > 0 and f"the busiest {shown} of 50 sessions shown" in text, text
    assert len(screen(view, height=40).splitlines()) == 40
    # Too small for any session: the totals and the headers still come, no negative slicing.
    tiny = screen(view, height=5)
    assert "01kbj9dq" not in tiny and "the busiest 0 of 50" in tiny, tiny


def test_a_narrow_screen_keeps_each_row_on_one_line() -> None:
    view = two_polls()
    for width in (60, 80, 100, 120):
        text = screen(view, width=width)
        ids = re.findall(r"^01kbj9dq7010\d", text, re.MULTILINE)
        assert len(ids) == 3, (width, text)
        assert all(len(line) <= width for line in text.splitlines()), (width, text)


def test_missing_workers_truncated_listings_and_errors_are_said() -> None:
    view = two_polls()
    listing = sessions_answer([session(1, 1, 1)], missing=[2])
    listing["workers"][0].update(truncated=True, active=5000)
    view.update(14.0, None, listing, ["stats: the running tproxy says: unknown command 'stats'"])
    text = screen(view)
    assert "workers that did not answer: 2" in text, text
    assert "worker 1: 5000 live, 1 listed" in text, text
    assert "unknown command 'stats' (the totals shown are 2s old)" in text, text
    assert "q quits" in text.splitlines()[-1], text


def test_an_answer_without_what_it_should_have_shows_dashes() -> None:
    view = TopView()
    view.update(1.0, {"ok": True}, {"ok": True})
    text = screen(view)
    assert "tproxy -   up -   workers - running, - restarted" in text, text
    assert "0 live   -/s new   - opened   0 closed, 0 not clean" in text, text
    assert "connect   -" in text, text


def test_fields_of_the_wrong_type_are_left_out() -> None:
    stats = parse_stats(
        stats_answer(
            active="3",
            opened=True,
            bytes_up=-1,
            bytes_down=2**70,
            uptime_s=float("nan"),
            workers=[1, 2],
            closed=[{"reason": "closed", "count": "9"}, "x", {"count": 2}],
            refused={"a": 1, "b": None},
            rule_bytes={"rule": "web"},
            connect={"bounds_s": [0.1, 0.01], "counts": [1, 2, 3]},
        )
    )
    assert (stats.active, stats.opened, stats.bytes_up, stats.bytes_down) == (None,) * 4
    assert stats.uptime_s is None and stats.workers_running is None
    assert [(c.reason, c.count) for c in stats.closed] == [("None", 2)]
    assert stats.refused == {"a": 1} and stats.rule_bytes == {} and stats.connect is None
    listing = parse_sessions(
        {"workers": [{"worker": 1, "sessions": [{"bytes_up": "x"}, 7]}], "missing": "2"}
    )
    assert [(s.id, s.bytes_up, s.rule) for s in listing.sessions] == [("None", 0, None)]
    assert listing.missing == ()


def test_counters_that_went_down_give_no_rate() -> None:
    view = TopView()
    view.update(1.0, stats_answer(), sessions_answer())
    view.update(2.0, stats_answer(opened=1, bytes_up=1, bytes_down=1), sessions_answer())
    assert (view.rates.opened, view.rates.bytes_up, view.rates.bytes_down) == (None,) * 3


# Anything a JSON answer could hold, as the top level and nested where the answers have
# objects and lists.
_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_STATS_KEYS = list(stats_answer())
_SESSION_KEYS = list(session(1, 1, 1))


def _shaped_like(keys: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys), _JSON, max_size=len(keys))


_STATS = (
    _JSON
    | _shaped_like(_STATS_KEYS)
    | st.builds(
        lambda base, junk: {**base, **junk}, st.just(stats_answer()), _shaped_like(_STATS_KEYS)
    )
)
_SESSIONS = _JSON | st.builds(
    lambda sessions, missing, worker: {
        "workers": [{"worker": worker, "sessions": sessions}],
        "missing": missing,
    },
    st.lists(_shaped_like(_SESSION_KEYS) | _JSON, max_size=5),
    _JSON,
    _JSON,
)


@settings(max_examples=300, deadline=None)
@given(
    polls=st.lists(st.tuples(_STATS, _SESSIONS), min_size=1, max_size=3),
    height=st.integers(0, 50),
    width=st.integers(20, 200),
)
def test_no_answer_makes_the_screen_fail(
    polls: list[tuple[Any, Any]], height: int, width: int
) -> None:
    view = TopView()
    for at, (stats, sessions) in enumerate(polls):
        view.update(float(at), copy.deepcopy(stats), copy.deepcopy(sessions), ["e\udc80[b]"])
    console = Console(width=width, height=max(height, 1), file=io.StringIO())
    console.print(view.render(height, width))


def test_a_lone_surrogate_is_escaped_not_fatal() -> None:
    answer = json.loads('{"workers": [{"worker": 1, "sessions": [{"id": "a", "sni": "\\ud800"}]}]}')
    view = TopView()
    view.update(1.0, None, answer)
    assert "\\xed\\xa0\\x80" in screen(view)
