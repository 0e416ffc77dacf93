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


def test_waiters_that_stopped_waiting_are_dropped_when_the_timer_next_runs() -> None:
    async def scenario() -> None:
        calls: list[tuple[str, float]] = []
        queue: DeadlineQueue[Waiter] = DeadlineQueue(asyncio.get_running_loop(), print)
        now = time.monotonic()
        gone = [Waiter(f"gone-{i}", calls) for i in range(3)]
        queue.add(now + 0.02, gone[0])
        queue.add(now + 0.05, gone[1])
        queue.add(now + 0.06, gone[2])
        queue.add(now + 0.1, Waiter("silent", calls))
        queue.add(now + 0.15, gone_later := Waiter("gone-later", calls))
        for waiter in gone:
            waiter.waiting = False
        await asyncio.sleep(0.04)
        # The first deadline ran the timer: every waiter before the one still waiting is gone,
        # the later deadlines of those that stopped waiting did not wake it.
        assert calls == []
        assert len(queue) == 2
        gone_later.waiting = False
        await asyncio.sleep(0.08)
        assert [name for name, _ in calls] == ["silent"]
        assert calls[0][1] >= now + 0.1
        assert len(queue) == 0, "the one behind it had stopped waiting: dropped at once"

    asyncio.run(scenario())
