"""Log each HTTP/1.x request line and the status of its response, one line per request.

Run it::

    tproxy run --addon examples/http_log.py
    TPROXY_HTTP_LOG=/var/log/tproxy-http.log tproxy run --addon examples/http_log.py

It says `sniff = True`, so every session waits for its client's first bytes, and claims the
sessions whose first bytes are an HTTP/1 request (`session.sniffed.proto == "http"`, on any
port). It passes their bytes through unchanged, cutting each direction into messages with
`tproxy.addons.http1` (Content-Length and chunked bodies, responses without a body: HEAD, 1xx,
204, 304), so requests split across chunks and several requests in one chunk (keep-alive,
pipelining) are each logged once. A line, written when the response's head has arrived (or
at the session's end, with status `-`, for a request that got none)::

    2026-12-01T08:00:00Z 0Q3H5V8K2M4PX 198.18.0.2:41000 -> 198.18.2.2:80 "GET / HTTP/1.1" 200

The request line is the client's bytes: it is cut to 200 characters and written as printable
ASCII only (any other byte, a backslash and a double quote become `\\xNN`), so a client
cannot forge a line or send escape sequences to a terminal.

Environment:
    TPROXY_HTTP_LOG: the file to append the lines to (created if missing); stderr if unset.
        It is opened once, at the first line, with O_APPEND, and each line is one `write`, so
        the workers' lines do not mix (unless a write is cut short, by a full disk: the rest
        of the line follows in another). A file that cannot be written (a missing directory,
        no permission, a full disk) is said once on stderr and its lines are dropped; the
        sessions go on, and the next line opens it again.

Limits:
    * Every session waits for its client's first bytes before it connects (a protocol whose
      server speaks first waits until the sniff timeout: 1 s without a policy), and a client
      whose first bytes come later than that is not sniffed as HTTP: not logged.
    * HTTP/1.x in clear, and inside TLS that tproxy intercepts (a `tls = "intercept"` policy
      rule: `session.tls` is set in `session_start`); other TLS is not claimed (its bytes are
      encrypted). HTTP/2 (what curl and browsers choose over TLS when the server offers it) is
      not HTTP/1: not logged.
    * After a CONNECT, a switch of protocols (a 101: WebSocket, h2c; it is logged with its
      101) or bytes that are not HTTP/1, the rest of that direction passes unlogged; a head
      over 64 KiB stops the logging too. An `Upgrade` the server declines changes nothing.
    * The file is kept open: after a rotation that renames it, the lines go on to the renamed
      file (rotate with copytruncate, or restart tproxy). It is written from the worker's
      event loop (a plain `def` hook): a slow disk slows every session of that worker.
    * At most 32 requests waiting for their responses are remembered per session, with the
      first 200 bytes of their request lines (4 KiB in all). Past that, the requests are no
      longer logged, nor the responses from the first one that would answer them (a status
      is never paired with another request).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass

from tproxy.addons.api import Session
from tproxy.addons.http1 import HTTP1Framer, Request

sniff = True

LOG_PATH = os.environ.get("TPROXY_HTTP_LOG") or None
MAX_REQUEST_LINE_CHARS = 200  # the framer keeps 200 bytes of each (KEPT_REQUEST_LINE_BYTES)


def session_start(session: Session) -> None:
    # HTTP in clear, or TLS that a `tls = "intercept"` rule decrypts (the hooks see plaintext).
    if session.tls is not None or (session.sniffed is not None and session.sniffed.proto == "http"):
        session.claim()
        client = HTTP1Framer(response=False)
        server = HTTP1Framer(response=True, connection=client.connection)
        session.state["http_log"] = _Log(client, server)


def client_data(session: Session, data: bytes) -> bytes:
    log: _Log = session.state["http_log"]
    log.client.feed(data)  # it records the requests, for the responses to pair with
    return data


def server_data(session: Session, data: bytes) -> bytes:
    log: _Log = session.state["http_log"]
    for piece in log.server.feed(data):
        head = piece.head
        if head is not None and (head.status >= 200 or head.status == 101):  # a final status
            _write_line(session, head.request, str(head.status))
    return data


def session_end(session: Session) -> None:
    log: _Log | None = session.state.get("http_log")
    if log is not None:
        for request in log.client.connection.waiting:
            _write_line(session, request, "-")


@dataclass
class _Log:
    client: HTTP1Framer
    server: HTTP1Framer


class _LogFile:
    """The log, written a line at a time from the event loop, and never raising: a log it
    cannot write must not end the sessions it logs. One descriptor, opened at the first line
    (again after a failure); the first failure is said once on stderr, and the lines that
    cannot be written are dropped."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.fd: int | None = None
        self.failed = False

    def write(self, line: bytes) -> None:
        try:
            if self.path is None:
                sys.stderr.write(line.decode("ascii"))
                sys.stderr.flush()
                return
            if self.fd is None:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                                  0o640)  # fmt: skip
            view = memoryview(line)
            while view:  # a short write (a signal, a disk filling up) goes on where it stopped
                written = os.write(self.fd, view)
                if written <= 0:
                    raise OSError("the log file took no bytes")
                view = view[written:]
        except (OSError, ValueError) as error:  # ValueError: stderr closed
            self._fail(error)

    def _fail(self, error: Exception) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
        if not self.failed:
            self.failed = True
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(
                    f"http_log: cannot write {self.path or 'stderr'}: {error}; "
                    "the lines that cannot be written are dropped (said once)\n"
                )
                sys.stderr.flush()


_LOG = _LogFile(LOG_PATH)


def _printable(raw: bytes, max_chars: int) -> str:
    r"""`raw` as printable ASCII, every other byte and `"` and `\` as `\xNN`, cut to at most
    `max_chars` characters (never inside an escape)."""
    out: list[str] = []
    length = 0
    for byte in raw[:max_chars]:
        char = chr(byte) if 0x20 <= byte <= 0x7E and byte not in b'"\\' else f"\\x{byte:02x}"
        length += len(char)
        if length > max_chars:
            break
        out.append(char)
    return "".join(out)


def _endpoint(address: tuple[str, int]) -> str:
    ip, port = address
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _write_line(session: Session, request: Request | None, status: str) -> None:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    line = "-" if request is None else _printable(request.start_line, MAX_REQUEST_LINE_CHARS)
    text = f"{when} {session.id} {_endpoint(session.client)} -> {_endpoint(session.dst)} "
    _LOG.write(f'{text}"{line}" {status}\n'.encode("ascii"))
