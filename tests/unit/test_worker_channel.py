"""The worker's end of the channel: a heartbeat at once, requests answered by their handler,
junk and unknown commands answered or logged, never raised; passthrough entries remembered go
out, those learned elsewhere come in without going out again, and a full channel drops them
with a notice."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from tproxy.core.config import LogFormat
from tproxy.core.session import SessionRecord
from tproxy.core.worker_protocol import Heartbeat, Learned, Reply, Request, decode, encode
from tproxy.engine import worker_channel
from tproxy.engine.session import SessionContext
from tproxy.engine.worker_channel import WorkerChannel
from tproxy.observability.counters import Counters
from tproxy.observability.eventlog import EventLog
from tproxy.sniffers.classify import Sniffed
from tproxy.sniffers.facts import TlsHello
from tproxy.tls.passthrough import PassthroughMemory, PassthroughReason


def _context(stream: io.StringIO) -> SessionContext:
    records = [
        SessionRecord(
            "01kbj9dq70304", "198.18.1.2:40000", "198.18.2.2:9000", 0.0, bytes_up=10, bytes_down=20
        ),
        SessionRecord(
            "01kbj9dq70302", "[2001:db8:1::2]:40001", "[2001:db8:2::2]:80", 0.0, bytes_up=1
        ),
    ]
    records[0].rule, records[0].relay = "web", "splice"
    hello = Sniffed("tls", TlsHello("www.example.test", ("h2",), "1.3", ech=False))
    sessions = [SimpleNamespace(record=records[0], sniffed_so_far=hello),
                SimpleNamespace(record=records[1], sniffed_so_far=None)]  # fmt: skip
    metrics = Counters()
    metrics.session_closed("closed", "allow", "web", "http", up=100, down=200)
    ctx = SimpleNamespace(sessions=sessions, active=2, opened=9, closed_bytes_up=100,
                          closed_bytes_down=200, passthrough=PassthroughMemory(ttl_s=60),
                          log=EventLog(LogFormat.JSON, stream), metrics=metrics)  # fmt: skip
    return cast(SessionContext, ctx)


async def _receive(sock: socket.socket) -> Any:
    loop = asyncio.get_running_loop()
    return decode(await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5))


def test_heartbeat_listing_and_errors() -> None:
    async def scenario() -> None:
        supervisor_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor_end.setblocking(False)
        stream = io.StringIO()
        channel = WorkerChannel(worker_end, worker=3)
        channel.start(asyncio.get_running_loop(), _context(stream))
        try:
            beat = await _receive(supervisor_end)
            assert beat == Heartbeat(3, os.getpid(), 2, 9, 111, 220, beat.metrics)
            # The metrics: the closed session's counts, and each rule's bytes with the live
            # sessions' so far (the second session is not decided yet: no rule).
            assert beat.metrics["closed"] == [["closed", "allow", "web", "http", 1]]
            moved = {tuple(row) for row in beat.metrics["rule_bytes"]}
            assert moved == {(None, 1, 0), ("web", 110, 220)}
            supervisor_end.send(b"\xff not a message")
            supervisor_end.send(encode(Request(1, "sessions")))
            reply = await _receive(supervisor_end)
            listed = reply.result["sessions"]
            for entry in listed:  # (how long ago, by the monotonic clock: not fixed)
                assert entry.pop("age_s") >= 0 and entry.pop("idle_s") >= 0
            assert reply == Reply(1, 3, {
                "active": 2,
                "sessions": [
                    {"id": "01kbj9dq70302", "client": "[2001:db8:1::2]:40001",
                     "dst": "[2001:db8:2::2]:80", "sni": None, "rule": None, "relay": None,
                     "bytes_up": 1, "bytes_down": 0},
                    {"id": "01kbj9dq70304", "client": "198.18.1.2:40000", "dst": "198.18.2.2:9000",
                     "sni": "www.example.test", "rule": "web", "relay": "splice", "bytes_up": 10,
                     "bytes_down": 20},
                ],
                "truncated": False,
            })  # fmt: skip
            supervisor_end.send(encode(Request(2, "launch")))
            assert await _receive(supervisor_end) == Reply(2, 3, error="unknown command 'launch'")
            assert "ignored a malformed message" in stream.getvalue()
        finally:
            channel.close()
            supervisor_end.close()

    asyncio.run(scenario())


def test_a_reload_request_is_answered_once_the_reload_is_done() -> None:
    async def scenario() -> None:
        supervisor_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor_end.setblocking(False)
        release = asyncio.Event()
        outcomes: list[tuple[bool, list[str]] | Exception] = [
            (True, ["reloaded the configuration (max connections 10000)"]),
            ValueError("a bug of ours"),
        ]

        async def reload() -> tuple[bool, list[str]]:
            await release.wait()  # (reading the files, resolving the policy's names)
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        channel = WorkerChannel(worker_end, worker=2)
        channel.start(asyncio.get_running_loop(), _context(io.StringIO()), reload=reload)
        try:
            await _receive(supervisor_end)  # the first heartbeat
            supervisor_end.send(encode(Request(7, "reload")))
            await asyncio.sleep(0.05)
            with pytest.raises(BlockingIOError):  # no answer while the reload runs
                supervisor_end.recv(1 << 20)
            release.set()
            assert await _receive(supervisor_end) == Reply(7, 2, {
                "reloaded": True, "notices": ["reloaded the configuration (max connections 10000)"],
            })  # fmt: skip
            supervisor_end.send(encode(Request(8, "reload")))
            assert await _receive(supervisor_end) == Reply(8, 2, error="ValueError: a bug of ours")
        finally:
            channel.close()
            supervisor_end.close()

    asyncio.run(scenario())


def test_passthrough_entries_go_out_when_remembered_and_come_in_without_an_echo() -> None:
    async def scenario() -> None:
        supervisor_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor_end.setblocking(False)
        ctx = _context(io.StringIO())
        memory = ctx.passthrough
        channel = WorkerChannel(worker_end, worker=2)
        channel.start(asyncio.get_running_loop(), ctx)
        try:
            assert isinstance(await _receive(supervisor_end), Heartbeat)
            memory.remember("pinned.test", PassthroughReason.UPSTREAM_WANTS_CLIENT_CERT, 0.0)
            assert await _receive(supervisor_end) == Learned(
                (("pinned.test", "upstream_wants_client_cert", 60.0),)
            )
            # Another worker's entries: merged for the time they have left, not sent back.
            learned = (("198.18.1.9 a.test", "client_rejected", 30.0),
                       ("b.test", "a newer worker's reason", 9.0))  # fmt: skip
            supervisor_end.send(encode(Learned(learned)))
            supervisor_end.send(encode(Request(1, "sessions")))  # answered after the merge
            while isinstance(answer := await _receive(supervisor_end), Heartbeat):
                pass
            assert isinstance(answer, Reply)  # and no Learned before it: no echo
            now = time.monotonic()
            assert len(memory) == 2  # pinned.test and a.test
            assert memory.lookup("198.18.1.9 a.test", now) is PassthroughReason.CLIENT_REJECTED
            assert memory.lookup("198.18.1.9 a.test", now + 31) is None
            assert memory.lookup("b.test", now) is None
        finally:
            channel.close()
            supervisor_end.close()
        assert memory.on_remember is None  # the channel is gone: nobody to tell

    asyncio.run(scenario())


def test_a_full_channel_drops_learned_entries_and_says_so_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(worker_channel, "HEARTBEAT_INTERVAL_S", 0.01)

    async def scenario() -> None:
        supervisor_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        worker_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream = io.StringIO()
        ctx = _context(stream)
        channel = WorkerChannel(worker_end, worker=1)
        channel.start(asyncio.get_running_loop(), ctx)
        try:
            for i in range(2000):  # the supervisor reads nothing: remembering never blocks
                ctx.passthrough.remember(f"n{i}.test", PassthroughReason.CLIENT_REJECTED, 0.0)
            dropped = channel.learned_drops.total
            assert 0 < dropped < 2000
            for _ in range(100):
                if "not shared" in stream.getvalue():
                    break
                await asyncio.sleep(0.01)
            notices = [line for line in stream.getvalue().splitlines() if "not shared" in line]
            assert len(notices) == 1, notices  # one notice, not one a drop
            assert f"{dropped} passthrough entries learned here" in notices[0]
        finally:
            channel.close()
            supervisor_end.close()

    asyncio.run(scenario())
