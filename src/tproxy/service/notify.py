"""systemd's notify protocol (`sd_notify(3)`): telling the service manager that tproxy is ready,
stopping, alive (the watchdog) and what it is doing (`STATUS=`), over the datagram socket named
by `NOTIFY_SOCKET`.

The protocol is small enough that a library would be more code than it saves: one datagram per
message, newline-separated `KEY=VALUE` assignments, to the AF_UNIX socket in `NOTIFY_SOCKET` (a
path, or `@name` for the abstract namespace). `WATCHDOG_USEC` asks for `WATCHDOG=1` at least
that often (we send at half of it, as `sd_watchdog_enabled(3)` advises), for the process in
`WATCHDOG_PID` when it is set. Without `NOTIFY_SOCKET` (not started by systemd, or a unit not
`Type=notify`) every call does nothing.

Sending never blocks and never raises: the socket is non-blocking, and a failure (systemd gone,
its queue full) is counted in `failures` and otherwise ignored -- a service manager that cannot
be told something must not stop the proxy. The pure part (`parse_address`,
`watchdog_interval_s`, `message`) is separate from the one socket (`Notifier`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Final

MAX_STATUS_CHARS: Final = 200
"""The longest `STATUS=` text sent (one line of printable ASCII: systemctl status shows it)."""


class NotifyError(ValueError):
    """`NOTIFY_SOCKET` or `WATCHDOG_USEC` holds something that is not what systemd sets."""


def parse_address(value: str) -> str:
    """The socket address in `NOTIFY_SOCKET`: an absolute path, or `@name` for Linux's abstract
    namespace (returned with its leading NUL, as `socket.connect` takes it).

    Raises:
        NotifyError: an empty value, a relative path, a `vsock:` address (not for us).
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise NotifyError(f"NOTIFY_SOCKET={value!r} is not an absolute path or @abstract name")


def watchdog_interval_s(env: Mapping[str, str], pid: int) -> float | None:
    """How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`; None when no watchdog is asked
    for this process (`WATCHDOG_PID` set to another process, `WATCHDOG_USEC` unset or 0).

    Raises:
        NotifyError: `WATCHDOG_USEC` or `WATCHDOG_PID` is not a number.
    """
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    watched = env.get("WATCHDOG_PID")
    try:
        if watched and int(watched) != pid:
            return None
        microseconds = int(usec)
    except ValueError:
        raise NotifyError(f"WATCHDOG_USEC={usec!r} WATCHDOG_PID={watched!r}: not numbers") from None
    if microseconds <= 0:
        return None
    return microseconds / 2 / 1_000_000


def _status_text(text: str) -> str:
    """`text` as one printable ASCII line of at most `MAX_STATUS_CHARS` characters."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return cleaned[:MAX_STATUS_CHARS]


def message(
    *, ready: bool = False, stopping: bool = False, reloading: bool = False,
    watchdog: bool = False, status: str | None = None, mainpid: int | None = None,
) -> bytes:  # fmt: skip
    """One notify datagram: the assignments asked for, in the order systemd's docs list them."""
    lines = []
    if ready:
        lines.append("READY=1")
    if reloading:
        lines.append("RELOADING=1")
    if stopping:
        lines.append("STOPPING=1")
    if mainpid is not None:
        lines.append(f"MAINPID={mainpid}")
    if watchdog:
        lines.append("WATCHDOG=1")
    if status is not None:
        lines.append(f"STATUS={_status_text(status)}")
    return "\n".join(lines).encode("ascii")


class Notifier:
    """The notify socket of this process, if systemd gave one (`from_env`).

    Args:
        address: what `parse_address` returned; None: every send does nothing.
    """

    __slots__ = ("_address", "_sock", "failures", "sent")

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None
        self.failures = 0
        self.sent = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Notifier:
        """The notifier `NOTIFY_SOCKET` names (none without it).

        Raises:
            NotifyError: `NOTIFY_SOCKET` is set to something systemd does not set.
        """
        value = (os.environ if env is None else env).get("NOTIFY_SOCKET")
        return cls(parse_address(value) if value else None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, datagram: bytes) -> bool:
        """Send one datagram (`message(...)`); False when it could not be (or no socket)."""
        if self._address is None or not datagram:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(datagram, self._address)
        except OSError:
            self.failures += 1
            return False
        self.sent += 1
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send(message(ready=True, status=status))

    def stopping(self, status: str | None = None) -> bool:
        return self.send(message(stopping=True, status=status))

    def reloading(self) -> bool:
        return self.send(message(reloading=True))

    def watchdog(self) -> bool:
        return self.send(message(watchdog=True))

    def status(self, text: str) -> bool:
        return self.send(message(status=text))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
