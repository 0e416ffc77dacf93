"""systemd's notify protocol against a real AF_UNIX datagram socket, as systemd listens on one:
the datagrams READY=1, STOPPING=1, WATCHDOG=1 and STATUS= arrive as sent, at a path or an
abstract name; STATUS is one printable line; the watchdog's interval is half of WATCHDOG_USEC
and only for the process WATCHDOG_PID names; nothing is sent without NOTIFY_SOCKET, and a
socket that went away is counted, never raised."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.service.notify import (
    MAX_STATUS_CHARS,
    Notifier,
    NotifyError,
    message,
    parse_address,
    watchdog_interval_s,
)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket where systemd would listen, and its NOTIFY_SOCKET value."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    yield sock, str(path)
    sock.close()


def test_ready_status_watchdog_and_stopping_arrive_as_sent(
    listener: tuple[socket.socket, str],
) -> None:
    sock, value = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert notifier.enabled
    assert notifier.ready("2 workers, 0 sessions")
    assert notifier.watchdog()
    assert notifier.status("draining: 3 sessions")
    assert notifier.stopping()
    received = [sock.recv(4096) for _ in range(4)]
    assert received == [
        b"READY=1\nSTATUS=2 workers, 0 sessions",
        b"WATCHDOG=1",
        b"STATUS=draining: 3 sessions",
        b"STOPPING=1",
    ]
    assert (notifier.sent, notifier.failures) == (4, 0)
    notifier.close()


def test_an_abstract_socket_name_is_reached() -> None:
    name = f"tproxy-test-notify-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready()
        assert sock.recv(4096) == b"READY=1"
        notifier.close()
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert not notifier.ready() and not notifier.watchdog()
    assert (notifier.sent, notifier.failures) == (0, 0)


def test_a_socket_that_went_away_is_counted_not_raised(
    listener: tuple[socket.socket, str],
) -> None:
    sock, value = listener
    sock.close()
    os.unlink(value)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert not notifier.ready()
    assert not notifier.watchdog()
    assert (notifier.sent, notifier.failures) == (0, 2)
    notifier.close()


@pytest.mark.parametrize("value", ["relative/path", "@", "vsock:2:1234"])
def test_what_systemd_never_sets_is_refused(value: str) -> None:
    with pytest.raises(NotifyError):
        parse_address(value)


@pytest.mark.parametrize(
    ("env", "pid", "expected"),
    [
        ({}, 10, None),
        ({"WATCHDOG_USEC": "0"}, 10, None),
        ({"WATCHDOG_USEC": "30000000"}, 10, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "10"}, 10, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "11"}, 10, None),  # another process's
    ],
)
def test_the_watchdog_interval_is_half_the_timeout_for_the_process_it_names(
    env: dict[str, str], pid: int, expected: float | None
) -> None:
    assert watchdog_interval_s(env, pid) == expected


def test_a_watchdog_setting_that_is_not_a_number_is_refused() -> None:
    with pytest.raises(NotifyError):
        watchdog_interval_s({"WATCHDOG_USEC": "soon"}, 1)


@given(st.text())
def test_status_is_one_printable_line_of_bounded_length(text: str) -> None:
    datagram = message(status=text)
    assert datagram.startswith(b"STATUS=")
    value = datagram[len(b"STATUS=") :]
    assert b"\n" not in value and len(value) <= MAX_STATUS_CHARS
    assert all(0x20 <= byte <= 0x7E for byte in value)


def test_several_assignments_go_in_one_datagram_in_systemds_order() -> None:
    assert message(ready=True, stopping=True, watchdog=True, mainpid=7, status="x") == (
        b"READY=1\nSTOPPING=1\nMAINPID=7\nWATCHDOG=1\nSTATUS=x"
    )
