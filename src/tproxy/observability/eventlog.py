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
    ) -> None:
        self._render = render_json if log_format is LogFormat.JSON else render_text
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock

    def emit(self, event: Event) -> None:
        self._stream.write(self._render(event, self._clock()) + "\n")
        self._stream.flush()
