"""The metrics endpoint: `GET /metrics` over HTTP/1, served from the supervisor's own loop.

Not prometheus_client's `start_http_server`: that runs a thread, and the supervisor forks its
workers (a thread in a forking process is a lock held forever in the child, sooner or later).
The supervisor's loop is plain `selectors` (`engine.supervisor`); this endpoint adds its
listening socket and its connections to that selector, each with a callable the loop calls
when the socket is ready, and `expire` on every round of the loop.

What it answers: `GET /metrics` (and `HEAD`) the exposition `render` makes, in the format the
scraper's Accept header asks for; `GET /` a line pointing there; anything else 404, a method
other than GET or HEAD 405. One request per connection (`Connection: close`). The request is
parsed by httptools (the scraper is whoever reaches the port: hostile bytes, never trusted);
at most `MAX_CLIENTS` at once, `MAX_REQUEST_BYTES` of request, `TIMEOUT_S` for the whole
exchange -- past any of them the connection is closed, and nothing else is affected.
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
TIMEOUT_S: Final = 10.0
ACCEPT_BATCH: Final = 16

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
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"accept":
            self.accept = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.complete = True


class _Client:
    __slots__ = ("deadline_at", "out", "parser", "request", "sock", "taken")

    def __init__(self, sock: socket.socket, deadline_at: float) -> None:
        self.sock = sock
        self.deadline_at = deadline_at
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
        self._clients: dict[socket.socket, _Client] = {}
        self.served = 0
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self._accept)

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self._sock)
        self._sock.close()

    def drop(self) -> None:
        """In a forked worker: close the descriptors it inherited (the selector is not its)."""
        for client in self._clients.values():
            client.sock.close()
        self._clients.clear()
        self._sock.close()

    def expire(self, now: float) -> None:
        """Close the connections whose exchange took longer than `TIMEOUT_S`."""
        for client in [c for c in self._clients.values() if now >= c.deadline_at]:
            self._drop(client)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # aborted while queued, out of descriptors: try on the next round
                return
            if len(self._clients) >= MAX_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, self._clock() + TIMEOUT_S)
            self._clients[sock] = client
            self._selector.register(sock, selectors.EVENT_READ, partial(self._ready, client))

    def _ready(self, client: _Client) -> None:
        if client.out is None:
            self._read(client)
        elif client.out:
            self._write(client)
        else:
            self._discard(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)
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
            body, content_type = self._render(client.request.accept)
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
        try:
            data = client.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(client.sock)
        client.sock.close()
