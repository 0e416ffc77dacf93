"""What the supervisor tells systemd, and when (pure: the clock and the workers' state are
arguments; `service.notify` sends it).

* `READY=1` once every worker has sent its first heartbeat: each worker sends one as soon as it
  serves, and the listeners were bound before any worker started, so every listener accepts.
* `WATCHDOG=1` every `watchdog_every_s` (half of systemd's `WatchdogSec=`), and only while every
  worker is answering: all of them running, none silent for the supervisor's stall limit. A
  worker whose event loop is stuck (or stopped, or crash-looping) starves the watchdog, so
  systemd restarts the service instead of leaving a worker's clients unserved.
* `STATUS=` what the workers last said, at most once a second and only when it changed:
  `2 workers, 14 active sessions, 5210 since start`; `draining: N active sessions` once stopping.
* `STOPPING=1` at the first stop signal (the drain that follows may take `--drain-timeout`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Final

from tproxy.core.worker_protocol import Heartbeat
from tproxy.service.notify import message

STATUS_EVERY_S: Final = 1.0


class ServiceNotes:
    """The notify datagrams of a supervisor of `workers` workers.

    Args:
        workers: how many workers it runs.
        watchdog_every_s: how often to send `WATCHDOG=1` (None: systemd asked for no watchdog).
    """

    __slots__ = ("_last_status", "_last_status_at", "_last_watchdog_at", "ready", "stopping",
                 "watchdog_every_s", "workers")  # fmt: skip

    def __init__(self, workers: int, watchdog_every_s: float | None) -> None:
        self.workers = workers
        self.watchdog_every_s = watchdog_every_s
        self.ready = False
        self.stopping = False
        self._last_watchdog_at = -math.inf
        self._last_status: str | None = None
        self._last_status_at = -math.inf

    def tick(self, now: float, latest: Mapping[int, Heartbeat], answering: bool) -> bytes:
        """The datagram to send on this round of the supervisor's loop (b"": nothing).

        Args:
            latest: each running worker's last heartbeat, by worker id.
            answering: every worker is running and none has been silent past the stall limit.
        """
        if self.stopping:
            return self._status_only(now, latest)
        ready = not self.ready and len(latest) >= self.workers
        if ready:
            self.ready = True
        watchdog = (
            self.ready
            and answering
            and self.watchdog_every_s is not None
            and now - self._last_watchdog_at >= self.watchdog_every_s
        )
        if watchdog:
            self._last_watchdog_at = now
        status = self._status(now, latest, force=ready)
        return message(ready=ready, watchdog=watchdog, status=status)

    def stop(self, now: float, latest: Mapping[int, Heartbeat]) -> bytes:
        """The first stop signal: STOPPING=1 (once), with the drain's status."""
        if self.stopping:
            return b""
        self.stopping = True
        return message(stopping=True, status=self._status(now, latest, force=True))

    def _status_only(self, now: float, latest: Mapping[int, Heartbeat]) -> bytes:
        status = self._status(now, latest, force=False)
        return b"" if status is None else message(status=status)

    def _status(self, now: float, latest: Mapping[int, Heartbeat], *, force: bool) -> str | None:
        active = sum(beat.active for beat in latest.values())
        if self.stopping:
            text = f"draining: {active} active sessions"
        else:
            opened = sum(beat.opened for beat in latest.values())
            text = f"{len(latest)} workers, {active} active sessions, {opened} since start"
        if text == self._last_status or (not force and now - self._last_status_at < STATUS_EVERY_S):
            return None
        self._last_status, self._last_status_at = text, now
        return text
