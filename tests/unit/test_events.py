from __future__ import annotations

import dataclasses
import io
import json

from hypothesis import given
from hypothesis import strategies as st

from tproxy.core.config import LogFormat
from tproxy.observability.eventlog import EventLog
from tproxy.observability.events import (
    Event,
    SessionClosed,
    SessionOpened,
    UpstreamConnected,
    parse_json_event,
    render_json,
)

CLOSE = SessionClosed(
    "01kbj9dq70102", "198.18.1.2:5000", "[2001:db8::1]:443", 10, 20, 0.5, "closed", 3, "splice", 25,
    "tls", "www.example.test", ["h2", "http/1.1"], "1.3", False, None, None, "out", "via",
    "198.18.2.9:1080", "/var/lib/tproxy/captures/x.pcapng", 16777216, ["log.py", "b.py:Fix"],
)  # fmt: skip


def _log(log_format: LogFormat) -> str:
    stream = io.StringIO()
    EventLog(log_format, stream, clock=lambda: 1_800_000_000.25).emit(CLOSE)
    return stream.getvalue()


def test_json_close_event_has_the_documented_fields() -> None:
    line = _log(LogFormat.JSON)
    assert line.endswith("\n") and line.count("\n") == 1
    record = json.loads(line)
    assert record == {
        "ts": "2027-01-15T08:00:00.250Z",
        "event": "session_close",
        "session": "01kbj9dq70102",
        "client": "198.18.1.2:5000",
        "dst": "[2001:db8::1]:443",
        "bytes_up": 10,
        "bytes_down": 20,
        "duration_s": 0.5,
        "reason": "closed",
        "active": 3,
        "relay": "splice",
        "spliced_bytes": 25,
        "proto": "tls",
        "sni": "www.example.test",
        "alpn": ["h2", "http/1.1"],
        "tls_offered": "1.3",
        "ech": False,
        "http_host": None,
        "http_method": None,
        "rule": "out",
        "action": "via",
        "upstream": "198.18.2.9:1080",
        "capture": "/var/lib/tproxy/captures/x.pcapng",
        "capture_truncated_at": 16777216,
        "addons": ["log.py", "b.py:Fix"],
        "tls_intercepted": None,
        "client_tls": None,
        "upstream_tls": None,
        "passthrough": None,
    }
    assert parse_json_event(record) == CLOSE


def test_text_line_is_one_readable_line() -> None:
    assert _log(LogFormat.TEXT) == (
        "2027-01-15T08:00:00.250Z session 01kbj9dq70102 closed (closed): 198.18.1.2:5000 -> "
        '[2001:db8::1]:443, up 10 B, down 20 B, 0.500 s, splice, tls sni="www.example.test" '
        'alpn="h2,http/1.1" offered 1.3, rule "out": via 198.18.2.9:1080, captured to '
        '"/var/lib/tproxy/captures/x.pcapng" (cut at 16777216 B), claimed by "log.py,b.py:Fix", '
        "3 active sessions\n"
    )


def test_unknown_events_are_not_parsed() -> None:
    assert parse_json_event({"event": "from_the_future"}) is None


texts = st.text(max_size=40)
counts = st.integers(min_value=0, max_value=2**63)
seconds = st.floats(min_value=0, max_value=1e9, allow_nan=False)


@given(
    st.one_of(
        st.builds(SessionOpened, texts, texts, texts, counts),
        st.builds(UpstreamConnected, texts, texts, texts, seconds),
        st.builds(
            SessionClosed,
            texts,
            texts,
            texts,
            counts,
            counts,
            seconds,
            texts,
            counts,
            st.one_of(st.none(), texts),
            counts,
            capture=st.one_of(st.none(), texts),
            capture_truncated_at=st.one_of(st.none(), counts),
        ),
    ),
    st.one_of(st.none(), st.integers(1, 64)),
)
def test_hand_rendered_json_equals_the_generic_rendering(event: Event, worker: int | None) -> None:
    parsed = json.loads(render_json(event, 1_800_000_000.0, worker))
    expected: dict[str, object] = {"ts": "2027-01-15T08:00:00.000Z", "event": event.name}
    if worker is not None:
        expected["worker"] = worker
    expected.update(dataclasses.asdict(event))
    assert parsed == expected
