"""The pipe pool: pipes for splice, lent to a direction only while it has bytes in flight.

Two pipes per session would cap one process at ~3,300 sessions under a 20,000-descriptor limit
and cost two more descriptors per idle session; a direction takes a pipe when data arrives and
gives it back as soon as the pipe is empty, so an idle session holds none. A pipe that still holds
bytes when its session aborts is closed, never reused (its bytes belong to nobody).

The pool keeps at most as many idle pipes as there are live sessions (and never more than
POOL_MAX_IDLE), so when the last session ends the proxy is back to its baseline descriptors.

Pipe size: 1 MiB pipes cost less than half the CPU per GB of the default 64 KiB ones.
F_SETPIPE_SZ above /proc/sys/fs/pipe-max-size, or beyond the per-user pipe budget, fails with
EPERM: then the pipe keeps the size it has.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

PIPE_SIZE_BYTES = 1 << 20
# Idle pipes kept for reuse; more than this are closed when given back.
POOL_MAX_IDLE = 64


class Pipe:
    """One pipe: read end, write end, and its capacity in bytes."""

    __slots__ = ("r", "size_bytes", "w")

    def __init__(self) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # EPERM: over the user's pipe budget or pipe-max-size; then keep the default size.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE_BYTES)
        self.size_bytes: int = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


class PipePool:
    """Lends empty pipes; takes them back empty (or closes them)."""

    def __init__(self, max_idle: int = POOL_MAX_IDLE) -> None:
        self._idle: list[Pipe] = []
        self._max_idle = max_idle

    def take(self) -> Pipe:
        """An empty pipe. Raises OSError (EMFILE...) when no pipe can be made."""
        return self._idle.pop() if self._idle else Pipe()

    def give_back(self, pipe: Pipe) -> None:
        """Return an *empty* pipe."""
        if len(self._idle) < self._max_idle:
            self._idle.append(pipe)
        else:
            pipe.close()

    def trim(self, keep: int) -> None:
        """Close idle pipes beyond `keep`: a quiet proxy holds no pipe at all."""
        while len(self._idle) > keep:
            self._idle.pop().close()

    def close(self) -> None:
        self.trim(0)
