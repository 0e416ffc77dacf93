"""Session ids: short, sortable, unique across workers and restarts of the proxy.

An id is 13 characters of Crockford's base32 (lowercase, no i/l/o/u), fixed width so that
sorting ids as strings sorts them by the millisecond their sessions opened (within one worker,
exactly in the order they opened):

    01kbj9dq7  01  2f
    |          |   `- the session's number within that millisecond  (2 chars, 10 bits)
    |          `----- the worker (0 without a supervisor)           (2 chars, 10 bits)
    `---------------- milliseconds since 1970 (UTC)                 (9 chars, 45 bits: to 3084)

Within one process ids only grow: the number restarts at 0 each millisecond, a 1,025th session
in one millisecond borrows the next millisecond, and a wall clock that steps back does not move
the time part back (it waits for the clock to catch up). So one process never repeats an id.
Across processes the worker part keeps ids apart, and a restarted worker (or a restarted proxy)
is a new process that starts later than its predecessor's last id -- unless the wall clock was
stepped back across the restart (a router without a battery-backed clock that boots, serves and
is then corrected by NTP), which could repeat an id of the process before it.

One field, no spaces, safe to paste into grep; `decode` reads an id back (tests, tooling).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
TIME_CHARS = 9
WORKER_CHARS = 2
COUNTER_CHARS = 2
ID_LENGTH = TIME_CHARS + WORKER_CHARS + COUNTER_CHARS
MAX_WORKER = 32**WORKER_CHARS - 1
_COUNTER_MODULO = 32**COUNTER_CHARS
_COUNTERS = tuple(
    ALPHABET[n >> 5] + ALPHABET[n & 31] for n in range(_COUNTER_MODULO)
)  # every counter suffix, made once: the hot path only indexes


def encode(value: int, width: int) -> str:
    """`value` as `width` base32 characters, most significant first."""
    if not 0 <= value < 32**width:
        raise ValueError(f"{value} does not fit in {width} base32 characters")
    chars = []
    for _ in range(width):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


@dataclass(frozen=True, slots=True)
class DecodedId:
    opened_ms: int  # milliseconds since 1970, UTC
    worker: int
    counter: int


def decode(session_id: str) -> DecodedId:
    """The parts of an id made by `SessionIds`.

    Raises:
        ValueError: not an id of ours (wrong length or a character outside the alphabet).
    """
    if len(session_id) != ID_LENGTH or any(c not in ALPHABET for c in session_id):
        raise ValueError(f"not a session id: {session_id!r}")

    def number(text: str) -> int:
        value = 0
        for char in text:
            value = value * 32 + ALPHABET.index(char)
        return value

    worker_end = TIME_CHARS + WORKER_CHARS
    return DecodedId(
        number(session_id[:TIME_CHARS]),
        number(session_id[TIME_CHARS:worker_end]),
        number(session_id[worker_end:]),
    )


class SessionIds:
    """Makes the ids of one process's sessions, always growing (`next()` is on every
    connection's path: a clock read and a string join; the time part is encoded once per
    millisecond).

    Args:
        worker: this process's worker number, 0 to 1023 (0 without a supervisor).
        clock: wall-clock seconds (injected for tests).
    """

    __slots__ = ("_clock", "_count", "_ms", "_prefix", "_worker")

    def __init__(self, worker: int, clock: Callable[[], float] = time.time) -> None:
        if not 0 <= worker <= MAX_WORKER:
            raise ValueError(f"worker {worker} out of range 0-{MAX_WORKER}")
        self._worker = encode(worker, WORKER_CHARS)
        self._clock = clock
        self._count = 0
        self._ms = -1
        self._prefix = ""

    def next(self) -> str:
        ms = int(self._clock() * 1000)
        if ms > self._ms:
            self._ms, count = ms, 0
            self._prefix = encode(ms, TIME_CHARS) + self._worker
        else:  # the same millisecond (or the clock stepped back: keep counting where we are)
            count = self._count + 1
            if count == _COUNTER_MODULO:  # borrow the next millisecond
                self._ms, count = self._ms + 1, 0
                self._prefix = encode(self._ms, TIME_CHARS) + self._worker
        self._count = count
        return self._prefix + _COUNTERS[count]
