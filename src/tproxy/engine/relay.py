"""The relay: moves bytes both ways between two connected sockets until the session ends.

Two kinds of pump move one direction each: the splice pump (`engine.splice`, zero-copy, the fast
path) and the copy pump here (bytes through Python, for where splice is unavailable and for
sessions whose bytes Python must see). Both report how their direction ended; what happens then
is decided by `tproxy.core.lifecycle` (the close matrix lives there) and carried out here, the
same for both.

The copy pump reads a chunk, writes all of it, and only then reads again, so a slow reader slows
its own direction only, and a direction holds at most one chunk, only while it is in flight (an
idle session holds no buffer at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Protocol

from tproxy.core.config import RelayKind
from tproxy.core.lifecycle import Command, Direction, DirectionEnded, End, close_reason, decide
from tproxy.core.session import SessionRecord
from tproxy.engine.pipes import PipePool
from tproxy.engine.splice import SplicePump
from tproxy.interception.sockopts import (
    abort_socket,
    reset_behind_eof,
    unacknowledged_bytes,
)

CHUNK_BYTES = 64 * 1024
# Passing a reset on waits for the other peer to acknowledge what was already written to it, for
# as long as it keeps acknowledging; it gives up after this long without progress.
DRAIN_STALL_S = 5.0

# Errors that mean "the peer reset or is gone": everything else is a bug and propagates.
_PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


class Pump(Protocol):
    """One direction: `ended` resolves with how it ended; `stop` makes it let go of both sockets."""

    ended: asyncio.Future[End]

    async def stop(self) -> None: ...


class CopyPump:
    """One direction through Python: recv a chunk, sendall it, repeat."""

    __slots__ = ("ended",)

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        source: socket.socket,
        sink: socket.socket,
        record: SessionRecord,
        direction: Direction,
    ) -> None:
        self.ended: asyncio.Future[End] = asyncio.ensure_future(
            _copy(loop, source, sink, record, direction is Direction.UP)
        )

    async def stop(self) -> None:
        # The cancellation unregisters the descriptor from the loop; it must complete while the
        # descriptor number still belongs to this session's socket, hence the wait.
        self.ended.cancel()
        await asyncio.wait([self.ended])


async def _copy(
    loop: asyncio.AbstractEventLoop,
    source: socket.socket,
    sink: socket.socket,
    record: SessionRecord,
    up: bool,
) -> End:
    while True:
        try:
            chunk = await loop.sock_recv(source, CHUNK_BYTES)
        except _PEER_GONE:
            return End.SOURCE_RESET
        if not chunk:
            return End.EOF
        try:
            await loop.sock_sendall(sink, chunk)
        except _PEER_GONE:
            return End.SINK_RESET
        if up:
            record.bytes_up += len(chunk)
        else:
            record.bytes_down += len(chunk)
        record.last_activity_at = time.monotonic()


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


def _shutdown_write(sock: socket.socket) -> None:
    # If the peer is already gone, its own direction will report how.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


async def relay(
    client: socket.socket,
    upstream: socket.socket,
    record: SessionRecord,
    kind: RelayKind = RelayKind.COPY,
    pool: PipePool | None = None,
) -> str:
    """Relay until both directions end or one resets; return the close reason.

    Both sockets are left open on a clean close (the caller closes them) and aborted on a reset.
    `pool` is required for the splice kind.
    """
    loop = asyncio.get_running_loop()
    pumps: dict[asyncio.Future[End], tuple[Direction, Pump]] = {}
    for direction, source, sink in (
        (Direction.UP, client, upstream),
        (Direction.DOWN, upstream, client),
    ):
        pump: Pump
        if kind is RelayKind.SPLICE:
            assert pool is not None
            pump = SplicePump(loop, source, sink, record, direction, pool=pool)
        else:
            pump = CopyPump(loop, source, sink, record, direction)
        pumps[pump.ended] = (direction, pump)
    ends: list[DirectionEnded] = []
    shut_down: set[socket.socket] = set()  # sockets we have sent FIN on
    pending = set(pumps)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for ended in _in_order(pumps, done, client, upstream, shut_down):
                ends.append(ended)
                command = decide(ended)
                if command is Command.SHUTDOWN_UPSTREAM_WRITE:
                    _shutdown_write(upstream)
                    shut_down.add(upstream)
                elif command is Command.SHUTDOWN_CLIENT_WRITE:
                    _shutdown_write(client)
                    shut_down.add(client)
                else:
                    await _stop(pumps, pending)
                    pending = set()
                    if command is Command.DRAIN_SINK_THEN_ABORT_BOTH:
                        await wait_acknowledged(upstream if ended.direction is Direction.UP
                                                else client)  # fmt: skip
                    abort_socket(client)
                    abort_socket(upstream)
                    break
            if len(ends) == 1 and pending and record.half_closed_at is None:
                record.half_closed_at = time.monotonic()
        return close_reason(ends)
    finally:
        # Stop before any close: a pump must let go of its descriptors while their numbers
        # still belong to this session's sockets.
        await _stop(pumps, pending)


def _in_order(
    pumps: dict[asyncio.Future[End], tuple[Direction, Pump]],
    done: set[asyncio.Future[End]],
    client: socket.socket,
    upstream: socket.socket,
    shut_down: set[socket.socket],
) -> list[DirectionEnded]:
    """How the directions in `done` ended, resets first, EOFs that hid a reset corrected."""
    ends = []
    for future in done:
        direction, end = pumps[future][0], future.result()
        source = client if direction is Direction.UP else upstream
        if end is End.EOF and source not in shut_down and reset_behind_eof(source):
            end = End.SOURCE_RESET
        ends.append(DirectionEnded(direction, end))
    return sorted(ends, key=lambda e: e.end is End.EOF)


async def _stop(
    pumps: dict[asyncio.Future[End], tuple[Direction, Pump]], which: set[asyncio.Future[End]]
) -> None:
    for future in which:
        await pumps[future][1].stop()
