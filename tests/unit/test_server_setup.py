"""Per-process set-up of the server: the splice fallback and the connection limit."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tproxy.engine.server as server_module
from tproxy.core.config import LogFormat, ProxyConfig, RelayKind, max_connections_for
from tproxy.engine.pump import splice_works
from tproxy.engine.server import ProxyServer
from tproxy.observability.eventlog import EventLog


def _raise(exc: OSError) -> Callable[..., int]:
    def splice(*_args: object, **_kwargs: object) -> int:
        raise exc

    return splice


@pytest.mark.parametrize(
    "splice",
    [
        pytest.param(lambda *_a, **_k: 0, id="splices-nothing"),
        pytest.param(_raise(OSError(errno.EINVAL, "Invalid argument")), id="EINVAL"),
        pytest.param(_raise(OSError(errno.ENOSYS, "Function not implemented")), id="ENOSYS"),
    ],
)
def test_splice_is_judged_not_working_when_the_kernel_says_so(
    monkeypatch: pytest.MonkeyPatch, splice: Callable[..., int]
) -> None:
    monkeypatch.setattr(os, "splice", splice)
    assert not splice_works()


def test_splice_is_judged_working_when_one_byte_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    moved: list[int] = []

    def splice(src: int, dst: int, count: int, **_kwargs: object) -> int:
        moved.append(len(os.read(src, count)))  # the byte the probe sent really is there
        return moved[-1]

    monkeypatch.setattr(os, "splice", splice)
    assert splice_works()
    assert moved == [1]


def test_splice_is_judged_not_working_without_os_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "splice")
    assert not splice_works()


@pytest.fixture
def prepared() -> Iterator[Callable[..., ProxyServer]]:
    """Makes prepared servers; gives back what each one took when the test ends."""
    made: list[ProxyServer] = []

    def make(config: ProxyConfig, stream: io.StringIO, share: int = 1) -> ProxyServer:
        server = ProxyServer(config, EventLog(LogFormat.JSON, stream), listeners=[], share=share)
        server.prepare()
        made.append(server)
        return server

    fds_before = len(os.listdir("/proc/self/fd"))
    yield make
    for server in made:
        server.release()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # nothing leaked


def test_without_splice_the_copy_relay_takes_over_and_says_so(
    monkeypatch: pytest.MonkeyPatch, prepared: Callable[..., ProxyServer]
) -> None:
    monkeypatch.setattr(server_module, "splice_works", lambda: False)
    log = io.StringIO()
    server = prepared(ProxyConfig(relay=RelayKind.SPLICE), log)
    assert server.config.relay is RelayKind.COPY
    notices = [json.loads(line)["message"] for line in log.getvalue().splitlines()]
    assert notices == ["splice does not work on this kernel: relaying by copy"]


def test_with_splice_nothing_is_said(prepared: Callable[..., ProxyServer]) -> None:
    log = io.StringIO()
    assert prepared(ProxyConfig(), log).config.relay is RelayKind.SPLICE
    assert log.getvalue() == ""


def test_max_connections_is_split_between_workers(
    prepared: Callable[..., ProxyServer],
) -> None:
    server = prepared(ProxyConfig(max_connections=101), io.StringIO(), share=2)
    assert server._max_connections == 51  # the two shares add up to at least the limit


def test_the_default_limit_counts_a_third_descriptor_when_sessions_may_be_captured(
    prepared: Callable[..., ProxyServer], tmp_path: Path
) -> None:
    plain = prepared(ProxyConfig(), io.StringIO())._max_connections
    dir_only = prepared(ProxyConfig(capture_dir=str(tmp_path)), io.StringIO())._max_connections
    capturing = prepared(ProxyConfig(capture_dir=str(tmp_path), capture_all=True), io.StringIO())
    nofile = capturing._nofile
    assert plain == dir_only == max_connections_for(nofile)  # nothing can be captured
    assert capturing._max_connections == max_connections_for(nofile, 3) < plain


class FakeSession:
    """Stands in for a session in the sweep: records what the sweep did to it."""

    def __init__(self, raises: bool = False) -> None:
        self.raises = raises
        self.swept: list[float] = []
        self.failed: list[BaseException] = []

    def sweep(self, now: float) -> None:
        self.swept.append(now)
        if self.raises:
            raise RuntimeError("broken deadline check")

    def fail(self, exc: BaseException) -> None:
        self.failed.append(exc)


def test_a_session_whose_check_raises_is_failed_and_the_others_are_still_swept(
    prepared: Callable[..., ProxyServer],
) -> None:
    server = prepared(ProxyConfig(), io.StringIO())
    sessions = [FakeSession(), FakeSession(raises=True), FakeSession()]
    server._ctx.sessions.update(sessions)  # type: ignore[arg-type]
    server.sweep_once(100.0)
    assert all(s.swept == [100.0] for s in sessions)
    assert [len(s.failed) for s in sessions] == [0, 1, 0]
    assert str(sessions[1].failed[0]) == "broken deadline check"


def test_the_sweep_logs_a_failed_round_and_runs_the_next(
    prepared: Callable[..., ProxyServer],
) -> None:
    log = io.StringIO()
    # A connect timeout of 0.04 s makes the sweep run every 10 ms.
    server = prepared(ProxyConfig(connect_timeout_s=0.04), log)
    rounds: list[float] = []

    def sweep_once(now: float) -> None:
        rounds.append(now)
        if len(rounds) == 1:
            raise RuntimeError("the first round breaks")

    server.sweep_once = sweep_once  # type: ignore[method-assign]

    async def run() -> None:
        task = asyncio.ensure_future(server._sweep_timeouts())
        async with asyncio.timeout(10):
            while len(rounds) < 3:
                await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.wait([task])

    asyncio.run(run())
    server._log.flush()
    notices = [json.loads(line)["message"] for line in log.getvalue().splitlines()]
    assert notices == ["timeout sweep failed, carrying on: RuntimeError: the first round breaks"]


def test_refusals_are_counted_per_reason(prepared: Callable[..., ProxyServer]) -> None:
    log = io.StringIO()
    server = prepared(ProxyConfig(), log)
    for _ in range(30):
        server._refuse(socket.socket(), "max_connections", "max connections (50) reached")
    server._refuse(socket.socket(), "out_of_descriptors", "out of file descriptors")
    server.sweep_once(0.0)
    server.sweep_once(1.0)  # nothing new: nothing written
    server._log.flush()
    refused = [json.loads(line) for line in log.getvalue().splitlines()]
    assert [(e["count"], e["reason"], e["detail"]) for e in refused] == [
        (30, "max_connections", "max connections (50) reached"),
        (1, "out_of_descriptors", "out of file descriptors"),
    ]
