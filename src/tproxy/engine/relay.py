"""The copy relay: moves bytes both ways between two connected sockets until the session ends.

Each direction is one pump: read a chunk, write all of it, repeat. A pump never reads again
before the previous chunk is fully written, so a slow reader slows its own direction only, and
the memory a direction holds is at most one chunk, only while that chunk is in flight (an idle
session holds no buffer at all). What to do when a pump ends is decided by
`tproxy.core.lifecycle` (the close matrix lives there); this module only carries it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

from tproxy.core.lifecycle import Command, Direction, DirectionEnded, End, close_reason, decide
from tproxy.core.session import SessionRecord
from tproxy.interception.sockopts import abort_socket, unacknowledged_bytes

CHUNK_BYTES = 64 * 1024
# Passing a reset on waits for the other peer to acknowledge what was already written to it, for
# as long as it keeps acknowledging; it gives up after this long without progress.
DRAIN_STALL_S = 5.0

# Errors that mean "the peer reset or is gone": everything else is a bug and propagates.
_PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


async def _pump(
    loop: asyncio.AbstractEventLoop,
    source: socket.socket,
    sink: socket.socket,
    record: SessionRecord,
    direction: Direction,
) -> End:
    up = direction is Direction.UP
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


async def relay(client: socket.socket, upstream: socket.socket, record: SessionRecord) -> str:
    """Relay until both directions end or one resets; return the close reason.

    Both sockets are left open on a clean close (the caller closes them) and aborted on a reset.
    """
    loop = asyncio.get_running_loop()
    pumps = {
        asyncio.ensure_future(_pump(loop, client, upstream, record, Direction.UP)): Direction.UP,
        asyncio.ensure_future(_pump(loop, upstream, client, record, Direction.DOWN)): (
            Direction.DOWN
        ),
    }
    ends: list[DirectionEnded] = []
    pending = set(pumps)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                ended = DirectionEnded(pumps[task], task.result())
                ends.append(ended)
                command = decide(ended)
                if command is Command.SHUTDOWN_UPSTREAM_WRITE:
                    _shutdown_write(upstream)
                elif command is Command.SHUTDOWN_CLIENT_WRITE:
                    _shutdown_write(client)
                else:
                    await _cancel(pending)
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
        # Cancel before any close: a pump's cancellation unregisters its descriptor from the
        # loop, and that must happen while the number still belongs to this session's socket.
        await _cancel(pending)


async def _cancel(tasks: set[asyncio.Task[End]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
