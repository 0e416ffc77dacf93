"""SIGHUP's reload in a server: what it applies (the log format at once), what it keeps and names in
one notice, and that a bad file changes nothing."""

from __future__ import annotations

import io
import json
from dataclasses import replace

from tproxy.core.config import (
    InterceptMode,
    LogFormat,
    LoopKind,
    ProxyConfig,
    parse_config_file,
)
from tproxy.core.endpoint import parse_endpoint
from tproxy.engine.server import ProxyServer
from tproxy.observability.eventlog import EventLog
from tproxy.observability.events import Notice


def _reloaded(
    running: ProxyConfig, loaded: ProxyConfig
) -> tuple[ProxyServer, EventLog, io.StringIO]:
    """A server running `running` after one SIGHUP that read `loaded`; its log."""
    stream = io.StringIO()
    log = EventLog(running.log_format, stream)
    server = ProxyServer(running, log, lambda: loaded, listeners=[])
    server.reload_now()
    return server, log, stream


def test_a_reload_switches_the_log_format_at_once() -> None:
    running = ProxyConfig()
    server, log, stream = _reloaded(running, replace(running, log_format=LogFormat.JSON))
    assert server.config.log_format is LogFormat.JSON
    [line] = stream.getvalue().splitlines()
    assert json.loads(line)["message"].startswith("reloaded the configuration")
    log.emit(Notice("next"))
    assert json.loads(stream.getvalue().splitlines()[-1])["message"] == "next"


def test_and_back_to_text() -> None:
    running = ProxyConfig(log_format=LogFormat.JSON)
    _, _, stream = _reloaded(running, replace(running, log_format=LogFormat.TEXT))
    [line] = stream.getvalue().splitlines()
    assert not line.startswith("{")
    assert line.endswith("reloaded the configuration (max connections 1)")


def test_what_needs_a_restart_is_kept_and_named_in_one_notice() -> None:
    running = ProxyConfig()
    loaded = replace(
        running,
        loop=LoopKind.ASYNCIO,
        listen=[parse_endpoint("198.18.0.1:80")],
        mode=InterceptMode.REDIRECT,
        idle_timeout_s=5.0,
        log_format=LogFormat.JSON,
    )
    server, _, stream = _reloaded(running, loaded)
    messages = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert messages[0] == "reload: mode, listen, loop change only on restart; kept as is"
    assert messages[1].startswith("reloaded the configuration")
    assert len(messages) == 2
    assert server.config == replace(running, idle_timeout_s=5.0, log_format=LogFormat.JSON)


def test_one_restart_only_change_is_one_notice_naming_it() -> None:
    running = ProxyConfig(log_format=LogFormat.JSON)
    _, _, stream = _reloaded(running, replace(running, loop=LoopKind.ASYNCIO))
    notices = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert notices[0] == "reload: loop changes only on restart; kept as is"
    assert sum("loop" in n for n in notices) == 1


def test_a_bad_file_keeps_everything() -> None:
    running = ProxyConfig(log_format=LogFormat.JSON)
    stream = io.StringIO()

    def load() -> ProxyConfig:
        parse_config_file('log_format = "yaml"')
        raise AssertionError("unreachable")

    server = ProxyServer(running, EventLog(running.log_format, stream), load, listeners=[])
    server.reload_now()
    assert server.config is running
    [line] = stream.getvalue().splitlines()
    assert json.loads(line)["message"] == (
        'reload failed, keeping the running configuration: log_format must be "text" or "json"'
    )
