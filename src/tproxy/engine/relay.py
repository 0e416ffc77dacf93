"""The relay: both directions of one session, and what happens when one of them ends.

Each direction is a `Pump` (`engine.pump`): with a pipe pool it splices (zero-copy, the fast
path), without one it copies through Python. When a direction ends, `tproxy.core.lifecycle`
decides what happens (the close matrix lives there) and this module carries it out: pass the
FIN on, or stop the other direction and reset both sides -- after waiting, when the reset came
from a peer, for the other peer to acknowledge what was already relayed to it.

Everything here is callbacks from the poller; only that rare wait runs as a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from tproxy.core.lifecycle import Command, Direction, DirectionEnded, End, close_reason, decide
from tproxy.core.reasons import CloseReason
from tproxy.core.session import SessionRecord
from tproxy.engine.pipes import PipePool
from tproxy.engine.poller import Poller
from tproxy.engine.pump import SPLICE_AFTER_BYTES, Pump, Recording
from tproxy.interception.sockopts import (
    abort_socket,
    reset_behind_eof,
    unacknowledged_bytes,
)
from tproxy.sniffers.passive import FirstBytes

# Passing a reset on waits for the other peer to acknowledge what was already written to it, for
# as long as it keeps acknowledging; it gives up after this long without progress.
DRAIN_STALL_S = 5.0

_SHUTDOWNS = frozenset({Command.SHUTDOWN_UPSTREAM_WRITE, Command.SHUTDOWN_CLIENT_WRITE})

Spawn = Callable[[Coroutine[Any, Any, None]], "asyncio.Task[None]"]


class Stoppable(Protocol):
    """A relay's direction, as the relay sees it once it runs: something to stop."""

    def stop(self) -> None: ...


async def wait_acknowledged(sock: socket.socket, stall_s: float = DRAIN_STALL_S) -> bool:
    """Wait until the peer has acknowledged everything written to `sock`.

    Gives up (returns False) once `stall_s` pass with no progress. In theory an event would tell
    us; in practice Linux has none for "send queue acknowledged" (writability means "below the
    low-water mark", not "empty"), so this polls SIOCOUTQ with a short, growing interval. It
    runs only on the rare path of passing a reset on.
    """
    interval_s = 0.001
    best = -1
    progress_at = time.monotonic()
    while True:
        try:
            left = unacknowledged_bytes(sock)
        except OSError:
            return False  # the socket is gone: nothing left to wait for
        if left == 0:
            return True
        now = time.monotonic()
        if best < 0 or left < best:
            best, progress_at, interval_s = left, now, 0.001
        elif now - progress_at >= stall_s:
            return False
        await asyncio.sleep(interval_s)
        interval_s = min(interval_s * 2, 0.05)


