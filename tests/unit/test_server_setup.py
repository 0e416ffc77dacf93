"""Per-process set-up of the server: the splice fallback and the connection limit."""

from __future__ import annotations

import io
import json

import pytest

import tproxy.engine.server as server_module
from tproxy.core.config import LogFormat, ProxyConfig, RelayKind
from tproxy.engine.pump import splice_works
from tproxy.engine.server import ProxyServer
from tproxy.observability.eventlog import EventLog


def test_this_kernel_splices() -> None:
    assert splice_works()


def _prepared(config: ProxyConfig, stream: io.StringIO, share: int = 1) -> ProxyServer:
    server = ProxyServer(config, EventLog(LogFormat.JSON, stream), listeners=[], share=share)
    server.prepare()
    return server


def test_without_splice_the_copy_relay_takes_over_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(server_module, "splice_works", lambda: False)
    log = io.StringIO()
    server = _prepared(ProxyConfig(relay=RelayKind.SPLICE), log)
    assert server.config.relay is RelayKind.COPY
    notices = [json.loads(line)["message"] for line in log.getvalue().splitlines()]
    assert notices == ["splice does not work on this kernel: relaying by copy"]


def test_with_splice_nothing_is_said() -> None:
    log = io.StringIO()
    assert _prepared(ProxyConfig(), log).config.relay is RelayKind.SPLICE
    assert log.getvalue() == ""


def test_max_connections_is_split_between_workers() -> None:
    server = _prepared(ProxyConfig(max_connections=101), io.StringIO(), share=2)
    assert server._max_connections == 51  # the two shares add up to at least the limit
