"""`tproxy top`'s loop against a fake control socket (a thread answering `stats` and `sessions`
on a Unix socket): one frame with --once, one line and status 1 when nothing answers, half a
screen from a proxy without `stats`, and the live screen on a pseudo-terminal: it polls, goes on
when the proxy stops answering, quits on `q` or Ctrl-C and gives the terminal back as it was."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import termios
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tproxy.cli.main import main
from tproxy.cli.top import parse_interval, run_top
from tproxy.engine.control import ControlError, request
from tproxy.lab.topology import wait_until

STATS = {
    "version": "0.1.0",
    "uptime_s": 5.0,
    "workers": {"running": 2, "restarts": 0},
    "active": 1,
    "opened": 7,
    "bytes_up": 100,
    "bytes_down": 2000,
    "closed": [],
    "rule_bytes": [{"rule": "web", "bytes_up": 100, "bytes_down": 2000}],
}
SESSIONS = {
    "workers": [
        {
            "worker": 1,
            "pid": 1,
            "active": 1,
            "truncated": False,
            "sessions": [
                {
                    "id": "01kbj9dq70101",
                    "client": "198.18.0.2:40000",
                    "dst": "198.19.0.2:443",
                    "sni": "held.example",
                    "rule": "web",
                    "relay": "splice",
                    "bytes_up": 100,
                    "bytes_down": 2000,
                    "age_s": 3.0,
                    "idle_s": 1.0,
                }
            ],
        }
    ],
    "missing": [],
}

Respond = Callable[[str, int], dict[str, Any]]


class FakeProxy:
    """Answers each control request with `respond(command, how many of that command so far)`."""

    def __init__(self, path: Path, respond: Respond) -> None:
        self.path = str(path)
        self.asked: dict[str, int] = {}
        self._respond = respond
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(8)
        self._listener.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                line = conn.makefile("rb").readline()
                command = str(json.loads(line).get("command"))
                self.asked[command] = self.asked.get(command, 0) + 1
                answer = self._respond(command, self.asked[command])
                conn.sendall(json.dumps(answer).encode() + b"\n")

    def stop(self) -> None:
        """Stop answering (the socket file goes: a client gets 'no tproxy answers')."""
        self._stop.set()
        self._thread.join(timeout=5)
        self._listener.close()
        os.unlink(self.path)

    def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        return request(self.path, message, timeout_s=2)


def healthy(command: str, count: int) -> dict[str, Any]:
    if command == "stats":
        return {"ok": True, **STATS, "opened": 7 + count}
    return {"ok": True, **SESSIONS}


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[FakeProxy]:
    fake = FakeProxy(tmp_path / "control.sock", healthy)
    yield fake
    if not fake._stop.is_set():
        fake.stop()


def recording_console(terminal: bool = False) -> Console:
    return Console(record=True, width=120, height=30, file=io.StringIO(), force_terminal=terminal)


def test_once_prints_one_frame(proxy: FakeProxy) -> None:
    console = recording_console()
    assert run_top(proxy.ask, once=True, console=console) == 0
    text = console.export_text()
    assert "tproxy 0.1.0" in text and "1 live" in text and "8 opened" in text, text
    assert "01kbj9dq70101" in text and "held.example" in text, text
    assert "q quits" not in text, text
    assert proxy.asked == {"stats": 1, "sessions": 1}


def test_nothing_answering_is_one_line_and_status_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(ControlError, match="no tproxy answers"):
        run_top(partial(request, path, timeout_s=1), once=True, console=recording_console())
    assert main(["top", "--once", "--control", path]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "no tproxy answers on the control socket" in lines[0], lines


def test_a_proxy_without_stats_still_shows_its_sessions(tmp_path: Path) -> None:
    def older(command: str, count: int) -> dict[str, Any]:
        if command == "stats":
            return {"ok": False, "error": "unknown command 'stats'"}
        return {"ok": True, **SESSIONS}

    fake = FakeProxy(tmp_path / "control.sock", older)
    try:
        console = recording_console()
        assert run_top(fake.ask, once=True, console=console) == 0
    finally:
        fake.stop()
    text = console.export_text()
    assert "stats: the running tproxy says: unknown command 'stats'" in text, text
    assert "01kbj9dq70101" in text, text


def test_the_interval_is_checked() -> None:
    assert parse_interval("0.5") == 0.5
    for bad in ("0", "-1", "nan", "inf", "x", "3601"):
        with pytest.raises(ValueError, match=r"seconds from 0\.1 to 3600"):
            parse_interval(bad)
    with pytest.raises(SystemExit) as exited:
        main(["top", "--interval", "0"])
    assert exited.value.code == 2


def test_q_quits_the_live_screen_and_the_terminal_is_given_back(proxy: FakeProxy) -> None:
    leader, follower = os.openpty()
    try:
        before = termios.tcgetattr(follower)
        with os.fdopen(os.dup(follower), "r") as stdin:
            typing = threading.Thread(target=_type_q_after_polls, args=(proxy, leader, 3))
            typing.start()
            console = recording_console(terminal=True)
            assert run_top(proxy.ask, interval_s=0.1, console=console, stdin=stdin) == 0
            typing.join(timeout=10)
        assert termios.tcgetattr(follower) == before
    finally:
        os.close(leader)
        os.close(follower)
    assert proxy.asked["stats"] >= 3, proxy.asked
    text = console.export_text()
    assert "01kbj9dq70101" in text and "q quits" in text, text
    assert "/s new" in text and "-/s new" not in text.split("q quits")[-2], "no rate after 3 polls"


def _type_q_after_polls(proxy: FakeProxy, leader: int, polls: int) -> None:
    wait_until(lambda: proxy.asked.get("sessions", 0) >= polls, 10, f"{polls} polls")
    os.write(leader, b"q")


def test_a_proxy_that_stops_answering_is_shown_and_top_goes_on(proxy: FakeProxy) -> None:
    leader, follower = os.openpty()
    try:
        with os.fdopen(os.dup(follower), "r") as stdin:
            console = recording_console(terminal=True)

            def stop_then_quit() -> None:
                wait_until(lambda: proxy.asked.get("sessions", 0) >= 2, 10, "two polls")
                proxy.stop()
                wait_until(
                    lambda: "no tproxy answers" in console.export_text(clear=False),
                    10,
                    "the error on the screen",
                )
                os.write(leader, b"Q")

            quitter = threading.Thread(target=stop_then_quit)
            quitter.start()
            assert run_top(proxy.ask, interval_s=0.1, console=console, stdin=stdin) == 0
            quitter.join(timeout=10)
    finally:
        os.close(leader)
        os.close(follower)
    text = console.export_text()
    assert "no tproxy answers on the control socket" in text and "01kbj9dq70101" in text, text


def test_ctrl_c_quits_cleanly_without_a_terminal(proxy: FakeProxy) -> None:
    main_thread = threading.get_ident()

    def interrupt() -> None:
        wait_until(lambda: proxy.asked.get("sessions", 0) >= 2, 10, "two polls")
        signal.pthread_kill(main_thread, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    stdin = io.StringIO("q")  # not a terminal: never read
    assert run_top(proxy.ask, interval_s=0.1, console=recording_console(), stdin=stdin) == 0
    interrupter.join(timeout=10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_quit_through_the_terminals_restore(
    proxy: FakeProxy, signum: int
) -> None:
    main_thread = threading.get_ident()
    before = signal.getsignal(signum)

    def stop() -> None:
        wait_until(lambda: proxy.asked.get("sessions", 0) >= 2, 10, "two polls")
        signal.pthread_kill(main_thread, signum)

    stopper = threading.Thread(target=stop)
    stopper.start()
    assert run_top(proxy.ask, interval_s=0.1, console=recording_console(),
                   stdin=io.StringIO("")) == 0  # fmt: skip
    stopper.join(timeout=10)
    assert signal.getsignal(signum) == before  # given back
