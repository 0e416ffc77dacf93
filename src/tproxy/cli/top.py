"""`tproxy top`'s loop: ask the running proxy for `stats` and `sessions` every interval, draw
`tproxy.observability.top_view`'s screen in place, quit on `q` (the I/O edge of that view).

Three things run at their own pace, in one loop that wakes every `TICK_S`:

* the polls, in a daemon thread, one at a time: a proxy slow to answer (each request may take
  up to the control client's timeout) never holds up the keys or a redraw;
* the keys: stdin in cbreak mode (one key at a time, no echo, Ctrl-C still a SIGINT), read only
  when select says so; the terminal's mode is restored on every way out. A stdin that is not a
  terminal is not read at all (Ctrl-C quits);
* the drawing: rich's `Live` on the alternate screen (the shell's screen comes back on quit),
  redrawn after each poll and when the terminal's size changed (its own size: see
  `_screen_size`).

The first poll is made before the screen opens: when nothing answers, `tproxy top` fails as
`tproxy sessions` does (one line, status 1). Later failures are shown on the screen, over the
last figures, and the polls go on.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import select
import signal
import sys
import termios
import threading
import time
import tty
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final, TextIO

from rich.console import Console
from rich.live import Live

from tproxy.engine.control import ControlError
from tproxy.observability.top_view import TopView

Ask = Callable[[dict[str, Any]], dict[str, Any]]
"""Send one control request, return the answer (raises ControlError: `_ask_running`)."""

TICK_S: Final = 0.1  # how long a key, a finished poll or a new terminal size may wait
MIN_INTERVAL_S: Final = 0.1
MAX_INTERVAL_S: Final = 3600.0
QUIT_KEYS: Final = b"qQ"


def parse_interval(text: str) -> float:
    """`--interval`: seconds between polls.

    Raises:
        ValueError: not a number from 0.1 to 3600 (one sentence).
    """
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not MIN_INTERVAL_S <= seconds <= MAX_INTERVAL_S:  # (NaN fails too)
        raise ValueError(f"{text!r} is not a number of seconds from 0.1 to 3600")
    return seconds


@dataclass(frozen=True)
class Poll:
    """One round of questions: when it started, the answers (None: that one failed), and one
    line per failure."""

    at: float
    stats: dict[str, Any] | None
    sessions: dict[str, Any] | None
    errors: tuple[str, ...]


def poll(ask: Ask, clock: Callable[[], float] = time.monotonic) -> Poll:
    """Ask for `stats` then `sessions`; never raises (but KeyboardInterrupt).

    A proxy that knows only one of the two (one older than `stats`) still gives half a screen;
    when both fail alike (nothing answers) the error is said once.
    """
    at = clock()
    answers: dict[str, dict[str, Any] | None] = {}
    errors: dict[str, str] = {}
    for command in ("stats", "sessions"):
        try:
            answers[command] = ask({"command": command})
        except (ControlError, OSError, ValueError) as exc:
            answers[command] = None
            errors[command] = str(exc) or type(exc).__name__
    lines: tuple[str, ...] = tuple(f"{command}: {error}" for command, error in errors.items())
    if len(errors) == 2 and len(set(errors.values())) == 1:
        lines = (errors["stats"],)
    return Poll(at, answers["stats"], answers["sessions"], lines)


def run_top(
    ask: Ask, *, interval_s: float = 1.0, once: bool = False, console: Console | None = None,
    stdin: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
) -> int:  # fmt: skip
    """`tproxy top`: the exit status (0; Ctrl-C and `q` quit cleanly).

    Args:
        ask: how to ask the running proxy.
        interval_s: seconds from the start of one poll to the start of the next.
        once: draw one frame on `console` (no live screen) and return.
        console: where to draw (default: stdout).
        stdin: where keys come from (default: sys.stdin; not a terminal: none are read).
        clock: monotonic seconds.

    Raises:
        ControlError: the first poll had no answer at all (nothing answers there).
    """
    console = console or Console()
    view = TopView()
    try:
        first = poll(ask, clock)
        if first.stats is None and first.sessions is None:
            raise ControlError(first.errors[0] if first.errors else "no answer")
        view.update(first.at, first.stats, first.sessions, first.errors)
        if once:
            console.print(view.render(console.size.height, console.size.width, hint=""))
            return 0
        with _stopped_as_interrupt(), _keys(stdin if stdin is not None else sys.stdin) as keys:
            _loop(view, ask, console=console, keys=keys, clock=clock, interval_s=interval_s,
                  next_poll_at=first.at + interval_s)  # fmt: skip
    except KeyboardInterrupt:
        pass
    return 0


@contextlib.contextmanager
def _stopped_as_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP (`kill`, `timeout`, a closed terminal) end the screen as Ctrl-C does:
    through the `finally`s that give the terminal its mode and screen back (Python's default
    for them exits without running any)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():  # (signals: main thread only)
        yield
        return
    saved = {signum: signal.signal(signum, interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _loop(
    view: TopView, ask: Ask, *, console: Console, keys: _Keys, clock: Callable[[], float],
    interval_s: float, next_poll_at: float,
) -> None:  # fmt: skip
    """Draw, poll and read keys until `q`."""
    poller = _Poller(ask, clock)
    drawn_size = None
    with Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False,
              redirect_stderr=False) as live:  # fmt: skip
        while True:
            result = poller.result()
            if result is not None:
                view.update(result.at, result.stats, result.sessions, result.errors)
                next_poll_at = result.at + interval_s
                drawn_size = None
            size = _screen_size(console)
            if size != drawn_size:
                console.size = size  # (what rich lays out to, as what the view was sized to)
                live.update(view.render(size[1], size[0]), refresh=True)
                drawn_size = size
            now = clock()
            if not poller.busy and now >= next_poll_at:
                poller.start()
            wait_s = TICK_S if poller.busy else max(0.0, min(TICK_S, next_poll_at - now))
            if keys.quit_within(wait_s):
                return


def _screen_size(console: Console) -> tuple[int, int]:
    """The terminal's own width and height, read again each time (it may be resized); rich's
    idea of them if its output is not a terminal. rich prefers COLUMNS and LINES when they are
    in the environment: right for a report on a pipe, wrong for a screen that must fit the
    terminal (a shell or a tool may have exported stale ones)."""
    try:
        size = os.get_terminal_size(console.file.fileno())
    except (AttributeError, OSError, ValueError):  # (not a terminal, or no descriptor)
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return size.columns, size.lines
    return console.size.width, console.size.height


class _Poller:
    """Polls in a daemon thread, one poll at a time (see the module docstring). The thread
    blocks at most a request's timeout, and dies with the process if `q` comes first."""

    def __init__(self, ask: Ask, clock: Callable[[], float]) -> None:
        self._ask = ask
        self._clock = clock
        self._results: queue.SimpleQueue[Poll] = queue.SimpleQueue()
        self.busy = False

    def start(self) -> None:
        self.busy = True
        threading.Thread(target=self._run, name="tproxy-top-poll", daemon=True).start()

    def _run(self) -> None:
        try:
            result = poll(self._ask, self._clock)
        except Exception as exc:  # (a bug in asking must not stop the polls for good)
            result = Poll(self._clock(), None, None, (f"{type(exc).__name__}: {exc}",))
        self._results.put(result)

    def result(self) -> Poll | None:
        """The finished poll, if one finished since the last call."""
        try:
            result = self._results.get_nowait()
        except queue.Empty:
            return None
        self.busy = False
        return result


class _Keys:
    """The keys typed on a terminal in cbreak mode, or none (`fd` None: wait only)."""

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def quit_within(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a key; True if `q` (or `Q`) came."""
        if self._fd is None:
            time.sleep(timeout_s)
            return False
        readable, _, _ = select.select([self._fd], [], [], timeout_s)
        if not readable:
            return False
        data = os.read(self._fd, 64)
        if not data:  # the terminal went away: keys no more, Ctrl-C (or a signal) still quits
            self._fd = None
        return any(key in QUIT_KEYS for key in data)


@contextlib.contextmanager
def _keys(stdin: TextIO) -> Iterator[_Keys]:
    """stdin in cbreak mode while in the block (its mode restored however the block ends), or
    no keys at all if it is not a terminal."""
    try:
        fd = stdin.fileno()
        is_terminal = os.isatty(fd)
    except (OSError, ValueError):  # (closed, or a stream without a descriptor)
        is_terminal = False
    if not is_terminal:
        yield _Keys(None)
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield _Keys(fd)
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)
