"""Capture files: one per captured session, named so a person finds it from the log, written
as `NAME.part` and renamed to `NAME` when the session ends, so no reader ever sees a half-written
file under its final name.

Theory of operation:

* **Names** (`capture_name`, pure): `20261201T041500Z_01kbj9dq70102_198.18.1.2_50000_to_
  198.18.2.2_443.pcapng` -- the session's start in UTC to the second (names sort by time), its
  id (what the log calls it), the client and the original destination as `host_port`, an IPv6
  address's colons as dashes (`2001-db8--1_443`). Splitting a name on `_` always gives the same
  seven fields: no part of it contains `_`.
* **Creation**: `O_CREAT | O_EXCL` (never another file, nor a symlink someone planted), then
  `fchmod(0600)`: `open`'s mode passes through the umask, which could leave the file unwritable
  or, with some umasks, readable by others; a capture holds whatever the client sent.
* **A failed write** (ENOSPC, EDQUOT, EIO, ...) ends the capture, not the session: the `.part` is
  closed and removed at once, and `error` says why for the engine's log. Removed, not kept:
  the disk that refused the write needs the space back more than anyone needs a file cut
  mid-record, which Wireshark would warn about, and which the encoder could no longer close
  with its truncation comment.
* **The writer's lock**: the writer holds `flock(LOCK_EX)` on its `.part` for as long as it
  writes; the kernel drops it when the process dies, however it dies. A `.part` nobody holds is
  one whose writer died (kill -9, the OOM killer) and will never be finished: pruning treats it
  as a finished file (`prune.scan`), so a crash cannot leave a `.part` that counts toward the
  total forever and makes every new capture the next to go.
* **Finishing**: the mtime is set to now (a capture cut early, or idle for hours, would otherwise
  carry the time of its last write, and the age limit could delete it just after the close event
  named it), close, then `rename(NAME.part, NAME)` in the same directory: atomic, so the final
  name appears whole or not at all. No fsync: readers on this system see the written pages
  whether or not they reached the disk, and a flush per captured session would block the event
  loop for a disk round trip; after a power loss a capture may be short or empty, as is
  everything else the proxy had not flushed. Names cannot collide (the session id is unique), so
  rename's replacing of an existing file never happens in practice.

`write` is a plain blocking `os.write` to the page cache; the engine decides when to call it
(its memory bound is its own).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import time
from dataclasses import dataclass

CAPTURE_SUFFIX = ".pcapng"
PART_SUFFIX = ".part"
CAPTURE_MODE = 0o600
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
# Anything else in a name part (there should be nothing: addresses, ports, ids) becomes this.
_UNSAFE = re.compile(r"[^0-9A-Za-z.%-]")


def _endpoint_part(endpoint: str) -> str:
    """`198.18.1.2:50000` -> `198.18.1.2_50000`; `[2001:db8::1]:443` -> `2001-db8--1_443`."""
    host, sep, port = endpoint.rpartition(":")
    if not sep:
        host, port = endpoint, ""
    host = host.removeprefix("[").removesuffix("]").replace(":", "-")
    part = _UNSAFE.sub("~", host)
    return f"{part}_{_UNSAFE.sub('~', port)}" if port else part


def capture_name(started_at: float, session_id: str, client: str, dst: str) -> str:
    """The final file name of a session's capture.

    Args:
        started_at: when the session started, wall-clock seconds (`time.time()`).
        session_id: the session id as the log writes it.
        client: the client's endpoint as the log writes it (`ip:port`, `[ip]:port`).
        dst: the original destination, likewise.

    Returns:
        `YYYYMMDDTHHMMSSZ_ID_CLIENTHOST_PORT_to_DSTHOST_PORT.pcapng`, no `/`, no `:`, no `_`
        inside a field.
    """
    when = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started_at))
    ident = _UNSAFE.sub("~", session_id)
    return f"{when}_{ident}_{_endpoint_part(client)}_to_{_endpoint_part(dst)}{CAPTURE_SUFFIX}"


# What `capture_name` makes, finished or not: the one shape pruning may delete.
_CAPTURE_NAME = re.compile(
    r"[0-9]{8}T[0-9]{6}Z_[^_/]+_[^_/]+_[^_/]+_to_[^_/]+_[^_/]+"
    + re.escape(CAPTURE_SUFFIX)
    + f"(?:{re.escape(PART_SUFFIX)})?"
)


def is_capture_name(name: str) -> bool:
    """Whether `name` is one `capture_name` makes (or its `.part`): a file tproxy wrote."""
    return _CAPTURE_NAME.fullmatch(name) is not None


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, "error")
    return f"{name}: {exc.strerror or exc}"


@dataclass(eq=False)
class CaptureFile:
    """One capture being written: `write` while the session relays, then `finish` or `abandon`.

    Made by `open_capture`. Attributes:
        path: the final path (where `finish` puts the file).
        part_path: the path while it is written (`path` + `.part`).
        bytes_written: bytes written so far.
        error: why writing failed (`"ENOSPC: No space left on device"`), else None; once set,
            the `.part` is gone and `write` and `finish` do nothing.
    """

    path: str
    part_path: str
    _fd: int
    bytes_written: int = 0
    error: str | None = None
    _finished: bool = False

    @property
    def is_open(self) -> bool:
        return self._fd >= 0

    def write(self, data: bytes) -> bool:
        """Append `data`; False once writing has failed (see `error`) or the file was closed."""
        if self._fd < 0:
            return False
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self.bytes_written += written
        except OSError as exc:
            self._fail(_describe(exc))
            return False
        return True

    def finish(self) -> str | None:
        """Close and rename to the final name; the final path, or None if writing failed (or
        closing or renaming did: `error` says why, and the `.part` is removed)."""
        if self._finished:
            return self.path
        if self._fd < 0:
            return None
        fd, self._fd = self._fd, -1
        try:
            os.utime(fd)  # the age limit counts from the end of the session (see the module doc)
            os.close(fd)  # may report a delayed write error (NFS, some quotas)
            os.rename(self.part_path, self.path)
        except OSError as exc:
            self.error = _describe(exc)
            _unlink_quietly(self.part_path)
            return None
        self._finished = True
        return self.path

    def abandon(self) -> None:
        """Close and remove the `.part` (the capture is not wanted after all); idempotent."""
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            with contextlib.suppress(OSError):
                os.close(fd)
            _unlink_quietly(self.part_path)

    def _fail(self, error: str) -> None:
        self.error = error
        self.abandon()


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):  # gone already, or the directory is unwritable: let be
        os.unlink(path)


def open_capture(directory: str, name: str) -> CaptureFile:
    """Create `directory/name.part`, 0600 whatever the umask, locked, for writing a capture.

    Raises:
        OSError: it could not be created (FileExistsError if the `.part` exists already).
    """
    path = os.path.join(directory, name)
    part_path = path + PART_SUFFIX
    fd = os.open(part_path, _OPEN_FLAGS, CAPTURE_MODE)
    try:
        os.fchmod(fd, CAPTURE_MODE)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "being written" (see the module doc)
    except OSError:
        os.close(fd)
        _unlink_quietly(part_path)
        raise
    return CaptureFile(path, part_path, fd)
