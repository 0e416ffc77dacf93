"""The supervisor's part of the shared TLS passthrough memory: what one worker learned is passed
on to every other worker (not back to it), kept for a worker started later, and never queued
without bound for a worker that does not read."""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator

import pytest

from tproxy.core.config import LogFormat
from tproxy.core.worker_protocol import Learned, decode, encode
from tproxy.engine import supervisor as supervisor_module
from tproxy.engine.supervisor import Outbox, Supervisor
from tproxy.observability.eventlog import EventLog

PINNED = ("pinned.test", "upstream_wants_client_cert", 3600.0)


class _Lab:
    """A supervisor in this process, with workers that are only their channels' other ends."""

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
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Lab]:
    monkeypatch.setattr(supervisor_module, "_reap", list)  # no children to reap here
    monkeypatch.setattr(supervisor_module, "TICK_S", 0.0)
    built = _Lab()
    try:
        yield built
    finally:
        built.close()


def test_what_one_worker_learned_reaches_every_other_and_not_itself(lab: _Lab) -> None:
    for worker_id in (1, 2, 3):
        lab.start(worker_id)
    lab.ends[1].send(encode(Learned((PINNED,))))
    lab.supervisor._step()
    assert lab.received(1) == []  # no echo
    assert lab.received(2) == lab.received(3) == [Learned((PINNED,))]


def test_a_worker_started_later_gets_everything_learned_with_the_time_left(lab: _Lab) -> None:
    lab.start(1)
    lab.ends[1].send(encode(Learned((PINNED, ("198.18.1.2 a.test", "client_rejected", 10.0)))))
    lab.supervisor._step()
    started = time.monotonic()
    lab.start(2)  # (a worker restarted after a crash is started the same way)
    [snapshot] = lab.received(2)
    assert isinstance(snapshot, Learned)
    assert [(key, reason) for key, reason, _ in snapshot.entries] == [
        ("pinned.test", "upstream_wants_client_cert"), ("198.18.1.2 a.test", "client_rejected"),
    ]  # fmt: skip
    left = [left_s for _, _, left_s in snapshot.entries]
    elapsed = time.monotonic() - started + 1  # (generous: this machine may be slow)
    assert 3600 - elapsed < left[0] <= 3600 and 10 - elapsed < left[1] <= 10


def test_a_snapshot_larger_than_the_channel_waits_in_the_outbox_and_arrives_whole(
    lab: _Lab,
) -> None:
    lab.start(1)
    learned = [(f"{i:0>200}.test", "client_rejected", 3600.0) for i in range(10_000)]
    for i in range(0, len(learned), 200):
        lab.ends[1].send(encode(Learned(tuple(learned[i : i + 200]))))
        lab.supervisor._step()
    lab.start(2)
    assert lab.supervisor._workers[1002].outbox  # more than its channel takes at once
    got: list[str] = []
    for _ in range(100):
        got += [key for message in lab.received(2) if isinstance(message, Learned)
                for key, _, _ in message.entries]  # fmt: skip
        lab.supervisor._step()  # each round sends what waits
        if len(got) == len(learned):
            break
    assert got == [key for key, _, _ in learned]


def test_a_worker_that_does_not_read_costs_a_bounded_outbox_and_one_notice(lab: _Lab) -> None:
    lab.start(1)
    lab.start(2)  # never reads
    for i in range(20_000):
        lab.ends[1].send(encode(Learned(((f"n{i:0>300}.test", "client_rejected", 60.0),))))
        if i % 100 == 0:
            lab.supervisor._step()
    lab.supervisor._step()
    assert lab.supervisor._learned_drops.total > 0
    notices = [line for line in lab.log.getvalue().splitlines() if "not passed on" in line]
    assert len(notices) == 1, notices  # one a while, not one a drop
    assert lab.supervisor._workers[1002].outbox._bytes <= supervisor_module.OUTBOX_BYTES


def test_an_outbox_keeps_order_and_refuses_past_its_limit() -> None:
    sender, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with sender, reader:
        sender.setblocking(False)
        reader.setblocking(False)
        outbox = Outbox(limit_bytes=10_000)
        sent = 0
        while not outbox:  # until the channel's buffer is full: the last one waits
            assert outbox.send(sender, b"%08d" % sent + b"x" * 992)
            sent += 1
        while outbox.send(sender, b"%08d" % sent + b"x" * 992):
            sent += 1
        assert outbox._bytes == 10_000  # ten 1,000-byte messages wait; the next is refused
        seen: list[int] = []
        for _ in range(100):
            while True:
                try:
                    seen.append(int(reader.recv(2000)[:8]))
                except BlockingIOError:
                    break
            outbox.flush(sender)
            if not outbox and len(seen) == sent:
                break
        assert seen == list(range(sent))
