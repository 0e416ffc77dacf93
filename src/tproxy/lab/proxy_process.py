"""A `tproxy run` process inside a lab namespace, its JSON session log collected as it comes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tproxy.lab.topology import Host, Lab, LabError, wait_until

Event = dict[str, Any]


class ProxyProcess:
    """Runs `python -m tproxy run --log-format json ARGS` in `host` and collects its events.

    With `log_format=None` the flag is left out (the config file decides); a line that is not
    JSON becomes an event `{"event": "unparsed", "line": ...}`.
    """

    def __init__(
        self,
        lab: Lab,
        host: Host,
        args: Sequence[str],
        wrapper: Sequence[str] = (),
        log_format: str | None = "json",
    ) -> None:
        self._lab = lab
        fmt = [] if log_format is None else ["--log-format", log_format]
        self.argv = [*wrapper, sys.executable, "-m", "tproxy", "run", *fmt, *args]
        self.proc = lab.start(host, self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.events: list[Event] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._stderr = ""
        lab.on_destroy(self.stop)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "unparsed", "line": line.decode(errors="replace")}
            with self._lock:
                self.events.append(event)

    def snapshot(self) -> list[Event]:
        with self._lock:
            return list(self.events)

    def find(self, predicate: Callable[[Event], bool]) -> list[Event]:
        return [e for e in self.snapshot() if predicate(e)]

    def named(self, name: str) -> list[Event]:
        return self.find(lambda e: e.get("event") == name)

    def wait_for(
        self, predicate: Callable[[Event], bool], what: str, timeout_s: float = 10, count: int = 1
    ) -> list[Event]:
        def ready() -> bool:
            if self.proc.poll() is not None and len(self.find(predicate)) < count:
                raise LabError(f"tproxy exited ({self.proc.returncode}) {self.stderr_text()}")
            return len(self.find(predicate)) >= count

        wait_until(ready, timeout_s, what)
        return self.find(predicate)

    def wait_listening(self, timeout_s: float = 10) -> Event:
        return self.wait_for(lambda e: e.get("event") == "listening", "tproxy to listen",
                             timeout_s)[0]  # fmt: skip

    def open_fds(self) -> int:
        """How many descriptors the proxy process holds now."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def rss_bytes(self) -> int:
        """The proxy process's resident memory now (VmRSS)."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(kib) * 1024

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """Signal the proxy's whole process group, as a terminal's Ctrl-C does."""
        os.killpg(self.proc.pid, signum)

    def stderr_text(self) -> str:
        """What the process wrote to stderr, once it has exited."""
        if self.proc.poll() is None:
            return ""
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            self._stderr = self.proc.stderr.read().decode(errors="replace").strip()
            self.proc.stderr.close()
        return self._stderr

    def stop(self) -> int | None:
        """SIGTERM the proxy, collect the rest of its log; idempotent."""
        self._lab.forget(self.proc)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        self.stderr_text()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode
