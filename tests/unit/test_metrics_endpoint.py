"""The metrics endpoint on loopback (no root): what a scraper, a browser and a hostile client
get from it, served from a selector loop like the supervisor's."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.core.endpoint import parse_endpoint
from tproxy.engine.metrics_endpoint import (
    MAX_CLIENTS,
    MAX_REQUEST_BYTES,
    REQUEST_TIMEOUT_S,
    MetricsEndpoint,
    MetricsEndpointError,
    open_metrics_socket,
)

BODY = b"# HELP x y\n# TYPE x gauge\nx 1.0\n" * 2000  # larger than one socket buffer write


class Loop:
    """A selector loop in a thread, as the supervisor's: calls what is ready, expires with a
    clock the test moves."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.now = 0.0
        self.accepts: list[str] = []
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        self.address = sock.getsockname()
        self.endpoint = MetricsEndpoint(sock, self.selector, self._render, clock=lambda: self.now)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self._thread.start()

        self._calls: list[Callable[[], None]] = []

    def _render(self, accept: str) -> tuple[bytes, str]:
        self.accepts.append(accept)
        if accept == "boom":  # (as prometheus_client does with some Accept headers)
            raise TypeError("an Accept header it cannot read")
        return BODY, "text/plain; version=0.0.4"

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` in the loop's thread, as the supervisor would, and wait for it."""
        done = threading.Event()

        def call_then_tell() -> None:
            fn()
            done.set()

        self._calls.append(call_then_tell)
        assert done.wait(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self.selector.select(0.02):
                key.data()
            self.endpoint.expire(self.now)
            while self._calls:
                self._calls.pop(0)()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.endpoint.close()
        self.selector.close()


@pytest.fixture
def loop() -> Iterator[Loop]:
    running = Loop()
    try:
        yield running
    finally:
        running.close()


def _exchange(address: Any, request: bytes) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_get_metrics_returns_the_whole_exposition_with_its_type(loop: Loop) -> None:
    answer = _exchange(loop.address, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: a/b\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert _status(answer) == 200 and body == BODY
    assert b"Content-Type: text/plain; version=0.0.4" in head
    assert f"Content-Length: {len(BODY)}".encode() in head
    assert loop.accepts == ["a/b"]
    # HTTP/1.0, a query string, HEAD: the same endpoint.
    assert _exchange(loop.address, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").endswith(BODY)
    head_only = _exchange(loop.address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert _status(head_only) == 200 and head_only.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 200),
        (b"GET /metrics/../etc HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi", 405),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40), 400),  # a TLS hello
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_BYTES + b"\r\n\r\n", 431),
    ],
    ids=["index", "other-path", "post", "tls", "too-large"],
)
def test_other_requests_get_a_short_answer(loop: Loop, request_bytes: bytes, status: int) -> None:
    assert _status(_exchange(loop.address, request_bytes)) == status
    assert loop.accepts == []


def test_a_silent_client_is_dropped_after_the_timeout_and_others_still_served(loop: Loop) -> None:
    silent = socket.create_connection(loop.address, timeout=5)
    try:
        silent.sendall(b"GET /met")  # and nothing more
        assert _status(_exchange(loop.address, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200
        loop.now += REQUEST_TIMEOUT_S
        assert silent.recv(10) == b""  # closed by the endpoint, unanswered
    finally:
        silent.close()


def test_when_full_the_oldest_unfinished_request_makes_room(loop: Loop) -> None:
    held = [socket.create_connection(loop.address, timeout=5) for _ in range(MAX_CLIENTS)]
    try:
        time.sleep(0.2)
        assert _status(_exchange(loop.address, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200
        assert held[0].recv(10) == b""  # the oldest, dropped for it
    finally:
        for sock in held:
            sock.close()


def test_pipelined_requests_get_the_first_ones_answer(loop: Loop) -> None:
    answer = _exchange(loop.address, b"GET /metrics HTTP/1.1\r\n\r\nGET /x HTTP/1.1\r\n\r\n")
    assert _status(answer) == 200 and answer.endswith(BODY)


def test_an_accept_header_the_renderer_cannot_read_gets_the_plain_format(loop: Loop) -> None:
    answer = _exchange(loop.address, b"GET /metrics HTTP/1.1\r\nAccept: boom\r\n\r\n")
    assert _status(answer) == 200 and answer.endswith(BODY)
    assert loop.accepts == ["boom", ""]


def test_after_stop_listening_the_exchange_in_flight_is_answered(loop: Loop) -> None:
    with socket.create_connection(loop.address, timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n")
        time.sleep(0.1)
        loop.call(loop.endpoint.stop_listening)
        sock.sendall(b"\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert _status(answer) == 200 and answer.endswith(BODY)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(loop.address, timeout=5)


def test_a_port_in_use_is_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(MetricsEndpointError) as raised:
            open_metrics_socket(parse_endpoint(f"127.0.0.1:{port}"))
    assert str(raised.value) == (
        f"--metrics-listen 127.0.0.1:{port}: Address already in use (another program listens there)"
    )


@settings(max_examples=60, deadline=None)
@given(
    st.binary(max_size=300)
    | st.builds(
        lambda head, tail: head + tail,
        st.sampled_from(
            [
                b"GET /metrics HTTP/1.1\r\n",
                b"HEAD / HTTP/1.0\r\n",
                b"GET /metrics HTTP/1.1\r\nAccept: ",
            ]
        ),
        st.binary(max_size=200),
    )
)
def test_any_bytes_get_an_answer_or_a_close_and_the_next_scrape_is_served(data: bytes) -> None:
    running = Loop()
    try:
        with socket.create_connection(running.address, timeout=5) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    answer += chunk
        assert answer == b"" or _status(answer) in {200, 400, 404, 405, 431}, answer[:100]
        assert _status(_exchange(running.address, b"GET /metrics HTTP/1.1\r\n\r\n")) == 200
    finally:
        running.close()
