"""The supervisor's part of the shared TLS passthrough memory: what one worker learned is passed
on to every other worker (not back to it), kept for a worker started later, and never queued
without bound for a worker that does not read."""

from __future__ import annotations

import socket
import time

from tests.unit.conftest import SupervisorLab
from tproxy.core.worker_protocol import Learned, encode
from tproxy.engine import supervisor as supervisor_module
from tproxy.engine.supervisor import Outbox

PINNED = ("pinned.test", "upstream_wants_client_cert", 3600.0)


def test_what_one_worker_learned_reaches_every_other_and_not_itself(
    channels: SupervisorLab,
) -> None:
    for worker_id in (1, 2, 3):
        channels.start(worker_id)
    channels.ends[1].send(encode(Learned((PINNED,))))
    channels.supervisor._step()
    assert channels.received(1) == []  # no echo
    assert channels.received(2) == channels.received(3) == [Learned((PINNED,))]


def test_a_worker_started_later_gets_everything_learned_with_the_time_left(
    channels: SupervisorLab,
) -> None:
    channels.start(1)
    channels.ends[1].send(encode(Learned((PINNED, ("198.18.1.2 a.test", "client_rejected", 10.0)))))
    channels.supervisor._step()
    started = time.monotonic()
    channels.start(2)  # (a worker restarted after a crash is started the same way)
    [snapshot] = channels.received(2)
    assert isinstance(snapshot, Learned)
    assert [(key, reason) for key, reason, _ in snapshot.entries] == [
        ("pinned.test", "upstream_wants_client_cert"), ("198.18.1.2 a.test", "client_rejected"),
    ]  # fmt: skip
    left = [left_s for _, _, left_s in snapshot.entries]
    elapsed = time.monotonic() - started + 1  # (generous: this machine may be slow)
    assert 3600 - elapsed < left[0] <= 3600 and 10 - elapsed < left[1] <= 10


def test_a_snapshot_larger_than_the_channel_waits_in_the_outbox_and_arrives_whole(
    channels: SupervisorLab,
) -> None:
    channels.start(1)
    learned = [(f"{i:0>200}.test", "client_rejected", 3600.0) for i in range(10_000)]
    for i in range(0, len(learned), 200):
        channels.ends[1].send(encode(Learned(tuple(learned[i : i + 200]))))
        channels.supervisor._step()
    channels.start(2)
    assert channels.supervisor._workers[1002].outbox  # more than its channel takes at once
    got: list[str] = []
    for _ in range(100):
        got += [key for message in channels.received(2) if isinstance(message, Learned)
                for key, _, _ in message.entries]  # fmt: skip
        channels.supervisor._step()  # each round sends what waits
        if len(got) == len(learned):
            break
    assert got == [key for key, _, _ in learned]


def test_a_worker_that_does_not_read_costs_a_bounded_outbox_and_one_notice(
    channels: SupervisorLab,
) -> None:
    channels.start(1)
    channels.start(2)  # never reads
    for i in range(20_000):
        channels.ends[1].send(encode(Learned(((f"n{i:0>300}.test", "client_rejected", 60.0),))))
        if i % 100 == 0:
            channels.supervisor._step()
    channels.supervisor._step()
    assert channels.supervisor._learned_drops.total > 0
    notices = [line for line in channels.log.getvalue().splitlines() if "not passed on" in line]
    assert len(notices) == 1, notices  # one a while, not one a drop
    assert channels.supervisor._workers[1002].outbox._bytes <= supervisor_module.OUTBOX_BYTES


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