class Relay:
    """Relays `client` ⇄ `upstream` until both directions end or one resets.

    With a pipe pool it splices after each direction's first `splice_after` bytes; without one it
    copies; with a `recording` (a captured session) it copies and shows every byte written, and
    every end, to the recording, until the recording stops (then it splices again, if it has a
    pool). Sets `record.relay` to which it is ("splice", "copy", "capture"). With a `tap`, the
    first bytes each way are shown to it as they pass (`sniffers.passive`). `pending_up` and
    `pending_down` are bytes already read from the client and from the upstream before the relay
    started (the sniffed first bytes; an upstream proxy's first tunnelled bytes): relayed first.

    Calls `on_end(reason)` once, with both sockets left open after a clean close (the owner
    closes them) and aborted after a reset; or `on_error(exc)` after an unexpected error, with
    both pumps stopped. `stop()` ends it from outside without calling either.
    """

    __slots__ = (
        "_client",
        "_done",
        "_drain",
        "_first_end",
        "_on_end",
        "_on_error",
        "_poller",
        "_record",
        "_recording",
        "_shut",
        "_spawn",
        "_upstream",
        "down",
        "up",
    )

    def __init__(
        self,
        poller: Poller,
        client: socket.socket,
        upstream: socket.socket,
        record: SessionRecord,
        *,
        pool: PipePool | None,
        on_end: Callable[[CloseReason], None],
        on_error: Callable[[BaseException], None],
        spawn: Spawn,
        splice_after: int = SPLICE_AFTER_BYTES,
        tap: FirstBytes | None = None,
        pending_up: bytes = b"",
        pending_down: bytes = b"",
        recording: Recording | None = None,
    ) -> None:
        self._setup(poller, client, upstream, record, on_end=on_end, on_error=on_error,
                    spawn=spawn, recording=recording)  # fmt: skip
        record.relay = "capture" if recording else "copy" if pool is None else "splice"
        client_fd, upstream_fd = client.fileno(), upstream.fileno()  # one int each, for both
        self.up: Stoppable = Pump(poller, client_fd, upstream_fd, record, Direction.UP,
                                  pool=pool, owner=self, splice_after=splice_after, tap=tap,
                                  pending=pending_up, recording=recording)  # fmt: skip
        self.down: Stoppable = Pump(poller, upstream_fd, client_fd, record, Direction.DOWN,
                                    pool=pool, owner=self, splice_after=splice_after, tap=tap,
                                    pending=pending_down, recording=recording)  # fmt: skip

    def _setup(
        self,
        poller: Poller,
        client: socket.socket,
        upstream: socket.socket,
        record: SessionRecord,
        *,
        on_end: Callable[[CloseReason], None],
        on_error: Callable[[BaseException], None],
        spawn: Spawn,
        recording: Recording | None,
    ) -> None:
        """What every relay keeps, whatever its pumps (`engine.addon_relay` has its own)."""
        self._poller = poller
        self._recording = recording
        self._client = client
        self._upstream = upstream
        self._record = record
        self._on_end = on_end
        self._on_error = on_error
        self._spawn = spawn
        self._first_end: DirectionEnded | None = None  # set once one direction has ended
        self._shut: socket.socket | None = None  # the socket we have sent FIN on, if any
        self._done = False
        self._drain: asyncio.Task[None] | None = None

    def stop(self) -> None:
        """Stop both directions (the owner resets the sockets); no callback follows."""
        self._done = True
        self.up.stop()
        self.down.stop()
        if self._drain is not None:
            self._drain.cancel()

    def pump_failed(self, exc: BaseException) -> None:
        if not self._done:
            self.stop()
            self._on_error(exc)

    def pump_ended(self, direction: Direction, end: End) -> None:
        if self._done:
            return
        source = self._client if direction is Direction.UP else self._upstream
        if end is End.EOF and source is not self._shut and reset_behind_eof(source):
            end = End.SOURCE_RESET
        ended = DirectionEnded(direction, end)
        if self._recording is not None:
            self._record_end(direction, end)
        ends = [ended] if self._first_end is None else [self._first_end, ended]
        command = decide(ended)
        if self._first_end is not None and command in _SHUTDOWNS:
            # The last direction: the owner's close() sends this FIN (both sockets have read
            # their peer's EOF, so nothing unread turns the close into a reset).
            pass
        elif command is Command.SHUTDOWN_UPSTREAM_WRITE:
            self._shutdown_write(self._upstream)
        elif command is Command.SHUTDOWN_CLIENT_WRITE:
            self._shutdown_write(self._client)
        else:
            self._done = True
            self.up.stop()
            self.down.stop()
            if command is Command.DRAIN_SINK_THEN_ABORT_BOTH:
                sink = self._upstream if direction is Direction.UP else self._client
                self._drain = self._spawn(self._drain_then_abort(sink, ends))
            else:
                self._abort_and_end(ends)
            return
        if self._first_end is None:
            self._first_end = ended
            self._record.half_closed_at = time.monotonic()
        else:
            self._done = True
            self._on_end(close_reason(ends))

    def _record_end(self, direction: Direction, end: End) -> None:
        """What the capture shows: the source's FIN or reset, or the sink's reset."""
        assert self._recording is not None
        up = direction is Direction.UP
        if end is End.SINK_RESET:
            self._recording.ended(from_client=not up, reset=True)
        else:
            self._recording.ended(from_client=up, reset=end is End.SOURCE_RESET)

    def _shutdown_write(self, sock: socket.socket) -> None:
        self._shut = sock
        # If the peer is already gone, its own direction will report how.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    async def _drain_then_abort(self, sink: socket.socket, ends: list[DirectionEnded]) -> None:
        await wait_acknowledged(sink)
        self._abort_and_end(ends)

    def _abort_and_end(self, ends: list[DirectionEnded]) -> None:
        for sock in (self._client, self._upstream):
            if sock.fileno() >= 0:
                self._poller.forget(sock.fileno())
            abort_socket(sock)
        self._on_end(close_reason(ends))
