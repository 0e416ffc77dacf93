"""`tproxy top` on the real path, default workers, in a terminal (a detached tmux session in
the router's namespace): with a TLS session held open through the router, the screen shows
the totals and that session (its id and SNI); `q` quits at once with status 0 and the
terminal's mode as it was; so does Ctrl-C."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import held_tls_session
from tproxy.lab.services import TLS_NAME
from tproxy.lab.topology import Lab, wait_until


class Tmux:
    """A tmux server of our own (its own socket name, no user configuration) for one test."""

    def __init__(self) -> None:
        self.name = f"tproxy-top-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.socket_paths: set[Path] = set()

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", self.name, "-f", "/dev/null", *args],
                              capture_output=True, text=True, timeout=10, check=check)  # fmt: skip

    def start(self, session: str, command: str) -> None:
        """`command` (sh) in a new 160x40 detached session."""
        self.run("new-session", "-d", "-s", session, "-x", "160", "-y", "40", command)
        socket_path = self.run("display", "-p", "#{socket_path}", check=False).stdout.strip()
        if socket_path:  # (the server may be gone already, if the command was that quick)
            self.socket_paths.add(Path(socket_path))

    def screen(self, session: str) -> str:
        done = self.run("capture-pane", "-p", "-t", session, check=False)
        return done.stdout if done.returncode == 0 else ""

    def alive(self, session: str) -> bool:
        return self.run("has-session", "-t", session, check=False).returncode == 0

    def kill_server(self) -> None:
        """Stop the server (if its sessions have not all ended) and remove its socket file,
        which tmux leaves behind."""
        self.run("kill-server", check=False)
        for path in self.socket_paths:
            path.unlink(missing_ok=True)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    server = Tmux()
    try:
        yield server
    finally:
        server.kill_server()


def test_top_shows_the_held_session_under_tmux_and_quits_on_q(
    lab: Lab, tmux: Tmux, tmp_path: Path
) -> None:
    with held_tls_session(lab) as proxy:
        session_id = proxy.named("session_open")[0]["session"]
        for key in ("q", "C-c"):
            status, stty = tmp_path / f"status-{key}", tmp_path / f"stty-{key}"
            top = shlex.join(["ip", "netns", "exec", lab.router.netns, sys.executable, "-m",
                              "tproxy", "top", "--interval", "0.2"])  # fmt: skip
            # What the shell sees once top has quit: its status and the terminal's mode.
            tmux.start(key, f"{top}; echo $? > {status}; stty -a > {stty}")

            def shown(key: str = key) -> bool:
                screen = tmux.screen(key)
                return all(part in screen for part in (session_id, TLS_NAME, "1 live", "q quits"))

            try:
                wait_until(shown, 20, "the table")
            except Exception:
                pytest.fail(f"top's screen never showed the held session:\n{tmux.screen(key)}")
            screen = tmux.screen(key)
            assert "tproxy 0.1.0" in screen and "opened" in screen, screen  # the totals (stats)
            assert "(default)" in screen, screen  # the session's rule: none, no policy
            tmux.run("send-keys", "-t", key, key)
            wait_until(lambda s=status: s.exists() and s.read_text().endswith("\n"), 5,
                       f"top to quit on {key}")  # fmt: skip
            assert status.read_text().strip() == "0", status.read_text()
            wait_until(lambda k=key: not tmux.alive(k), 5, "the tmux session to end")
            mode = stty.read_text().split()
            assert "icanon" in mode and "echo" in mode, mode  # cbreak mode undone
