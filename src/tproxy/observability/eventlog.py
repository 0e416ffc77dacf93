"""The event log: writes each event as one line, text or JSON, to a stream (stdout by default)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO

from tproxy.core.config import LogFormat
from tproxy.observability.events import Event, render_json, render_text


class EventLog:
    """One line per event, flushed at once so `tail -f` and pipes see sessions as they happen."""

    def __init__(
        self,
        log_format: LogFormat,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.time,
        worker: int | None = None,
    ) -> None:
        self._json = log_format is LogFormat.JSON
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self.worker = worker

    def emit(self, event: Event) -> None:
        """Write one line. Lines under 4 KiB are one write(), so workers sharing a pipe never
        interleave within a line."""
        now = self._clock()
        if self._json:
            line = render_json(event, now, self.worker)
        else:
            line = render_text(event, now, self.worker)
        self._stream.write(line + "\n")
        self._stream.flush()
