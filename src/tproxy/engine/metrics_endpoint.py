"""The metrics endpoint: `GET /metrics` over HTTP/1, served from the supervisor's own loop.

Not prometheus_client's `start_http_server`: that runs a thread, and the supervisor forks its
workers (a thread in a forking process is a lock held forever in the child, sooner or later).
The supervisor's loop is plain `selectors` (`engine.supervisor`); this endpoint adds its
listening socket and its connections to that selector, each with a callable the loop calls
when the socket is ready, and `expire` on every round of the loop.

What it answers: `GET /metrics` (and `HEAD`) the exposition `render` makes, in the format the
scraper's Accept header asks for (Prometheus' text format when that header makes no sense);
`GET /` a line pointing there; anything else 404, a method other than GET or HEAD 405. One
request per connection (`Connection: close`; bytes after the first request are read and
ignored). The request is parsed by httptools (the scraper is whoever reaches the port: hostile
bytes, never trusted). Bounded: at most `MAX_CLIENTS` connections (when full, the oldest one
that has not finished its request makes room for a new one), `MAX_REQUEST_BYTES` of request,
`REQUEST_TIMEOUT_S` to send it and `TIMEOUT_S` for the whole exchange -- past any of them the
connection is closed, and nothing else is affected. Nothing a client does can raise into the
supervisor's loop.

Stopping: `stop_listening()` at the supervisor's first stop signal (a takeover's new process
answers on the same socket from then on) lets the exchanges in flight finish; `close()` at the
end closes everything.
"""

from __future__ import annotations

import contextlib
import errno
import selectors
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Final

import httptools

from tproxy.core.endpoint import Endpoint

MAX_CLIENTS: Final = 16
MAX_REQUEST_BYTES: Final = 16 * 1024
REQUEST_TIMEOUT_S: Final = 3.0
TIMEOUT_S: Final = 10.0
ACCEPT_BATCH: Final = 16
# Out of descriptors: accepting pauses this long (the listening socket stays readable).
ACCEPT_PAUSE_S: Final = 1.0

Render = Callable[[str], tuple[bytes, str]]
"""The exposition for an Accept header: (body, content type)."""

_INDEX = b"tproxy: metrics at /metrics\n"
_REASONS: Final = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                   431: "Request Header Fields Too Large"}  # fmt: skip


class MetricsEndpointError(Exception):
    """The endpoint cannot listen where asked: one line for the user."""


def open_metrics_socket(endpoint: Endpoint) -> socket.socket:
    """A listening TCP socket at `endpoint` (SO_REUSEADDR; not SO_REUSEPORT: a second tproxy
    must find the port taken. A `--takeover` is handed this very socket: `engine.takeover`).

    Raises:
        MetricsEndpointError: the address is in use or cannot be bound.
    """
    family = socket.AF_INET6 if endpoint.ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((str(endpoint.ip), endpoint.port))
        sock.listen(64)
    except OSError as exc:
        sock.close()
        raise MetricsEndpointError(
            f"--metrics-listen {endpoint}: {exc.strerror or exc}"
            + (" (another program listens there)" if exc.errno == errno.EADDRINUSE else "")
        ) from None
    sock.setblocking(False)
    return sock


class _Request:
    """What httptools tells of one request (its callbacks)."""

    __slots__ = ("accept", "complete", "header", "url")

    def __init__(self) -> None:
        self.url = b""
        self.accept = ""
        self.header = b""
        self.complete = False

    def on_url(self, url: bytes) -> None:
        if not self.complete:  # (a pipelined second request is not ours to answer)
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete and name.lower() == b"accept":
            self.accept = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.complete = True


class _Client:
    __slots__ = ("answer_by", "deadline_at", "out", "parser", "request", "sock", "taken")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock = sock
        self.deadline_at = now + REQUEST_TIMEOUT_S  # then, once answered, `answer_by`
        self.answer_by = now + TIMEOUT_S
        self.request = _Request()
        self.parser = httptools.HttpRequestParser(self.request)
        self.taken = 0
        # The response, once made: what is left to send (empty: sent, the client's end awaited).
        self.out: memoryview | None = None


