"""Least privilege: `tproxy run --user NAME` binds as root, then becomes NAME with CAP_NET_ADMIN.

Theory of operation (capabilities(7), prctl(2)). Started as root, the supervisor binds every
listener (transparent sockets and ports below 1024 need root's capabilities at bind time only),
then, before it forks any worker and before any addon, policy or CA file is read:

1. `PR_SET_KEEPCAPS` 1: in theory a setuid() away from uid 0 clears the permitted set; with the
   flag set it keeps it (the effective set is still emptied, and raised again in step 4).
2. `PR_CAPBSET_DROP` every capability but the ones kept: the bounding set caps what any later
   execve() could ever gain (a setuid-root binary an addon runs gets nothing). It needs
   CAP_SETPCAP, so it is done while still root.
3. `setgroups([gid])`, `setresgid`, `setresuid`: all three ids, so the saved uid cannot bring
   root back.
4. `capset`: effective = permitted = the capabilities kept, inheritable empty; ambient cleared.
   Workers are forked, not exec'd, so they inherit exactly this; a program an addon execs
   gets nothing (no inheritable, no ambient).

What is kept: CAP_NET_ADMIN only (IP_TRANSPARENT on spoofed upstream sockets, SO_MARK on every
upstream socket). CAP_NET_BIND_SERVICE is not: the listeners are bound before the drop and a
restarted worker gets its parent's socket back, never binds again.

After setuid() the kernel makes the process non-dumpable; we leave it so (no core file with the
CA's key in it, and no other process of the same user may ptrace it). /proc/PID/status stays
readable by everyone, and a process may always open its own /proc/self/fd/N (the key log and
the forged leaves' memfds go through those).

No maintained, non-GPL Python library does capset (python-prctl and pyprctl have had no release
for years), so this is ctypes on libc's `prctl` and `capset`; the bit arithmetic is pure and
tested on its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import os
import pwd
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cryptography
import uvloop

import tproxy
from tproxy.interception.sockopts import SO_MARK

# linux/capability.h
CAP_SETPCAP = 8
CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAP_SYS_RESOURCE = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# linux/prctl.h
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

KEPT = frozenset({CAP_NET_ADMIN})
"""What `tproxy run --user` keeps: every process, effective, permitted and bounding sets."""

CAP_LAST_CAP_FILE = Path("/proc/sys/kernel/cap_last_cap")
ROOT_NOTICE = "running as root: consider --user NAME (see README 'Least privilege')"


class PrivilegeError(Exception):
    """Why the privileges could not be dropped: one sentence."""


@dataclass(frozen=True)
class RunAs:
    """The user `--user` names, resolved."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class StartPlan:
    """What `tproxy run` does about privileges, decided before anything is bound.

    drop: bind as root, then become `user` (before any worker, addon or file).
    notice: one notice to log once at start (running as root without --user).
    """

    drop: bool
    notice: str | None = None


def capability_mask(caps: Iterable[int]) -> int:
    """The 64-bit mask with bit N set for each capability N."""
    mask = 0
    for cap in caps:
        if not 0 <= cap < 64:
            raise ValueError(f"capability {cap} is out of range")
        mask |= 1 << cap
    return mask


def capabilities_of(mask: int) -> frozenset[int]:
    """The capability numbers set in a mask (as /proc/PID/status's CapEff: shows them)."""
    return frozenset(cap for cap in range(64) if mask >> cap & 1)


def split_mask(mask: int) -> tuple[int, int]:
    """A 64-bit mask as capset's version-3 halves: (capabilities 0-31, 32-63)."""
    return mask & 0xFFFFFFFF, mask >> 32 & 0xFFFFFFFF


def parse_status_capabilities(status: str) -> dict[str, int]:
    """The Cap* lines of a /proc/PID/status text: {"CapEff": mask, ...}."""
    found = {}
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Cap") and value.strip():
            found[key] = int(value.strip(), 16)
    return found


def has_capability(cap: int, status: str | None = None) -> bool:
    """Whether this process has `cap` in its effective set now."""
    if status is None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return False
    return cap in capabilities_of(parse_status_capabilities(status).get("CapEff", 0))


