from __future__ import annotations

import pytest

from tproxy.core.lifecycle import (
    Command,
    Direction,
    DirectionEnded,
    End,
    close_reason,
    decide,
)

UP, DOWN = Direction.UP, Direction.DOWN


@pytest.mark.parametrize(
    ("direction", "end", "command"),
    [
        (UP, End.EOF, Command.SHUTDOWN_UPSTREAM_WRITE),
        (DOWN, End.EOF, Command.SHUTDOWN_CLIENT_WRITE),
        (UP, End.SOURCE_RESET, Command.ABORT_BOTH),
        (DOWN, End.SOURCE_RESET, Command.ABORT_BOTH),
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