class MetricsEndpoint:
    """Serves `render`'s exposition on `sock` from `selector`'s loop (see the module doc).

    The loop calls the registered callables when their socket is ready, and `expire(now)` on
    every round; `close()` at the end.
    """

    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector, render: Render,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self._sock = sock
        self._selector = selector
        self._render = render
        self._clock = clock
        # Connections by when they came (dicts keep their order: the first is the oldest).
        self._clients: dict[socket.socket, _Client] = {}
        self._listening: socket.socket | None = sock
        self._paused_until: float | None = None
        self.served = 0
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self._accept)

    def stop_listening(self) -> None:
        """Accept no more (the exchanges in flight go on until done or timed out)."""
        if self._listening is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._listening)
            self._listening.close()
            self._listening = None

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        self.stop_listening()

    def drop(self) -> None:
        """In a forked worker: close the descriptors it inherited (the selector is not its)."""
        for client in self._clients.values():
            client.sock.close()
        self._clients.clear()
        if self._listening is not None:
            self._listening.close()
            self._listening = None

    def expire(self, now: float) -> None:
        """Close the connections past their deadline; accept again after a pause."""
        for client in [c for c in self._clients.values() if now >= c.deadline_at]:
            self._drop(client)
        if self._paused_until is not None and now >= self._paused_until:
            self._paused_until = None
            if self._listening is not None:
                self._selector.register(self._listening, selectors.EVENT_READ, self._accept)

    def _accept(self) -> None:
        listening = self._listening
        for _ in range(ACCEPT_BATCH):
            if listening is None:
                return
            try:
                sock, _ = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError:  # out of descriptors (or memory): pause, or the loop would spin
                self._selector.unregister(listening)
                self._paused_until = self._clock() + ACCEPT_PAUSE_S
                return
            if len(self._clients) >= MAX_CLIENTS and not self._make_room():
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, self._clock())
            self._clients[sock] = client
            self._selector.register(sock, selectors.EVENT_READ, partial(self._ready, client))

    def _make_room(self) -> bool:
        """Full: drop the oldest connection still sending its request; False if none is."""
        for client in self._clients.values():
            if client.out is None:
                self._drop(client)
                return True
        return False

    def _ready(self, client: _Client) -> None:
        try:
            if client.out is None:
                self._read(client)
            elif client.out:
                self._write(client)
            else:
                self._discard(client)
        except Exception:  # a bug of ours: this exchange ends, the supervisor's loop goes on
            self._drop(client)

    def _received(self, client: _Client, size: int) -> bytes:
        """What the client sent (b"": nothing yet, or it has ended, and then it is dropped)."""
        try:
            data = client.sock.recv(size)
        except (BlockingIOError, InterruptedError):
            return b""
        except OSError:
            data = b""
        if not data:
            self._drop(client)
        return data

    def _read(self, client: _Client) -> None:
        data = self._received(client, 4096)
        if not data:
            return
        client.taken += len(data)
        try:
            client.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the headers are complete: answered below, the upgrade is not taken
        except httptools.HttpParserError:
            self._respond(client, 400, b"bad request\n")
            return
        if client.taken > MAX_REQUEST_BYTES:
            self._respond(client, 431, b"request too large\n")
        elif client.request.complete:
            self._answer(client)

    def _answer(self, client: _Client) -> None:
        method = client.parser.get_method()
        head = method == b"HEAD"
        if method not in (b"GET", b"HEAD"):
            self._respond(client, 405, b"only GET and HEAD\n", extra=b"Allow: GET, HEAD\r\n")
            return
        try:
            path = httptools.parse_url(client.request.url).path
        except httptools.HttpParserInvalidURLError:
            self._respond(client, 400, b"bad request target\n")
            return
        if path == b"/metrics":
            try:
                body, content_type = self._render(client.request.accept)
            except Exception:  # an Accept header prometheus_client chokes on: the plain format
                body, content_type = self._render("")
            self._respond(client, 200, body, content_type=content_type, head=head)
        elif path == b"/":
            self._respond(client, 200, _INDEX, head=head)
        else:
            self._respond(client, 404, b"not found: try /metrics\n", head=head)

    def _respond(
        self, client: _Client, status: int, body: bytes, *,
        content_type: str = "text/plain; charset=utf-8", head: bool = False, extra: bytes = b"",
    ) -> None:  # fmt: skip
        header = (
            (
                f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            ).encode()
            + extra
            + b"\r\n"
        )
        client.out = memoryview(header if head else header + body)
        client.deadline_at = client.answer_by
        self.served += status == 200
        self._selector.modify(client.sock, selectors.EVENT_WRITE, partial(self._ready, client))
        self._write(client)

    def _write(self, client: _Client) -> None:
        out = client.out
        assert out is not None
        try:
            sent = client.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.out = out = out[sent:]
        if not out:
            # Answered: FIN, then read what the client still sends until its own FIN (or the
            # timeout), so that closing with unread bytes does not reset the answer away.
            with contextlib.suppress(OSError):
                client.sock.shutdown(socket.SHUT_WR)
            self._selector.modify(client.sock, selectors.EVENT_READ, partial(self._ready, client))

    def _discard(self, client: _Client) -> None:
        self._received(client, 65536)  # (read to its end, then dropped)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()
