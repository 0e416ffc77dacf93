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

The per-user pipe budget (pipe(7)): in theory pipes are cheap; in practice a user without
CAP_SYS_RESOURCE (or CAP_SYS_ADMIN) may hold at most `fs.pipe-user-pages-soft` pages (16,384 by
default: 64 MiB) in all its pipes together, every process of that user counted; past it each new
pipe gets two pages (8 KiB: splice still works, more slowly) and a resize fails, and past
`fs.pipe-user-pages-hard` (0: none) a new pipe fails (that chunk is copied instead). A proxy
run as root has no such limit; one run as a user (`--user`, systemd's `User=`) shares the
budget among its workers. `budgeted_pipe_size` then picks a size at which every worker's pool
(`POOL_MAX_IDLE` idle pipes plus as many in flight) fits the budget, so 1 MiB pipes do not eat
it all in 64 sessions and leave the rest with 8 KiB ones.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

PIPE_SIZE_BYTES = 1 << 20
# The kernel's default pipe: 16 pages (include/linux/pipe_fs_i.h: PIPE_DEF_BUFFERS).
PIPE_DEF_BUFFERS = 16
# Idle pipes kept for reuse; more than this are closed when given back.
POOL_MAX_IDLE = 64
# Pipes one worker is sized for under a pipe budget: its idle pool and as many in flight.
PIPES_PER_WORKER = 2 * POOL_MAX_IDLE
PIPE_USER_PAGES_SOFT = Path("/proc/sys/fs/pipe-user-pages-soft")

# The size new pipes ask for in this process (and the workers it forks): `set_pipe_size`.
_size_bytes = [PIPE_SIZE_BYTES]


def budgeted_pipe_size(soft_pages: int, page_bytes: int, workers: int, limited: bool) -> int:
    """The pipe size for `workers` processes of one user whose pipes may hold `soft_pages`
    pages together (0: no limit; `limited` False: the user is exempt, e.g. root): the largest
    power of two up to `PIPE_SIZE_BYTES` at which each worker gets `PIPES_PER_WORKER` pipes,
    never below the kernel's default pipe (asking for less saves nothing)."""
    if not limited or soft_pages <= 0:
        return PIPE_SIZE_BYTES
    floor = PIPE_DEF_BUFFERS * page_bytes
    per_pipe = soft_pages * page_bytes // (max(workers, 1) * PIPES_PER_WORKER)
    size = PIPE_SIZE_BYTES
    while size > floor and size > per_pipe:
        size //= 2
    return max(size, floor)


def read_pipe_budget_pages() -> int:
    """fs.pipe-user-pages-soft (0: no limit, or unreadable)."""
    try:
        return int(PIPE_USER_PAGES_SOFT.read_text())
    except (OSError, ValueError):
        return 0


def set_pipe_size(size_bytes: int) -> None:
    """The size new pools give their pipes, for this process and the workers it forks."""
    _size_bytes[0] = size_bytes


def pipe_size() -> int:
    return _size_bytes[0]


def pages_for_full_size(workers: int, page_bytes: int) -> int:
    """The fs.pipe-user-pages-soft at which `workers` get full-size pipes."""
    return max(workers, 1) * PIPES_PER_WORKER * PIPE_SIZE_BYTES // page_bytes


def apply_pipe_budget(workers: int, limited: bool) -> str | None:
    """Size this process's pipes (and its workers') for the user's pipe budget; a notice when
    they are smaller than `PIPE_SIZE_BYTES` for it (None otherwise)."""
    soft = read_pipe_budget_pages()
    page = os.sysconf("SC_PAGE_SIZE")
    size = budgeted_pipe_size(soft, page, workers, limited)
    set_pipe_size(size)
    if size >= PIPE_SIZE_BYTES:
        return None
    return (
        f"splice pipes of {size >> 10} KiB, not {PIPE_SIZE_BYTES >> 20} MiB: this user's pipe "
        f"budget (fs.pipe-user-pages-soft = {soft} pages, {soft * page >> 20} MiB, for every "
        f"process of the user) is shared by {workers} workers; for full-size pipes: sysctl -w "
        f"fs.pipe-user-pages-soft={pages_for_full_size(workers, page)} (or CAP_SYS_RESOURCE)"
    )


class Pipe:
    """One pipe: read end, write end, and its capacity in bytes."""

    __slots__ = ("r", "size_bytes", "w")

    def __init__(self, size_bytes: int | None = None) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # EPERM: over the user's pipe budget or pipe-max-size; then keep the default size.
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, size_bytes or _size_bytes[0])
        self.size_bytes: int = fcntl.fcntl(self.w, fcntl.F_GETPIPE_SZ)

    def close(self) -> None:
        for fd in (self.r, self.w):
            with contextlib.suppress(OSError):
                os.close(fd)


class PipePool:
    """Lends empty pipes; takes them back empty (or closes them)."""

    def __init__(self, max_idle: int = POOL_MAX_IDLE, pipe_size_bytes: int | None = None) -> None:
        self._idle: list[Pipe] = []
        self._max_idle = max_idle
        self.pipe_size_bytes = pipe_size_bytes or _size_bytes[0]

    def take(self) -> Pipe:
        """An empty pipe. Raises OSError (EMFILE...) when no pipe can be made."""
        return self._idle.pop() if self._idle else Pipe(self.pipe_size_bytes)

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
