"""The control socket: how a running tproxy is asked things from outside (a Unix stream socket
of the supervisor's, 0600, `--control PATH`).

Where it is: `--control PATH`, by default `/run/tproxy/tproxy-net<N>.sock` where N names the
network namespace (the inode of `/proc/self/ns/net`), so that proxies in different namespaces
(the lab's routers, containers) never collide and `tproxy` commands run in a namespace find the
proxy of that namespace. A second `tproxy run` in the same namespace finds the socket answering
and stops with one line (or, with `--takeover`, takes the listeners over); a socket file nobody
answers on (a proxy killed with SIGKILL) is replaced.

The protocol: one JSON object per line each way, `{"command": ...}` then `{"ok": true, ...}` or
`{"ok": false, "error": "..."}`; listening sockets travel as SCM_RIGHTS with their reply. The
commands:

* `takeover` (`tproxy run --takeover`, a seamless restart): the reply holds every listening
  socket (each endpoint's, one per worker, in the order of the reuseport group: the steering
  keeps its clients on the same worker index) with the endpoints and the worker count, and last
  the control socket itself. The connection stays open; the new process sends
  `{"command": "drain"}` on it once all its workers serve, and then the old one stops answering
  on the control socket (the new one answers there from then on: the same socket, so the path
  is never unlinked and bound again, which a process that has dropped root could not do in
  /run/tproxy), and drains and exits as on SIGTERM -- its live sessions finish there. If the
  new process goes away before that (it failed to start), the old one keeps serving, as if
  nothing had happened. The listening sockets never close in between: no
  connection attempt is refused or reset.

Everything here is blocking I/O with short timeouts on one local connection at a time, run from
the supervisor's loop (a client that stalls costs it at most `IO_TIMEOUT_S`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
from collections.abc import Callable, Sequence
from typing import Any, Final

DEFAULT_DIR: Final = "/run/tproxy"
IO_TIMEOUT_S: Final = 2.0
MAX_LINE_BYTES: Final = 64 * 1024
# An answer may be larger than a request: `sessions` lists up to 1,000 sessions of some 250
# bytes per worker (MAX_WORKER of them at most in theory; a few MiB in practice).
MAX_ANSWER_BYTES: Final = 64 << 20
MAX_FDS: Final = 1024


class ControlError(Exception):
    """The control socket cannot be made, or a request failed: one line for the user."""


def default_control_path() -> str:
    """`/run/tproxy/tproxy-net<N>.sock`, N this network namespace's inode number."""
    try:
        namespace = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        namespace = 0
    return os.path.join(DEFAULT_DIR, f"tproxy-net{namespace}.sock")


def answers(path: str) -> bool:
    """Whether a process listens on the control socket at `path`."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.settimeout(IO_TIMEOUT_S)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def open_control_socket(path: str) -> socket.socket:
    """Listen on `path` (made 0600; its directory, if missing, 0755).

    Raises:
        ControlError: another tproxy answers there, or the socket cannot be made.
    """
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ControlError(f"--control {path}: exists and is not a socket")
            if answers(path):
                raise ControlError(
                    f"another tproxy is running here (its control socket {path} answers): stop "
                    "it, or start this one with --takeover to replace it without refusing "
                    "connections"
                )
            os.unlink(path)  # a stale one: its proxy is gone
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # 0600 from the start: no moment where others may connect
        try:
            sock.bind(path)
        finally:
            os.umask(old_umask)
        sock.listen(16)
        sock.setblocking(False)
    except ControlError:
        raise
    except OSError as exc:
        raise ControlError(f"--control {path}: {exc.strerror or exc}") from None
    return sock


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def read_message(sock: socket.socket, limit: int = MAX_LINE_BYTES) -> dict[str, Any] | None:
    """One line from a blocking socket (with its timeout), as a JSON object; None at EOF.

    Raises:
        ControlError: not a JSON object on one line of at most `limit` bytes, or a timeout.
    """
    data = bytearray()
    try:
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                if not data:
                    return None
                break
            data += chunk
            if len(data) > limit:
                raise ControlError(f"a control message longer than {limit >> 10} KiB")
    except TimeoutError:
        raise ControlError("the control socket's peer did not answer in time") from None
    except OSError as exc:
        raise ControlError(f"the control socket: {exc.strerror or exc}") from None
    return _parsed(bytes(data))


def _parsed(data: bytes) -> dict[str, Any]:
    try:
        message = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ControlError("a control message that is not JSON") from None
    if not isinstance(message, dict):
        raise ControlError("a control message that is not a JSON object")
    return message


def send_message(sock: socket.socket, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
    """Send one message, with `fds` as SCM_RIGHTS (on its first byte)."""
    data = encode(message)
    if fds:
        sent = socket.send_fds(sock, [data], list(fds))
        data = data[sent:]
    if data:  # (even an empty send fails once the peer has gone)
        sock.sendall(data)


def receive_with_fds(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One message and the descriptors that came with it (the reply to `takeover`).

    Raises:
        ControlError: as `read_message`, or the peer closed without answering.
    """
    data = bytearray()
    fds: list[int] = []
    try:
        while not data.endswith(b"\n"):
            chunk, got, flags, _ = socket.recv_fds(sock, MAX_LINE_BYTES, MAX_FDS)
            fds += got
            if flags & socket.MSG_CTRUNC:
                _close(fds)
                raise ControlError("more listening sockets than a takeover carries")
            if not chunk:
                _close(fds)
                raise ControlError("the running tproxy closed the control socket without answering")
            data += chunk
    except TimeoutError:
        _close(fds)
        raise ControlError("the running tproxy did not answer in time") from None
    except OSError as exc:
        _close(fds)
        raise ControlError(f"the control socket: {exc.strerror or exc}") from None
    try:
        return _parsed(bytes(data)), fds
    except ControlError:
        _close(fds)
        raise


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def connect(path: str) -> socket.socket:
    """A blocking connection to the control socket at `path` (with `IO_TIMEOUT_S`).

    Raises:
        ControlError: nothing answers there.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(IO_TIMEOUT_S)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ControlError(
            f"no tproxy answers on the control socket {path} ({exc.strerror or exc}); give "
            "--control PATH if it runs with another (one run with --workers 1 outside systemd "
            "has none: it cannot be taken over)"
        ) from None
    return sock


Handover = Callable[[], tuple[dict[str, Any], list[int]]]
Answer = Callable[[dict[str, Any]], None]
Command = Callable[[dict[str, Any], Answer], None]
"""A request the supervisor answers later (it asks its workers first): called with the request
and where its answer goes (once)."""
Watch = Callable[[socket.socket, Callable[[], None] | None], None]
"""Watch a socket for reading in the supervisor's loop, calling the function (None: stop)."""


class ControlServer:
    """The supervisor's end of the control socket (the module docstring).

    Args:
        sock: the listening socket (`open_control_socket`).
        path: where it is (unlinked at the end, unless a takeover made it the new process's).
        watch: how the supervisor watches a socket (see `Watch`).
        handover: what a `takeover` gets (`takeover.handover`); None: refused.
        on_drain: the new process serves: drain and exit as on SIGTERM.
        on_notice: one line for the log.
    """

    def __init__(
        self, sock: socket.socket, path: str, watch: Watch, *, handover: Handover | None,
        on_drain: Callable[[], None], on_notice: Callable[[str], None],
        commands: dict[str, Command] | None = None,
    ) -> None:  # fmt: skip
        self._sock = sock
        self._path = path
        self._watch = watch
        self._handover = handover
        self._on_drain = on_drain
        self._on_notice = on_notice
        self._commands = commands or {}
        self._successor: socket.socket | None = None  # a takeover's connection, until drain
        self.handed_over = False  # the new process drains us: the path is its now
        watch(sock, self._on_connection)

    def _on_connection(self) -> None:
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        conn.setblocking(True)
        conn.settimeout(IO_TIMEOUT_S)
        keep = False
        try:
            message = read_message(conn)
            if message is not None:
                keep = self._answer(conn, message)
        except (ControlError, OSError) as exc:
            self._on_notice(f"control socket: {exc}")
        finally:
            if not keep:
                conn.close()

    def _answer(self, conn: socket.socket, message: dict[str, Any]) -> bool:
        """Answer one request; True when the connection stays open (a takeover's)."""
        command = message.get("command")
        handler = self._commands.get(command) if isinstance(command, str) else None
        if handler is not None:
            handler(message, lambda answer: _answer_later(conn, answer))
            return True
        if command != "takeover":
            send_message(conn, {"ok": False, "error": f"unknown command {command!r}"})
            return False
        if self._handover is None or self._successor is not None or self.handed_over:
            why = "a takeover is already going on" if self._successor else "not possible now"
            send_message(conn, {"ok": False, "error": why})
            return False
        try:
            reply, fds = self._handover()
        except ControlError as exc:  # (stopping: the listening sockets are closed already)
            send_message(conn, {"ok": False, "error": str(exc)})
            return False
        send_message(conn, reply, [*fds, self._sock.fileno()])  # the control socket last
        self._successor = conn
        conn.settimeout(IO_TIMEOUT_S)
        self._watch(conn, self._on_successor)
        self._on_notice("takeover: a new tproxy has the listening sockets; this one drains as "
                        "soon as it serves")  # fmt: skip
        return True

    def _on_successor(self) -> None:
        conn = self._successor
        assert conn is not None
        try:
            message = read_message(conn)
        except ControlError as exc:
            message = None
            self._on_notice(f"takeover: {exc}")
        if message is None or message.get("command") != "drain":
            self._on_notice("takeover abandoned (the new tproxy went away before serving): "
                            "this one goes on serving")  # fmt: skip
            self._end_successor()
            return
        with contextlib.suppress(OSError):
            send_message(conn, {"ok": True})
        self.handed_over = True
        self._end_successor()
        self._stop_listening()  # the new one answers on it now
        self._on_notice("takeover: the new tproxy serves; draining this one")
        self._on_drain()

    def _end_successor(self) -> None:
        conn, self._successor = self._successor, None
        if conn is not None:
            self._watch(conn, None)
            conn.close()

    def drop(self) -> None:
        """In a forked worker: close this process's copies, touch nothing else."""
        if self._successor is not None:
            self._successor.close()
        self._sock.close()

    def _stop_listening(self) -> None:
        if self._sock.fileno() >= 0:
            self._watch(self._sock, None)
            self._sock.close()

    def close(self) -> None:
        """Stop listening; unlink the path unless it is the new process's now."""
        self._end_successor()
        self._stop_listening()
        if not self.handed_over:
            with contextlib.suppress(OSError):
                os.unlink(self._path)


