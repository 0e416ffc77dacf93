"""The pump: one direction of a session, socket → socket, driven by readiness callbacks.

Theory of operation
-------------------
With a pipe pool (the splice relay) bytes never enter Python: `splice(source → pipe)` then
`splice(pipe → sink)`. Without one (the copy relay), or when no pipe can be had because the
process is out of descriptors, a chunk goes through a Python buffer instead (`read`, `write`).
Either way there is no task per direction: the poller (`engine.poller`, the relay's own epoll)
calls the pump when its source is readable or its sink writable. In steady state the source
stays armed for reading and no epoll_ctl happens per chunk; only when the sink pushes back
(EAGAIN on the write side) is reading disarmed and writing armed until the pump's bytes are all
written, then back.

Why EAGAIN is ambiguous here (HAProxy's raw_sock.c has the same comment): splice(socket → pipe)
returns EAGAIN when the socket is empty *and* when the pipe is full -- and a pipe fills by page
slots, which socket buffers' fragments use well below its byte size. So the pump keeps an exact
count of the bytes in its pipe, always empties the pipe before reading again, and only takes
EAGAIN from the read side as "socket empty" when its pipe is empty. It never asks for 0 bytes.

A direction copies its first SPLICE_AFTER_BYTES (`splice_after`: tests set 0 to splice from the
first byte) and splices the rest: small exchanges are cheaper through a buffer than through a
pipe; the session record counts what went by splice (`spliced_bytes`). A direction with a
`recording` (a captured session) copies every byte and shows it to the recording, until the
recording says it has stopped (cut at its limit, or its file failed): from then on it splices
again like any other. A pipe is borrowed from
the pool when bytes arrive and returned as soon as it is empty, so an idle session holds no pipe
and no buffer.

The pump reports how its direction ended (EOF only with nothing left to write; SOURCE_RESET;
SINK_RESET) to its owner, which decides what happens next (`tproxy.core.lifecycle`). An
unexpected error is reported too, never raised into the loop.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Protocol

from tproxy.core.lifecycle import Direction, End
from tproxy.core.session import SessionRecord
from tproxy.engine.pipes import Pipe, PipePool
from tproxy.engine.poller import Poller
from tproxy.sniffers.passive import FirstBytes

# <linux/fcntl.h>: splice flags
SPLICE_F_MOVE = 1
SPLICE_F_NONBLOCK = 2
_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
COPY_CHUNK_BYTES = 64 * 1024
# A direction starts by copying and switches to splice once it has moved this much: for the few
# hundred bytes of a typical request or small response, two read/write calls cost less than
# borrowing a pipe and two splices (measured: ~15% more new connections per second), while bulk
# transfers still go zero-copy after their first chunk (HAProxy's splice-auto does the same).
SPLICE_AFTER_BYTES = 64 * 1024
_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})


def read_to_eof(fd: int) -> bool:
    """Read and drop what `fd` holds (a linger after our FIN): True once its peer's FIN came (or
    a reset: the peer is gone all the same), False when it would block first."""
    while True:
        try:
            data = os.read(fd, COPY_CHUNK_BYTES)
        except BlockingIOError:
            return False
        except OSError:
            return True
        if not data:
            return True


class Recording(Protocol):
    """Where a captured session's relayed bytes go (`capture.recorder`): each write's bytes, in
    order, as they reach the sink."""

    def relayed(self, from_client: bool, data: bytes | memoryview) -> bool:
        """`data` was written to the sink; False once the recording has stopped (cut at its
        limit, or its file failed): the pump then forgets it and may splice again."""
        ...

    def ended(self, from_client: bool, reset: bool) -> None:
        """One side sent its FIN (`reset` False) or reset, as the relay saw it."""


class PumpOwner(Protocol):
    """Who hears how a pump ended (a protocol, not callbacks: no bound method per pump)."""

    def pump_ended(self, direction: Direction, end: End) -> None: ...

    def pump_failed(self, exc: BaseException) -> None: ...


class Pump:
    """Moves one direction until EOF or an error, then tells its owner once."""

    __slots__ = (
        "_buffer",
        "_direction",
        "_dst",
        "_in_pipe",
        "_owner",
        "_pipe",
        "_poller",
        "_pool",
        "_reading",
        "_record",
        "_recording",
        "_splice_after",
        "_src",
        "_tap",
        "_writing",
    )

    def __init__(
        self,
        poller: Poller,
        source: int,
        sink: int,
        record: SessionRecord,
        direction: Direction,
        *,
        pool: PipePool | None,
        owner: PumpOwner,
        splice_after: int = SPLICE_AFTER_BYTES,
        tap: FirstBytes | None = None,
        pending: bytes = b"",
        recording: Recording | None = None,
    ) -> None:
        """`source`, `sink`: the two sockets' descriptors (the relay's int objects, shared by
        its two pumps: an idle session keeps two ints, not four). `pending`: bytes read from
        the source before the pump existed (what a session read while sniffing, what an
        upstream proxy sent after its answer), written first. `recording`: shown every byte
        written to the sink (a captured session; it copies)."""
        self._poller = poller
        self._recording = recording
        self._src = source
        self._dst = sink
        self._record = record
        self._direction = direction
        self._pool = pool
        self._owner = owner
        self._splice_after = splice_after
        self._tap = tap
        self._pipe: Pipe | None = None
        self._in_pipe = 0
        self._buffer: memoryview | None = None
        self._reading = True
        self._writing = False
        if pending:
            written = self._write_pending(pending)
            if written < len(pending):  # the rest when the sink takes it (or says it is gone)
                self._buffer = memoryview(pending)[written:]
                self._reading = False
                self._writing = True
                # The source may still be registered for reading by its session (a client that
                # waited to be sniffed): not before the sink took the rest.
                poller.remove_reader(self._src)
                poller.add_writer(self._dst, self)
                return
        # Takes over the source's registration if its session left one (no epoll_ctl then).
        poller.add_reader(self._src, self)

    def _write_pending(self, pending: bytes) -> int:
        """Write what can be written at once (a new connection takes a few KiB: all of it, as a
        rule); an error is left for the flush that follows to meet and report."""
        try:
            written = os.write(self._dst, pending)
        except OSError:
            return 0
        self._count(written)
        if self._recording is not None and not self._recording.relayed(
            self._direction is Direction.UP, pending[:written]
        ):
            self._recording = None
        return written

    def stop(self) -> None:
        """Stop moving bytes; afterwards the pump touches neither socket and calls nobody."""
        self._disarm()
        if self._pipe is not None:
            self._pipe.close()  # may hold bytes that now belong to nobody
            self._pipe = None
        self._buffer = None

    def _disarm(self) -> None:
        if self._reading:
            self._poller.remove_reader(self._src)
            self._reading = False
        if self._writing:
            self._poller.remove_writer(self._dst)
            self._writing = False

    def _finish(self, end: End) -> None:
        self._disarm()
        if self._pipe is not None:
            if self._in_pipe == 0 and self._pool is not None:
                self._pool.give_back(self._pipe)
            else:
                self._pipe.close()
            self._pipe = None
        self._owner.pump_ended(self._direction, end)

    def on_readable(self) -> None:
        try:
            self._move()
        except Exception as exc:  # reported to the session, never raised into the event loop
            self.stop()
            self._owner.pump_failed(exc)

    def on_writable(self) -> None:
        try:
            if not self._flush():
                return
            self._poller.remove_writer(self._dst)
            self._writing = False
            self._poller.add_reader(self._src, self)
            self._reading = True
            self._move()  # the source may have filled while we waited on the sink
        except Exception as exc:
            self.stop()
            self._owner.pump_failed(exc)

    def _move(self) -> None:
        """Read and write until the source is empty, the sink pushes back, or the end."""
        while True:
            pipe = self._pipe
            if pipe is None:
                if (
                    self._pool is None
                    or self._recording is not None  # a recording sees every byte
                    or self._moved() < self._splice_after
                ):
                    if not self._copy_one_chunk():
                        return
                    continue
                try:
                    pipe = self._pipe = self._pool.take()
                except OSError:  # out of descriptors: copy this chunk instead
                    if not self._copy_one_chunk():
                        return
                    continue
            if self._tap is not None:  # bytes about to pass where the tap cannot see them
                self._tap_blind()
            try:
                n = os.splice(self._src, pipe.w, pipe.size_bytes, flags=_FLAGS)
            except BlockingIOError:
                # The pipe is always empty here (we flush before reading again), so EAGAIN
                # means the socket is empty: give the pipe back and wait for more.
                self._pipe = None
                assert self._pool is not None
                self._pool.give_back(pipe)
                return
            except OSError as exc:
                if exc.errno in _GONE:
                    self._finish(End.SOURCE_RESET)
                    return
                raise
            if n == 0:
                self._finish(End.EOF)
                return
            self._in_pipe = n
            # A bulk transfer (we only splice past the first chunks) usually has more by now:
            # reading on until EAGAIN costs one splice, a trip through the poller costs two
            # epoll waits.
            if not self._flush():
                return

    def _copy_one_chunk(self) -> bool:
        """Move one chunk through Python; True if the pump may read again at once."""
        try:
            data = os.read(self._src, COPY_CHUNK_BYTES)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _GONE:
                self._finish(End.SOURCE_RESET)
                return False
            raise
        if not data:
            self._finish(End.EOF)
            return False
        if self._tap is not None and not self._tap.passed(self._direction is Direction.UP, data):
            self._tap = None  # it has seen enough
        self._buffer = memoryview(data)
        # Less than a full chunk: the socket was empty a moment ago, so stop here rather than
        # ask again for an EAGAIN; the level-triggered poller calls back if more has come.
        return self._flush() and len(data) == COPY_CHUNK_BYTES

    def _tap_blind(self) -> None:
        tap = self._tap
        assert tap is not None
        if self._direction is Direction.UP:
            tap.cannot_see()
        else:
            tap.upstream_sent()  # close enough: the upstream is about to send its first bytes
        self._tap = None

    def _moved(self) -> int:
        record = self._record
        return record.bytes_up if self._direction is Direction.UP else record.bytes_down

    def _count(self, n: int) -> None:
        record = self._record
        if self._direction is Direction.UP:
            record.bytes_up += n
        else:
            record.bytes_down += n
        record.last_activity_at = time.monotonic()

    def _push_back(self) -> None:
        """The sink is full: stop reading, wait for the sink to take more."""
        if self._reading:
            self._poller.remove_reader(self._src)
            self._reading = False
        if not self._writing:
            self._poller.add_writer(self._dst, self)
            self._writing = True

    def _flush(self) -> bool:
        """Write the pump's bytes (pipe or buffer) to the sink; False if the sink pushed back."""
        try:
            buffer = self._buffer
            while buffer is not None:
                n = os.write(self._dst, buffer)
                self._count(n)
                if self._recording is not None and not self._recording.relayed(
                    self._direction is Direction.UP, buffer[:n]
                ):
                    self._recording = None
                buffer = self._buffer = buffer[n:] if n < len(buffer) else None
            pipe = self._pipe
            while self._in_pipe:
                assert pipe is not None
                n = os.splice(pipe.r, self._dst, self._in_pipe, flags=_FLAGS)
                self._in_pipe -= n
                self._count(n)
                self._record.spliced_bytes += n
        except BlockingIOError:
            self._push_back()
            return False
        except OSError as exc:
            if exc.errno in _GONE:
                self._finish(End.SINK_RESET)
                return False
            raise
        return True


def splice_works() -> bool:
    """Whether this kernel splices from a socket into a pipe (not every sandbox does)."""
    left, right = socket.socketpair()
    pipe = None
    try:
        pipe = Pipe()
        left.send(b"x")
        return os.splice(right.fileno(), pipe.w, 1, flags=_FLAGS) == 1
    except (OSError, AttributeError):
        return False
    finally:
        left.close()
        right.close()
        if pipe is not None:
            pipe.close()
