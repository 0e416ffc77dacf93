from __future__ import annotations

import pytest

from tproxy.core.lifecycle import (
    Command,
    Direction,
    DirectionEnded,
    End,
    Timeouts,
    close_reason,
    decide,
    expired_reason,
)

UP, DOWN = Direction.UP, Direction.DOWN


@pytest.mark.parametrize(
    ("direction", "end", "command"),
    [
        (UP, End.EOF, Command.SHUTDOWN_UPSTREAM_WRITE),
        (DOWN, End.EOF, Command.SHUTDOWN_CLIENT_WRITE),
        (UP, End.SOURCE_RESET, Command.DRAIN_SINK_THEN_ABORT_BOTH),
        (DOWN, End.SOURCE_RESET, Command.DRAIN_SINK_THEN_ABORT_BOTH),
        (UP, End.SINK_RESET, Command.ABORT_BOTH),
        (DOWN, End.SINK_RESET, Command.ABORT_BOTH),
    ],
)
def test_every_cell_of_the_close_matrix(direction: Direction, end: End, command: Command) -> None:
    assert decide(DirectionEnded(direction, end)) is command


@pytest.mark.parametrize(
    ("ends", "reason"),
    [
        ([(UP, End.EOF), (DOWN, End.EOF)], "closed"),
        ([(DOWN, End.EOF), (UP, End.EOF)], "closed"),
        ([(UP, End.SOURCE_RESET)], "client_reset"),
        ([(DOWN, End.SINK_RESET)], "client_reset"),
        ([(DOWN, End.SOURCE_RESET)], "upstream_reset"),
        ([(UP, End.SINK_RESET)], "upstream_reset"),
        ([(UP, End.EOF), (DOWN, End.SOURCE_RESET)], "upstream_reset"),
    ],
)
def test_close_reason_names_who_reset(ends: list[tuple[Direction, End]], reason: str) -> None:
    assert close_reason([DirectionEnded(d, e) for d, e in ends]) == reason


LIMITS = Timeouts(idle_s=10, half_closed_s=3)


@pytest.mark.parametrize(
    ("last_activity_at", "half_closed_at", "now", "reason"),
    [
        (100, None, 105, None),
        (100, None, 110, "idle_timeout"),
        (100, 100, 102, None),
        (100, 100, 103, "half_closed_timeout"),
        # Half-closed, but the remaining direction is still talking: not silent.
        (108, 100, 110, None),
        (108, 100, 111, "half_closed_timeout"),
        # Half-closed before the last byte: the silence counts from the last byte.
        (100, 95, 102, None),
    ],
)
def test_timeouts(
    last_activity_at: float, half_closed_at: float | None, now: float, reason: str | None
) -> None:
    assert expired_reason(last_activity_at, half_closed_at, now, LIMITS) == reason
