"""One timer for many deadlines that come in the order they were set.

Sessions that wait for their first bytes all wait the same sniff timeout, so their deadlines
arrive in the order the sessions started: a queue in that order and one event-loop timer for
its head cost O(1) per session, where a timer per session would cost a heap entry and a
callback handle each, and a sweep over every session would have to run several times a second
to be precise enough. A deadline earlier than the queue's last one (after a reload that
shortened the timeout: sessions that started before it still wait the old one) goes to a small
heap beside the queue instead, so it fires on time, not behind the old timeout.

Most waiters stop waiting long before their deadline (a client's first bytes take microseconds):
`cancel` forgets the waiter at once, and its place in the queue -- a deadline and a ticket, plain
numbers the garbage collector never visits -- is dropped as soon as everything before it has
stopped waiting too (waiters mostly stop in the order they started), so the queue holds about
the waiters that still wait, and the timer runs for them, not once per waiter.
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class Waiter(Protocol):
    def deadline_passed(self) -> None:
        """Called once, at or after the deadline it was added with, unless cancelled before."""


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
        # The queue, in deadline order: each deadline and its ticket (two deques of plain
        # numbers: no tuple per entry); the waiters that still wait, by ticket.
        self._deadlines: deque[float] = deque()
        self._tickets: deque[int] = deque()
        # Deadlines that came out of order (earlier than the queue's last), as a heap.
        self._early: list[tuple[float, int]] = []
        self._waiters: dict[int, W] = {}
        self._next_ticket = 0
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = 0.0  # the timer's deadline, while there is a timer

    def __len__(self) -> int:
        """The waiters still waiting."""
        return len(self._waiters)

    def add(self, deadline_at: float, waiter: W) -> int:
        """Call `waiter.deadline_passed()` at `deadline_at` (monotonic); the ticket cancels it."""
        ticket = self._next_ticket
        self._next_ticket = ticket + 1
        deadlines = self._deadlines
        if deadlines and deadline_at < deadlines[-1]:
            heapq.heappush(self._early, (deadline_at, ticket))
        else:
            deadlines.append(deadline_at)
            self._tickets.append(ticket)
        self._waiters[ticket] = waiter
        if self._timer is None:
            self._arm(deadline_at)
        elif deadline_at < self._armed_at:
            self._timer.cancel()
            self._arm(deadline_at)
        return ticket

    def cancel(self, ticket: int) -> None:
        """The waiter of `ticket` stopped waiting: it is not called, nor kept (a ticket already
        called or cancelled is ignored)."""
        waiters = self._waiters
        if waiters.pop(ticket, None) is None:
            return
        tickets = self._tickets
        while tickets and tickets[0] not in waiters:  # the queue's head stopped waiting
            tickets.popleft()
            self._deadlines.popleft()

    def close(self) -> None:
        """Forget every waiter; no call follows."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines.clear()
        self._tickets.clear()
        self._early.clear()
        self._waiters.clear()

    def _arm(self, deadline_at: float) -> None:
        self._armed_at = deadline_at
        self._timer = self._loop.call_later(max(0.0, deadline_at - self._clock()), self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._clock()
        deadlines, tickets, early, waiters = (
            self._deadlines, self._tickets, self._early, self._waiters
        )  # fmt: skip
        while tickets:
            waiter = waiters.get(tickets[0])
            if waiter is None:  # cancelled: dropped, its deadline passed or not
                deadlines.popleft()
                tickets.popleft()
                continue
            if deadlines[0] > now:
                break
            deadlines.popleft()
            del waiters[tickets.popleft()]
            self._call(waiter)
        while early:
            deadline_at, ticket = early[0]
            waiter = waiters.get(ticket)
            if waiter is not None and deadline_at > now:
                break
            heapq.heappop(early)
            if waiter is not None:
                del waiters[ticket]
                self._call(waiter)
        heads = ([deadlines[0]] if deadlines else []) + ([early[0][0]] if early else [])
        if not heads:
            return
        if self._timer is None:
            self._arm(min(heads))
        elif min(heads) < self._armed_at:  # a waiter's call added one, and armed for it
            self._timer.cancel()
            self._arm(min(heads))

    def _call(self, waiter: W) -> None:
        try:
            waiter.deadline_passed()
        except Exception as exc:
            self._on_error(waiter, exc)
