"""Fixtures for the unit tests."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator

import pytest

from tproxy.core.config import LogFormat
from tproxy.core.worker_protocol import decode
from tproxy.engine import supervisor as supervisor_module
from tproxy.engine.supervisor import Supervisor
from tproxy.observability.eventlog import EventLog


class SupervisorLab:
    """A supervisor in this process, with workers that are only their channels' other ends
    (the fixture `channels`)."""

    def __init__(self) -> None:
        self.log = io.StringIO()
        self.supervisor = Supervisor(2, lambda _id, _channel: 0,
                                     EventLog(LogFormat.JSON, self.log))  # fmt: skip
        self.ends: dict[int, socket.socket] = {}

    def start(self, worker_id: int) -> socket.socket:
        """A worker started: its end of a new channel (the supervisor has the other)."""
        parent_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        worker_end.setblocking(False)
        self.supervisor._adopt(worker_id, 1000 + worker_id, parent_end)
        self.ends[worker_id] = worker_end
        return worker_end

    def received(self, worker_id: int) -> list[object]:
        messages: list[object] = []
        while True:
            try:
                messages.append(decode(self.ends[worker_id].recv(1 << 20)))
            except BlockingIOError:
                return messages

    def close(self) -> None:
        for worker in list(self.supervisor._workers.values()):
            self.supervisor._close_channel(worker)
        self.supervisor._selector.close()
        for end in self.ends.values():
            end.close()


@pytest.fixture
def channels(monkeypatch: pytest.MonkeyPatch) -> Iterator[SupervisorLab]:
    monkeypatch.setattr(supervisor_module, "_reap", list)  # no children to reap here
    monkeypatch.setattr(supervisor_module, "TICK_S", 0.0)
    built = SupervisorLab()
    try:
        yield built
    finally:
        built.close()
