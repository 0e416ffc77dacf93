"""The control socket and a takeover's two halves, in one process on loopback: the socket is
0600, refuses a second proxy while one answers and replaces a stale file; a takeover hands over
the very listening sockets (a connection made to the port is accepted through the adopted
one), in the group's order, and drains the old side only when the new one says so; an abandoned
takeover drains nothing; what does not match the new configuration is refused and its
descriptors closed."""

from __future__ import annotations

import os
import selectors
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from tproxy.core.endpoint import parse_endpoint
from tproxy.engine.control import (
    ControlError,
    ControlServer,
    finish_takeover,
    open_control_socket,
    request,
    take_over,
)
from tproxy.engine.takeover import adopt, handover


def test_the_control_socket_is_0600_and_a_second_proxy_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "tproxy.sock")
    first = open_control_socket(path)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with pytest.raises(ControlError, match="another tproxy is running"):
            open_control_socket(path)
    finally:
        first.close()
    # Its proxy gone (the file left behind): replaced.
    open_control_socket(path).close()


def test_a_path_that_is_not_a_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("mine")
    with pytest.raises(ControlError, match="not a socket"):
        open_control_socket(str(path))
    assert path.read_text() == "mine"


class Loop:
    """A selector loop standing in for the supervisor's, run until `done`."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.notices: list[str] = []
        self.drained = threading.Event()

    def watch(self, sock: socket.socket, callback: Callable[[], None] | None) -> None:
        if callback is None:
            self.selector.unregister(sock)
        else:
            self.selector.register(sock, selectors.EVENT_READ, callback)

    def run_until(self, done: Callable[[], bool]) -> None:
        for _ in range(400):
            if done():
                return
            for key, _ in self.selector.select(0.05):
                key.data()
        raise AssertionError(f"not done; notices: {self.notices}")


def _listeners(count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        socks.append(sock)
    return socks


def test_a_takeover_hands_over_the_same_sockets_and_drains_when_told(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    # Two endpoints, two workers: per_worker[w][e].
    socks = _listeners(4)
    endpoints = [parse_endpoint(f"127.0.0.1:{socks[0].getsockname()[1]}"),
                 parse_endpoint(f"127.0.0.1:{socks[1].getsockname()[1]}")]  # fmt: skip
    per_worker = [[socks[0], socks[1]], [socks[2], socks[3]]]
    loop = Loop()
    server = ControlServer(open_control_socket(path), path, loop.watch,
                           handover=lambda: handover(endpoints, per_worker),
                           on_drain=loop.drained.set, on_notice=loop.notices.append)  # fmt: skip
    got: dict[str, object] = {}
    inode = os.stat(path).st_ino

    def new_process() -> None:
        conn, control, reply, fds = take_over(path)
        got["adopted"] = adopt(reply, fds, endpoints, 2)
        got["control"] = control
        got["conn"] = conn

    thread = threading.Thread(target=new_process)
    thread.start()
    loop.run_until(lambda: "conn" in got)
    thread.join()
    adopted = got["adopted"]
    assert isinstance(adopted, list)
    assert [[s.getsockname() for s in own] for own in adopted] == [
        [s.getsockname() for s in own] for own in per_worker
    ]
    # The very sockets: a connection to the old one's port is accepted through the adopted one.
    client = socket.create_connection(per_worker[1][0].getsockname())
    adopted[1][0].setblocking(True)
    accepted, _ = adopted[1][0].accept()
    accepted.close()
    client.close()
    assert not loop.drained.is_set()  # not before the new one serves
    conn, control = got["conn"], got["control"]
    assert isinstance(conn, socket.socket) and isinstance(control, socket.socket)
    result: dict[str, object] = {}
    thread = threading.Thread(target=lambda: result.update(sock=finish_takeover(conn, control)))
    thread.start()
    loop.run_until(loop.drained.is_set)
    thread.join()
    new_control = result["sock"]
    assert isinstance(new_control, socket.socket)
    # The path answers through the new one's socket from now on, without being unlinked and
    # bound again (a process that has dropped root could not in /run/tproxy): the old one no
    # longer accepts there.
    asking = socket.socket(socket.AF_UNIX)
    asking.connect(path)
    loop.run_until(lambda: True)
    new_control.setblocking(True)
    new_control.settimeout(2)
    accepted, _ = new_control.accept()
    accepted.close()
    asking.close()
    server.close()  # the old one's end: the path is the new one's now
    assert os.stat(path).st_ino == inode
    new_control.close()
    for own in adopted:
        for sock in own:
            sock.close()
    for sock in socks:
        sock.close()


def test_an_abandoned_takeover_drains_nothing(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    socks = _listeners(1)
    endpoints = [parse_endpoint(f"127.0.0.1:{socks[0].getsockname()[1]}")]
    loop = Loop()
    server = ControlServer(open_control_socket(path), path, loop.watch,
                           handover=lambda: handover(endpoints, [socks]),
                           on_drain=loop.drained.set, on_notice=loop.notices.append)  # fmt: skip
    got: list[socket.socket] = []

    def new_process_that_dies() -> None:
        conn, control, _, fds = take_over(path)
        for fd in fds:
            os.close(fd)
        control.close()
        conn.close()
        got.append(conn)

    thread = threading.Thread(target=new_process_that_dies)
    thread.start()
    loop.run_until(lambda: any("abandoned" in n for n in loop.notices))
    thread.join()
    assert not loop.drained.is_set()
    server.close()
    assert not os.path.exists(path)  # still the old one's: unlinked at its end
    socks[0].close()


@pytest.mark.parametrize(
    ("reply", "why"),
    [
        ({"ok": False, "error": "no"}, "refused: no"),
        ({"ok": True, "workers": 2, "listen": ["127.0.0.1:1"]}, "--listen cannot change"),
        ({"ok": True, "workers": 3, "listen": None}, "give --workers 3"),
    ],
)
def test_what_does_not_match_is_refused_and_its_descriptors_closed(
    reply: dict[str, object], why: str
) -> None:
    socks = _listeners(2)
    endpoint = parse_endpoint(f"127.0.0.1:{socks[0].getsockname()[1]}")
    if reply.get("listen") is None:
        reply["listen"] = [str(endpoint)]
    fds = [os.dup(s.fileno()) for s in socks]
    with pytest.raises(ControlError, match=why):
        adopt(reply, fds, [endpoint], 2)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)  # closed
    for sock in socks:
        sock.close()


def test_something_that_is_not_a_listening_socket_is_refused() -> None:
    listener = _listeners(1)[0]
    endpoint = parse_endpoint(f"127.0.0.1:{listener.getsockname()[1]}")
    plain = socket.socket()  # not listening
    with pytest.raises(ControlError, match="not a listening socket"):
        adopt({"ok": True, "workers": 1, "listen": [str(endpoint)]}, [os.dup(plain.fileno())],
              [endpoint], 1)  # fmt: skip
    plain.close()
    listener.close()


def test_a_deferred_command_is_answered_when_its_answer_comes(tmp_path: Path) -> None:
    """`sessions`: the supervisor asks its workers first; the client waits for that answer."""
    path = str(tmp_path / "c.sock")
    loop = Loop()
    pending: list[Callable[[dict[str, object]], None]] = []

    def sessions(_: dict[str, object], answer: Callable[[dict[str, object]], None]) -> None:
        pending.append(answer)

    server = ControlServer(open_control_socket(path), path, loop.watch, handover=None,
                           on_drain=loop.drained.set, on_notice=loop.notices.append,
                           commands={"sessions": sessions})  # fmt: skip
    got: dict[str, object] = {}
    thread = threading.Thread(target=lambda: got.update(request(path, {"command": "sessions"}, 5)))
    thread.start()
    loop.run_until(lambda: bool(pending))
    # A full listing is far longer than a request may be (1,000 sessions of ~250 bytes).
    listing = [{"id": f"{i:013d}", "sni": "x" * 200} for i in range(1000)]
    pending[0]({"workers": [{"worker": 1, "sessions": listing}], "missing": [2]})
    thread.join()
    assert got == {"ok": True, "workers": [{"worker": 1, "sessions": listing}], "missing": [2]}
    with pytest.raises(ControlError, match="unknown command 'nonsense'"):
        _ask_in_thread(loop, path, {"command": "nonsense"})
    server.close()


def _ask_in_thread(loop: Loop, path: str, message: dict[str, object]) -> dict[str, object]:
    result: dict[str, object] = {}
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            result.update(request(path, message, 5))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=ask)
    thread.start()
    loop.run_until(lambda: not thread.is_alive())
    thread.join()
    if errors:
        raise errors[0]
    return result
