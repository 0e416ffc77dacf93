"""`tproxy sessions`' table: every worker's sessions, oldest first, sizes readable, what a
client controls (the SNI) escaped, and what is missing or cut said."""

from __future__ import annotations

from tproxy.observability.session_table import render_sessions


def _session(id_: str, sni: str | None, up: int) -> dict[str, object]:
    return {"id": id_, "client": "198.18.1.2:40000", "dst": "198.18.2.2:443", "sni": sni,
            "rule": "inspect", "relay": "splice", "bytes_up": up, "bytes_down": 3 << 20,
            "age_s": 12.4, "idle_s": 0.2}  # fmt: skip


def test_the_table_lists_every_workers_sessions_oldest_first() -> None:
    answer = {
        "workers": [
            {"worker": 2, "sessions": [_session("0b", "www.example.test", 100)], "active": 1},
            {"worker": 1, "sessions": [_session("0a", None, 2048)], "active": 1},
        ],
        "missing": [],
    }
    lines = render_sessions(answer).splitlines()
    assert lines[0].split() == ["ID", "W", "CLIENT", "DESTINATION", "SNI", "RULE", "RELAY", "UP",
                                "DOWN", "AGE", "IDLE"]  # fmt: skip
    assert lines[1].split() == ["0a", "1", "198.18.1.2:40000", "198.18.2.2:443", "-", "inspect",
                                "splice", "2.0KiB", "3.0MiB", "12s", "0s"]  # fmt: skip
    assert lines[2].split()[4] == "www.example.test"
    assert lines[-1] == "2 live sessions"


def test_client_controlled_text_is_escaped_and_gaps_are_said() -> None:
    answer = {
        "workers": [
            {
                "worker": 1,
                "sessions": [_session("0a", "evil\x1b[2J.test", 1)],
                "active": 1500,
                "truncated": True,
            }
        ],
        "missing": [2],
    }
    text = render_sessions(answer)
    assert "\x1b" not in text and "evil\\x1b[2J.test" in text
    assert "worker 1: 1500 live, 1 listed" in text
    assert "workers that did not answer: [2]" in text