def resolve_user(name: str) -> RunAs:
    """The user named by `--user` (a name, or a number); raises PrivilegeError."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        entry = None
        if name.isdigit():
            with contextlib.suppress(KeyError):
                entry = pwd.getpwuid(int(name))
    if entry is None:
        raise PrivilegeError(f"--user {name}: no such user (create it with 'useradd --system "
                             f"--no-create-home --shell /usr/sbin/nologin {name}')")  # fmt: skip
    try:
        grp.getgrgid(entry.pw_gid)
    except KeyError:
        raise PrivilegeError(f"--user {name}: its group {entry.pw_gid} does not exist") from None
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def plan_start(euid: int, user: RunAs | None) -> StartPlan:
    """What to do about privileges, from who we are and `--user`; raises PrivilegeError.

    Root with --user drops after binding; already that user (systemd's `User=` with `--user`
    in the arguments too), nothing to do; another non-root user cannot become anyone.
    """
    if user is None:
        return StartPlan(drop=False, notice=ROOT_NOTICE if euid == 0 else None)
    if euid == user.uid:
        return StartPlan(drop=False, notice=ROOT_NOTICE if euid == 0 else None)
    if euid != 0:
        raise PrivilegeError(f"--user {user.name} needs tproxy started as root (it runs as uid "
                             f"{euid}; without --user it keeps what it was given)")  # fmt: skip
    return StartPlan(drop=True)


def check_can_mark(mark: int) -> None:
    """Raise PrivilegeError unless this process may put `mark` on a socket (SO_MARK needs
    CAP_NET_ADMIN): every upstream socket carries it, so without it every session would fail;
    in tproxy mode the transparent listener already said so, in redirect mode only this does."""
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except OSError as exc:
        raise PrivilegeError(
            f"cannot mark upstream sockets (SO_MARK {mark:#x}, which the rules exempt): "
            f"{exc.strerror} (needs CAP_NET_ADMIN)"
        ) from None


def code_directories() -> list[str]:
    """Where this process imports from as it runs (Python's library, tproxy, its dependencies):
    a module imported late (`encodings.idna` at the first TLS name) is read from there."""
    found = [os.path.dirname(os.__file__)]
    for module in (tproxy, uvloop, cryptography):
        found.append(os.path.dirname(os.path.dirname(module.__file__ or "")))
    return list(dict.fromkeys(found))


def check_code_readable(user: RunAs, directories: Iterable[str]) -> None:
    """After the switch: raise PrivilegeError unless the user can read `directories` (a Python
    under root's home, say), so that a late import fails the start, not a session."""
    for directory in directories:
        if directory and not os.access(directory, os.R_OK | os.X_OK):
            raise PrivilegeError(f"--user {user.name} cannot read {directory}, where tproxy "
                                 "imports from as it runs: install tproxy (and its Python) "
                                 "where that user can read it")  # fmt: skip


def bounding_drops(last_cap: int, keep: frozenset[int]) -> list[int]:
    """The capabilities to drop from the bounding set: all up to `last_cap` but `keep`."""
    return [cap for cap in range(last_cap + 1) if cap not in keep]


# --- the system calls -------------------------------------------------------------------------


class _CapHeader(ctypes.Structure):  # linux/capability.h: struct __user_cap_header_struct
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):  # linux/capability.h: struct __user_cap_data_struct
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(libc: ctypes.CDLL, option: int, arg2: int = 0, arg3: int = 0) -> int:
    result: int = libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                             ctypes.c_ulong(0), ctypes.c_ulong(0))  # fmt: skip
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _capset(libc: ctypes.CDLL, effective: int, permitted: int, inheritable: int) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i, (e, p, h) in enumerate(zip(split_mask(effective), split_mask(permitted),
                                      split_mask(inheritable), strict=True)):  # fmt: skip
        data[i].effective, data[i].permitted, data[i].inheritable = e, p, h
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _last_cap() -> int:
    try:
        return int(CAP_LAST_CAP_FILE.read_text())
    except (OSError, ValueError):
        return 40  # CAP_CHECKPOINT_RESTORE, Linux 5.9; EINVAL beyond the kernel's is ignored


def drop_privileges(user: RunAs, keep: frozenset[int] = KEPT) -> None:
    """Become `user` with only `keep` (effective, permitted, bounding), as the module docstring
    describes; call as root before forking. Raises PrivilegeError (one sentence)."""
    libc = _libc()
    step = "PR_SET_KEEPCAPS"
    try:
        _prctl(libc, PR_SET_KEEPCAPS, 1)
        step = "PR_CAPBSET_DROP"
        for cap in bounding_drops(_last_cap(), keep):
            try:
                _prctl(libc, PR_CAPBSET_DROP, cap)
            except OSError as exc:
                if exc.errno != 22:  # EINVAL: a capability this kernel does not have
                    raise
        step = "setgroups"
        os.setgroups([user.gid])
        step = "setresgid"
        os.setresgid(user.gid, user.gid, user.gid)
        step = "setresuid"
        os.setresuid(user.uid, user.uid, user.uid)
        step = "capset"
        mask = capability_mask(keep)
        _capset(libc, mask, mask, 0)
        step = "PR_CAP_AMBIENT_CLEAR_ALL"
        _prctl(libc, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
        step = "PR_SET_KEEPCAPS"
        _prctl(libc, PR_SET_KEEPCAPS, 0)
    except OSError as exc:
        raise PrivilegeError(
            f"--user {user.name}: cannot drop privileges ({step}: {exc.strerror or exc})"
        ) from None
    if os.getresuid() != (user.uid,) * 3 or os.getresgid() != (user.gid,) * 3:
        raise PrivilegeError(f"--user {user.name}: the switch to uid {user.uid} did not hold")
