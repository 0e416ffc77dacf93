"""The copy relay: moves bytes both ways between two connected sockets until the session ends.

Each direction is one pump: read into its own buffer, write all of it, repeat. A pump never reads
again before the previous chunk is fully written, so a slow reader slows its own direction only and
the buffered data per direction is bounded by the buffer size. What to do when a pump ends is
decided by `tproxy.core.lifecycle` (the close matrix lives there); this module only carries it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

from tproxy.core.lifecycle import Command, Direction, DirectionEnded, End, close_reason, decide
from tproxy.core.session import SessionRecord
from tproxy.interception.sockopts import abort_socket

CHUNK_BYTES = 64 * 1024

# Errors that mean "the peer reset or is gone": everything else is a bug and propagates.
_PEER_GONE = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError, TimeoutError)


async def _pump(
    loop: asyncio.AbstractEventLoop,
    source: socket.socket,
    sink: socket.socket,
    count: Callable[[int], None],
) -> End:
    buffer = bytearray(CHUNK_BYTES)
    view = memoryview(buffer)
    while True:
        try:
            n = await loop.sock_recv_into(source, buffer)
        except _PEER_GONE:
            return End.SOURCE_RESET
        if n == 0:
            return End.EOF
        try:
            await loop.sock_sendall(sink, view[:n])
        except _PEER_GONE:
            return End.SINK_RESET
        count(n)


def _shutdown_write(sock: socket.socket) -> None:
    # If the peer is already gone, its own direction will report how.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)


async def relay(client: socket.socket, upstream: socket.socket, record: SessionRecord) -> str:
    """Relay until both directions end or one resets; return the close reason.

    Both sockets are left open on a clean close (the caller closes them) and aborted on a reset.
    """
    loop = asyncio.get_running_loop()

    def count_up(n: int) -> None:
        record.bytes_up += n

    def count_down(n: int) -> None:
        record.bytes_down += n

    pumps = {
        asyncio.ensure_future(_pump(loop, client, upstream, count_up)): Direction.UP,
        asyncio.ensure_future(_pump(loop, upstream, client, count_down)): Direction.DOWN,
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
                    abort_socket(client)
                    abort_socket(upstream)
                    break
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
