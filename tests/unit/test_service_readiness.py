"""What the supervisor tells systemd (pure): READY=1 once every worker has said it serves,
WATCHDOG=1 at the asked rate and only while every worker answers, STATUS= when it changes (at
most once a second), STOPPING=1 once at the first stop signal, then the drain's status."""

from __future__ import annotations

from tproxy.core.worker_protocol import Heartbeat, Watchdog
from tproxy.service.readiness import ServiceNotes


def _beats(*actives: int) -> dict[int, Heartbeat]:
    return {i: Heartbeat(i, 100 + i, active, 10, 0, 0) for i, active in enumerate(actives, 1)}


def test_ready_only_once_every_worker_has_beaten_then_never_again() -> None:
    notes = ServiceNotes(2, watchdog_every_s=None)
    assert (
        notes.tick(0.0, _beats(0), answering=False)
        == b"STATUS=1 workers, 0 active sessions, 10 since start"
    )
    assert notes.tick(0.1, _beats(0, 0), answering=True) == (
        b"READY=1\nSTATUS=2 workers, 0 active sessions, 20 since start"
    )
    assert notes.tick(5.0, _beats(0, 0), answering=True) == b""  # nothing changed
    assert b"READY" not in notes.tick(9.0, _beats(3, 0), answering=True)


def test_the_watchdog_is_fed_at_its_rate_only_while_every_worker_answers() -> None:
    notes = ServiceNotes(2, watchdog_every_s=1.0)
    sent = []
    for tenth in range(0, 100):  # 10 s in ticks of 0.1 s; workers 2 silent from 4 s to 7 s
        now = tenth / 10
        answering = not 4.0 <= now < 7.0
        if b"WATCHDOG=1" in notes.tick(now, _beats(0, 0), answering):
            sent.append(now)
    assert sent == [0.0, 1.0, 2.0, 3.0, 7.0, 8.0, 9.0]


def test_no_watchdog_before_ready_nor_after_stopping() -> None:
    notes = ServiceNotes(2, watchdog_every_s=1.0)
    assert b"WATCHDOG" not in notes.tick(0.0, _beats(0), answering=True)
    assert b"WATCHDOG=1" in notes.tick(0.5, _beats(0, 0), answering=True)
    assert notes.stop(1.0, _beats(4, 1)) == b"STOPPING=1\nSTATUS=draining: 5 active sessions"
    assert notes.stop(1.1, _beats(4, 1)) == b""  # once
    assert notes.tick(3.0, _beats(1, 0), answering=True) == b"STATUS=draining: 1 active sessions"
    assert notes.tick(3.5, _beats(0, 0), answering=True) == b""  # within the second


def test_the_status_is_sent_when_it_changes_at_most_once_a_second() -> None:
    notes = ServiceNotes(1, watchdog_every_s=None)
    assert notes.tick(0.0, _beats(0), True).startswith(b"READY=1\nSTATUS=")
    assert notes.tick(0.5, _beats(7), True) == b""
    assert (
        notes.tick(1.0, _beats(7), True) == b"STATUS=1 workers, 7 active sessions, 10 since start"
    )


def test_answering_means_every_worker_running_and_heard_within_the_stall_limit() -> None:
    watchdog = Watchdog(stall_after_s=3.0)
    watchdog.started(1, 0.0)
    assert not watchdog.answering(0.5, workers=2)  # one of two running
    watchdog.started(2, 0.0)
    assert watchdog.answering(0.5, workers=2)
    watchdog.heard(1, 2.0)
    assert not watchdog.answering(3.5, workers=2)  # worker 2 silent for 3.5 s
    watchdog.heard(2, 3.6)
    assert watchdog.answering(3.7, workers=2)
    watchdog.forget(2)  # died: restarting
    assert not watchdog.answering(3.8, workers=2)
