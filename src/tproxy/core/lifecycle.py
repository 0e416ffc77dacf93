"""The close lifecycle of a session: how one direction ending decides what happens to the other.

Theory of operation
-------------------
A session is two directions: *up* (client → upstream) and *down* (upstream → client). Each direction
is a pump that reads its source and writes its sink until it stops for one of three reasons:

* ``EOF``: the source sent FIN and every byte read from it has been written to the sink;
* ``SOURCE_RESET``: reading the source failed (the peer sent RST, or the socket broke);
* ``SINK_RESET``: writing the sink failed (the sink's peer sent RST or is gone).

What the session does next, per cell (``pending`` means bytes read but not yet written):

==================  ==============================  ===========================================
direction ends      with                            the session
==================  ==============================  ===========================================
up, EOF             client FIN, nothing pending     shutdown(SHUT_WR) upstream; down goes on
down, EOF           upstream FIN, nothing pending   shutdown(SHUT_WR) client; up goes on
up, SOURCE_RESET    client RST                      wait until the upstream has acknowledged
                                                    every byte written to it (while it makes
                                                    progress), then abort it; down is cancelled
down, SOURCE_RESET  upstream RST                    wait until the client has acknowledged
                                                    every byte written to it (while it makes
                                                    progress), then abort it; up is cancelled
up, SINK_RESET      upstream gone while writing     abort both; pending bytes are lost with
                                                    the upstream that refused them
down, SINK_RESET    client gone while writing       abort both
==================  ==============================  ===========================================

An EOF is only reported once the pump's buffer is empty, so a FIN is never passed on ahead of data:
that is what makes "half-close" safe. An abort closes with SO_LINGER {1, 0} so the peer sees a
reset, never a clean FIN that would make a truncated transfer look complete. An abort also throws
away whatever the kernel has not yet sent from the socket's send queue, which is why a reset that
came *from the source* first waits for the sink's queue to be acknowledged: the peer then reads
every byte the source sent before its reset, and the reset after them. The session is over when
both directions have ended (two EOFs: a clean close) or at the first reset.

Timeouts are decided here too (`expired_reason`): a session with no byte either way for the idle
timeout is cut, and so is one that is half-closed (one direction finished) and silent for the
half-closed timeout, so a peer that never sends its FIN cannot hold a session forever.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from tproxy.core.reasons import CloseReason


class Direction(enum.Enum):
    UP = "up"  # client -> upstream
    DOWN = "down"  # upstream -> client


class End(enum.Enum):
    EOF = "eof"
    SOURCE_RESET = "source_reset"
    SINK_RESET = "sink_reset"


class Command(enum.Enum):
    SHUTDOWN_UPSTREAM_WRITE = "shutdown_upstream_write"
    SHUTDOWN_CLIENT_WRITE = "shutdown_client_write"
    DRAIN_SINK_THEN_ABORT_BOTH = "drain_sink_then_abort_both"
    ABORT_BOTH = "abort_both"


@dataclass(frozen=True, slots=True)
class DirectionEnded:
    direction: Direction
    end: End


def decide(ended: DirectionEnded) -> Command:
    """What the session does when one direction ends (the table in this module's docstring)."""
    if ended.end is End.EOF:
        if ended.direction is Direction.UP:
            return Command.SHUTDOWN_UPSTREAM_WRITE
        return Command.SHUTDOWN_CLIENT_WRITE
    if ended.end is End.SOURCE_RESET:
        return Command.DRAIN_SINK_THEN_ABORT_BOTH
    return Command.ABORT_BOTH


def close_reason(ends: list[DirectionEnded]) -> CloseReason:
    """The `reason` logged on session close, from the directions' ends in the order they came.

    `closed` is a clean close both ways; otherwise the first reset names who caused it.
    """
    for ended in ends:
        if ended.end is End.EOF:
            continue
        client_side = (ended.direction is Direction.UP) == (ended.end is End.SOURCE_RESET)
        return CloseReason.CLIENT_RESET if client_side else CloseReason.UPSTREAM_RESET
    return CloseReason.CLOSED


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Session timeouts in seconds (see `expired_reason`)."""

    idle_s: float
    half_closed_s: float


def expired_reason(
    last_activity_at: float, half_closed_at: float | None, now: float, timeouts: Timeouts
) -> CloseReason | None:
    """Why a session must be cut now, or None: `idle_timeout` or `half_closed_timeout`."""
    silent_s = now - last_activity_at
    if half_closed_at is not None and now - max(half_closed_at, last_activity_at) >= (
        timeouts.half_closed_s
    ):
        return CloseReason.HALF_CLOSED_TIMEOUT
    if silent_s >= timeouts.idle_s:
        return CloseReason.IDLE_TIMEOUT
    return None