def _answer_later(conn: socket.socket, answer: dict[str, Any]) -> None:
    """The answer to a deferred command; the client may have gone meanwhile."""
    with contextlib.suppress(OSError):
        send_message(conn, {"ok": True, **answer})
    conn.close()


def request(path: str, message: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Ask the tproxy whose control socket is at `path`; its answer.

    Raises:
        ControlError: nobody answers, or not in time, or the answer is an error.
    """
    conn = connect(path)
    conn.settimeout(timeout_s)
    try:
        send_message(conn, message)
        answer = read_message(conn, MAX_ANSWER_BYTES)
    except OSError as exc:
        raise ControlError(f"the control socket: {exc.strerror or exc}") from None
    finally:
        conn.close()
    if answer is None:
        raise ControlError("the running tproxy closed the control socket without answering")
    if not answer.get("ok"):
        raise ControlError(f"the running tproxy says: {answer.get('error', '?')}")
    return answer


def take_over(path: str) -> tuple[socket.socket, socket.socket, dict[str, Any], list[int]]:
    """The new process's half: ask the running proxy at `path` for its listening sockets; the
    connection (kept for `finish_takeover`), the running proxy's control socket (for
    `finish_takeover` too: not to be served before), its reply and the listening sockets'
    descriptors (for `takeover.adopt`).

    Raises:
        ControlError: nobody answers, it refused, or the answer is not one.
    """
    conn = connect(path)
    try:
        send_message(conn, {"command": "takeover"})
        message, fds = receive_with_fds(conn)
    except (ControlError, OSError) as exc:
        conn.close()
        raise ControlError(f"takeover: {exc}") from None
    try:
        if not message.get("ok"):
            raise ControlError(f"the running tproxy refused: {message.get('error', '?')}")
        if not fds:
            raise ControlError("the running tproxy sent no control socket")
        control = socket.socket(fileno=fds.pop())
        if control.family != socket.AF_UNIX or not control.getsockopt(
            socket.SOL_SOCKET, socket.SO_ACCEPTCONN
        ):
            control.close()
            raise ControlError("what came as the control socket is not a listening one")
    except (ControlError, OSError) as exc:
        _close(fds)
        conn.close()
        raise ControlError(f"takeover: {exc}") from None
    return conn, control, message, fds


def finish_takeover(conn: socket.socket, control: socket.socket) -> socket.socket:
    """The new process serves: tell the old one to drain; then `control`, the control socket
    `take_over` brought, is this one's to serve (the old one stops answering on it). Nothing is
    unlinked or bound: the path keeps answering throughout, also for a process that has dropped
    root and could not replace a file in /run/tproxy.

    Raises:
        ControlError: the old one did not acknowledge (`control` is closed then).
    """
    try:
        send_message(conn, {"command": "drain"})
        reply = read_message(conn)
    except (ControlError, OSError) as exc:
        control.close()
        raise ControlError(f"takeover: {getattr(exc, 'strerror', None) or exc}") from None
    finally:
        conn.close()
    if reply is None or not reply.get("ok"):
        control.close()
        raise ControlError("takeover: the running tproxy did not acknowledge the drain")
    control.setblocking(False)
    return control
