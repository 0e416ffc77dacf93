"""Pruning the capture directory: `--capture-max-total` and `--capture-max-age`, oldest finished
files first, never a `.part` (a capture still being written).

`to_delete` decides (pure: the files, the clock and the limits in, names out); `scan` and
`prune` are the thin I/O around it; `CapturePruner` says when to run and what to log.

One process prunes, every `PRUNE_INTERVAL_S`: the supervisor when there are workers (each worker
writes its own files into the one directory; the supervisor sees them all and is off the data
path), else the single process, off its event loop. A file that vanished between the scan and its
deletion (another tproxy on the same directory, an operator) is simply gone: not an error.

Only capture files are counted and deleted (named as `capture_name` names them, with or without
`.part`): anything else in the directory, an operator's own `notes.pcapng` included, is left be.
A `.part` counts toward the total (it takes the space) but is never chosen; when the `.part` files
alone exceed the total, every finished file goes. The exception is an orphaned `.part`, whose
writer died (its `flock` is gone: `files`) more than `ORPHAN_AFTER_S` after it last wrote: it
will never be finished, so it counts as a finished file, and goes in its turn.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from tproxy.capture.files import PART_SUFFIX, is_capture_name
from tproxy.core.config import ProxyConfig

PRUNE_INTERVAL_S = 5.0
# A `.part` younger than this is never taken for an orphan: its writer may be between creating
# it and locking it.
ORPHAN_AFTER_S = 30.0


@dataclass(frozen=True, slots=True)
class FileInfo:
    """One capture file: its name in the directory, size in bytes, mtime (wall-clock seconds)."""

    name: str
    size: int
    mtime: float
    orphaned: bool = False  # a `.part` whose writer died (see the module doc)

    @property
    def finished(self) -> bool:
        """Written to the end, or never to be: a final name, or an orphaned `.part`."""
        return self.orphaned or not self.name.endswith(PART_SUFFIX)


def to_delete(
    files: Sequence[FileInfo], now: float, max_total: int | None, max_age: float | None
) -> list[str]:
    """Which finished files to delete, oldest first, so that what stays is within the limits.

    Args:
        files: the directory's capture files, `.part` ones included (they count toward the
            total, and are never chosen).
        now: the wall-clock time the ages are measured at.
        max_total: the most bytes all of `files` may take after the deletion; None: no limit.
        max_age: the oldest a finished file may be (`now - mtime`), in seconds; None: no limit.

    Returns:
        Names of finished files: every one older than `max_age`, then the oldest others until
        the total is within `max_total` (or no finished file is left). Oldest is the earliest
        mtime, ties by name (names start with the session's start time).
    """
    finished = sorted((f for f in files if f.finished), key=lambda f: (f.mtime, f.name))
    total = sum(f.size for f in files)
    chosen: list[str] = []
    for info in finished:
        too_old = max_age is not None and now - info.mtime > max_age
        too_big = max_total is not None and total > max_total
        if not (too_old or too_big):
            break  # sorted oldest first: every later file is younger, and the total fits
        chosen.append(info.name)
        total -= info.size
    return chosen


def scan(directory: str, now: float | None = None) -> list[FileInfo]:
    """The capture files in `directory` (regular files only; one that vanishes while scanned is
    left out), each `.part` older than `ORPHAN_AFTER_S` at `now` checked for its writer's lock.

    Raises:
        OSError: the directory cannot be listed.
    """
    now = time.time() if now is None else now
    found = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not is_capture_name(entry.name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            orphaned = (
                entry.name.endswith(PART_SUFFIX)
                and now - stat.st_mtime > ORPHAN_AFTER_S
                and _unlocked(entry.path)
            )
            found.append(FileInfo(entry.name, stat.st_size, stat.st_mtime, orphaned))
    return found


def _unlocked(path: str) -> bool:
    """Whether no process holds the writer's lock on `path` (False when it cannot be told)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # EWOULDBLOCK: its writer is alive
        return False
    finally:
        os.close(fd)  # also lets go of a lock taken
    return True


def prune(
    directory: str, now: float, max_total: int | None, max_age: float | None
) -> tuple[list[FileInfo], list[str]]:
    """Delete what `to_delete` chooses in `directory`.

    Returns:
        The files deleted (a file someone else deleted first is not among them) and one line per
        file that could not be deleted (e.g. `EACCES`).

    Raises:
        OSError: the directory cannot be listed.
    """
    files = scan(directory, now)
    by_name = {f.name: f for f in files}
    deleted: list[FileInfo] = []
    errors: list[str] = []
    for name in to_delete(files, now, max_total, max_age):
        try:
            os.unlink(os.path.join(directory, name))
        except FileNotFoundError:
            continue
        except OSError as exc:
            errors.append(f"{name}: {exc.strerror or exc}")
            continue
        deleted.append(by_name[name])
    return deleted, errors


def _size_text(size: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size / (1 << shift):.1f} {unit}"
    return f"{size} bytes"


def render_prune_notice(directory: str, deleted: Sequence[FileInfo]) -> str | None:
    """The notice a prune writes: how many files and bytes it deleted (None: nothing)."""
    if not deleted:
        return None
    count = len(deleted)
    size = sum(f.size for f in deleted)
    files = "file" if count == 1 else "files"
    return (
        f"capture: pruned {count} finished {files} ({_size_text(size)}) from {directory} "
        "(capture_max_total / capture_max_age)"
    )


class CapturePruner:
    """When to prune the capture directory, and what to log about it; one per pruning process.

    `due(now, config)` on the caller's own clock tick; then `run(config)` (on any thread: the
    single process runs it off its loop) returns the notices to log. A failure (the directory
    cannot be listed, a file cannot be deleted) is logged when it first happens, not every
    round it lasts.
    """

    def __init__(self, interval_s: float = PRUNE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.next_at = 0.0  # monotonic
        self._running = threading.Lock()
        self._last_errors: set[str] = set()

    def due(self, now: float, config: ProxyConfig) -> bool:
        """Whether to run now (monotonic `now`): a directory, a limit, the interval passed,
        and no run still going."""
        if config.capture_dir is None or (
            config.capture_max_total_bytes is None and config.capture_max_age_s is None
        ):
            return False
        if now < self.next_at or self._running.locked():
            return False
        self.next_at = now + self.interval_s
        return True

    def run(self, config: ProxyConfig) -> list[str]:
        """Prune `config`'s directory to its limits now; the notices to log."""
        directory = config.capture_dir
        if directory is None or not self._running.acquire(blocking=False):
            return []
        try:
            try:
                deleted, errors = prune(
                    directory,
                    time.time(),
                    config.capture_max_total_bytes,
                    config.capture_max_age_s,
                )
            except OSError as exc:
                deleted, errors = [], [f"cannot prune {directory}: {exc.strerror or exc}"]
            else:
                errors = [f"cannot delete {line}" for line in errors]
            new_errors = [f"capture: {e}" for e in errors if e not in self._last_errors]
            self._last_errors = set(errors)
            notice = render_prune_notice(directory, deleted)
            return new_errors if notice is None else [notice, *new_errors]
        finally:
            self._running.release()
