"""The event log: writes each event as one line, text or JSON, to a stream (stdout by default)."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import TextIO

from tproxy.core.config import LogFormat
from tproxy.observability.events import Event, render_json, render_text


class EventLog:
    """One line per event. Inside a running event loop, the lines of one loop iteration are
    written together at its end (one write() instead of one per event: the session log is on the
    hot path of every connection); outside one, each line is written at once.

    The format can be switched while running (a reload): lines already emitted keep theirs.
    """

    def __init__(
        self,
        log_format: LogFormat,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.time,
        worker: int | None = None,
    ) -> None:
        self.log_format = log_format
        self._stream = stream if stream is not None else sys.stdout
        self._clock = clock
        self.worker = worker
        self._pending: list[str] = []

    def emit(self, event: Event) -> None:
        now = self._clock()
        if self.log_format is LogFormat.JSON:
            line = render_json(event, now, self.worker)
        else:
            line = render_text(event, now, self.worker)
        if not self._pending:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: write now
                self._stream.write(line + "\n")
                self._stream.flush()
                return
        self._pending.append(line)

    def flush(self) -> None:
        """Write what is pending. Workers share one pipe: a write of whole lines under the pipe's
        atomic size never interleaves with another worker's."""
        if self._pending:
            text = "\n".join(self._pending) + "\n"
            self._pending.clear()
            self._stream.write(text)
            self._stream.flush()
