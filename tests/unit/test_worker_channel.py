"""The worker's end of the channel: a heartbeat at once, requests answered by their handler,
junk and unknown commands answered or logged, never raised."""

from __future__ import annotations

import asyncio
import io
import os
import socket
from types import SimpleNamespace
from typing import Any, cast

from tproxy.core.config import LogFormat
from tproxy.core.session import SessionRecord
from tproxy.core.worker_protocol import Heartbeat, Reply, Request, decode, encode
from tproxy.engine.session import SessionContext
from tproxy.engine.worker_channel import WorkerChannel
from tproxy.observability.eventlog import EventLog


def _context(stream: io.StringIO) -> SessionContext:
    records = [
        SessionRecord(
            "01kbj9dq70304", "198.18.1.2:40000", "198.18.2.2:9000", 0.0, bytes_up=10, bytes_down=20
        ),
        SessionRecord(
            "01kbj9dq70302", "[2001:db8:1::2]:40001", "[2001:db8:2::2]:80", 0.0, bytes_up=1
        ),
    ]
    sessions = [SimpleNamespace(record=r) for r in records]
    ctx = SimpleNamespace(sessions=sessions, active=2, opened=9, closed_bytes_up=100,
                          closed_bytes_down=200,
                          log=EventLog(LogFormat.JSON, stream))  # fmt: skip
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
            assert await _receive(supervisor_end) == Heartbeat(3, os.getpid(), 2, 9, 111, 220)
            supervisor_end.send(b"\xff not a message")
            supervisor_end.send(encode(Request(1, "sessions")))
            reply = await _receive(supervisor_end)
            assert reply == Reply(1, 3, {
                "active": 2,
                "sessions": [
                    {"id": "01kbj9dq70302", "client": "[2001:db8:1::2]:40001",
                     "dst": "[2001:db8:2::2]:80"},
                    {"id": "01kbj9dq70304", "client": "198.18.1.2:40000", "dst": "198.18.2.2:9000"},
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
