"""The sniff deadlines' queue: one timer, waiters called in order at their deadline, never early;
a waiter that raises is reported and the others still run."""

from __future__ import annotations

import asyncio
import time

from tproxy.engine.deadlines import DeadlineQueue


class Waiter:
    def __init__(self, name: str, calls: list[tuple[str, float]], fail: bool = False) -> None:
        self.name, self.calls, self.fail = name, calls, fail
        self.waiting = True

    def deadline_passed(self) -> None:
        self.calls.append((self.name, time.monotonic()))
        if self.fail:
            raise RuntimeError(self.name)


def test_waiters_are_called_in_order_at_their_deadlines_and_never_early() -> None:
    async def scenario() -> None:
        calls: list[tuple[str, float]] = []
        errors: list[str] = []
        queue: DeadlineQueue[Waiter] = DeadlineQueue(
            asyncio.get_running_loop(), lambda w, exc: errors.append(f"{w.name}: {exc}")
        )
        now = time.monotonic()
        deadlines = {"a": now + 0.05, "b": now + 0.05, "c": now + 0.1, "d": now + 0.2}
        for name, at in deadlines.items():
            queue.add(at, Waiter(name, calls, fail=name == "b"))
        assert len(queue) == 4
        await asyncio.sleep(0.12)
        assert [name for name, _ in calls] == ["a", "b", "c"]
        assert errors == ["b: b"]
        await asyncio.sleep(0.15)
        assert [name for name, _ in calls] == ["a", "b", "c", "d"]
        assert all(at >= deadlines[name] for name, at in calls)
        assert len(queue) == 0
        queue.add(time.monotonic() + 0.01, Waiter("e", calls))  # the timer re-arms when empty
        queue.close()
        await asyncio.sleep(0.03)
        assert len(calls) == 4, "closed: nobody is called"

    asyncio.run(scenario())


def test_cancelled_waiters_are_not_called_and_their_deadlines_do_not_wake_the_timer() -> None:
    async def scenario() -> None:
        calls: list[tuple[str, float]] = []
        clock_reads: list[float] = []

        def clock() -> float:
            clock_reads.append(time.monotonic())
            return clock_reads[-1]

        queue: DeadlineQueue[Waiter] = DeadlineQueue(asyncio.get_running_loop(), print, clock)
        now = time.monotonic()
        cancelled = [queue.add(now + 0.02 + i * 0.01, Waiter(f"gone-{i}", calls)) for i in range(3)]
        queue.add(now + 0.1, Waiter("silent", calls))
        later = queue.add(now + 0.15, Waiter("gone-later", calls))
        assert len(queue) == 5
        for ticket in cancelled:
            queue.cancel(ticket)
        assert len(queue) == 2
        await asyncio.sleep(0.07)
        assert calls == []
        fired = len(clock_reads)
        queue.cancel(later)
        queue.cancel(later)  # twice: ignored
        await asyncio.sleep(0.12)
        assert [name for name, _ in calls] == ["silent"]
        assert calls[0][1] >= now + 0.1
        assert len(queue) == 0
        # The clock is read when the timer is armed and when it runs: once for the first
        # deadline, twice when it runs there (and re-arms for the one still waiting), once at
        # that one's deadline -- never for the cancelled waiters' own deadlines (a loop that
        # runs a timer a little early costs a read or two more).
        assert fired <= 4
        assert len(clock_reads) - fired <= 2

    asyncio.run(scenario())


def test_after_a_shorter_timeout_a_new_deadline_fires_on_time_not_behind_the_old_ones() -> None:
    """A reload shortened the sniff timeout: a session that started before it still waits the
    old one, and one that starts after it must not wait behind it."""

    async def scenario() -> None:
        calls: list[tuple[str, float]] = []
        queue: DeadlineQueue[Waiter] = DeadlineQueue(asyncio.get_running_loop(), print)
        now = time.monotonic()
        old = queue.add(now + 0.5, Waiter("old-cancelled", calls))  # sniffed at once
        queue.cancel(old)
        queue.add(now + 0.6, Waiter("old-silent", calls))
        queue.add(now + 0.05, Waiter("new-1", calls))
        queue.add(now + 0.07, Waiter("new-2", calls))
        await asyncio.sleep(0.15)
        assert [name for name, _ in calls] == ["new-1", "new-2"]
        assert calls[0][1] >= now + 0.05 and calls[1][1] >= now + 0.07
        await asyncio.sleep(0.55)
        assert [name for name, _ in calls] == ["new-1", "new-2", "old-silent"]
        assert len(queue) == 0

    asyncio.run(scenario())


def test_waiters_that_stopped_in_order_leave_nothing_queued() -> None:
    async def scenario() -> None:
        queue: DeadlineQueue[Waiter] = DeadlineQueue(asyncio.get_running_loop(), print)
        now = time.monotonic()
        tickets = [queue.add(now + 60, Waiter(f"w{i}", [])) for i in range(1000)]
        for ticket in tickets[:-1]:
            queue.cancel(ticket)
        assert len(queue) == 1 and len(queue._tickets) == 1  # only the one still waiting
        queue.cancel(tickets[500])  # again, out of order: ignored
        queue.cancel(tickets[-1])
        assert len(queue._tickets) == len(queue._deadlines) == 0
        queue.close()

    asyncio.run(scenario())
