"""One timer for many deadlines that come in the order they were set.

Sessions that wait for their first bytes all wait the same sniff timeout, so their deadlines
arrive in the order the sessions started: a queue in that order and one event-loop timer for
its head cost O(1) per session, where a timer per session would cost a heap entry and a
callback handle each, and a sweep over every session would have to run several times a second
to be precise enough. (After a reload that shortens the timeout, a later deadline may sit behind
an earlier one for up to the old timeout: it fires late, never early.)

Most waiters stop waiting long before their deadline (a client's first bytes take microseconds):
the queue keeps them until they reach its head, and then drops every one that no longer waits
without waking for it, so the timer runs for the waiters that still wait, not once per waiter.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Waiter(Protocol):
    @property
    def waiting(self) -> bool:
        """False once the waiter has stopped waiting: the queue may drop it without a call."""

    def deadline_passed(self) -> None:
        """Called once, at or after the deadline it was added with, if it still waits then."""


W = TypeVar("W", bound=Waiter)


class DeadlineQueue(Generic[W]):
    """Waiters in deadline order, called when their deadline passes.

    Args:
        loop: the event loop that runs the timer.
        on_error: told when a waiter's `deadline_passed` raises (the others still run).
        clock: monotonic seconds (the deadlines' clock).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        on_error: Callable[[W, Exception], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._loop = loop
        self._on_error = on_error
        self._clock = clock
        self._waiting: deque[tuple[float, W]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """Waiters held: those still waiting, and those that stopped but are not dropped yet."""
        return len(self._waiting)

    def add(self, deadline_at: float, waiter: W) -> None:
        """Call `waiter.deadline_passed()` at `deadline_at` (monotonic)."""
        self._waiting.append((deadline_at, waiter))
        if self._timer is None:
            self._arm(deadline_at)

    def close(self) -> None:
        """Forget every waiter; no call follows."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._waiting.clear()

    def _arm(self, deadline_at: float) -> None:
        self._timer = self._loop.call_later(max(0.0, deadline_at - self._clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock()
        waiting = self._waiting
        while waiting:
            deadline_at, waiter = waiting[0]
            if not waiter.waiting:  # stopped waiting: dropped, deadline or not
                waiting.popleft()
                continue
            if deadline_at > now:
                self._arm(deadline_at)
                return
            waiting.popleft()
            try:
                waiter.deadline_passed()
            except Exception as exc:
                self._on_error(waiter, exc)
