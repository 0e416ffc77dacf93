"""Rewrite HTTP responses: add a header and replace a string in the body, fixing Content-Length.

Run it::

    tproxy run --addon examples/rewrite_response.py
    TPROXY_REWRITE_FROM=http:// TPROXY_REWRITE_TO=https:// tproxy run --addon ...

It says `sniff = True` and claims the sessions whose first bytes are an HTTP/1 request (on any
port). Each response with a Content-Length body of at most 1 MiB is held back until its body is
complete, then sent on with `X-Rewritten-By: tproxy` (replacing one the server sent), every
occurrence of TPROXY_REWRITE_FROM in its body replaced by TPROXY_REWRITE_TO, and its
Content-Length set to the new body's length. Every response of a keep-alive connection is
rewritten on its own; requests pass unchanged.

Environment:
    TPROXY_REWRITE_FROM: the text to replace in bodies (UTF-8), default "hello"; empty: bodies
        are left as they are (the header is still added).
    TPROXY_REWRITE_TO: what replaces it (UTF-8), default "goodbye".

Limits (each such response passes byte for byte, unchanged):
    * a body longer than 1 MiB, chunked or ended by the server's FIN (its length unknown
      until the end): holding it back would cost unbounded memory or stall the client;
    * a body with a Content-Encoding (gzip, br, ...): the text is not in its bytes;
    * responses without a body (to HEAD, 1xx, 204, 304);
    * anything after a CONNECT, an upgrade (101) or bytes that are not HTTP/1 (the rest of the
      connection), and a response the server cut short (sent as it came, at the server's FIN).
    HTTP/1.x in clear only (TLS is not claimed). Every session waits for its client's first
    bytes before it connects (a protocol whose server speaks first waits until the sniff
    timeout: 1 s without a policy). The replacement is on the body's bytes: a string split
    across the held body is found, whatever the chunks were.
"""

from __future__ import annotations

import os
import re
from collections import deque
from dataclasses import dataclass, field

from tproxy.addons.api import Session

sniff = True

REWRITE_FROM = os.environ.get("TPROXY_REWRITE_FROM", "hello").encode()
REWRITE_TO = os.environ.get("TPROXY_REWRITE_TO", "goodbye").encode()
HEADER = (b"X-Rewritten-By", b"tproxy")
MAX_BODY_BYTES = 1 << 20


def session_start(session: Session) -> None:
    if session.sniffed is not None and session.sniffed.proto == "http":
        session.claim()
        requests: deque[_Head] = deque(maxlen=_MAX_WAITING_REQUESTS)
        session.state["rewrite"] = _Rewrite(
            _HTTP1Framer(response=False, requests=requests),
            _HTTP1Framer(response=True, requests=requests),
        )


def client_data(session: Session, data: bytes) -> bytes:
    rewrite: _Rewrite = session.state["rewrite"]
    rewrite.client.feed(data)  # its heads tell the responses which one answers a HEAD
    return data


def server_data(session: Session, data: bytes) -> bytes:
    rewrite: _Rewrite = session.state["rewrite"]
    out = bytearray()
    for piece in rewrite.server.feed(data):
        if rewrite.held_head is not None:
            rewrite.held += piece.raw
            if piece.kind == "end":
                out += _rewritten(rewrite.held_head, bytes(rewrite.held))
                rewrite.held_head = None
                rewrite.held.clear()
        elif piece.head is not None and _is_rewritable(piece.head):
            rewrite.held_head = piece.head
            rewrite.held += piece.raw
        else:
            out += piece.raw
    return bytes(out)


def server_eof(session: Session) -> bytes:
    """The server is done: a response it cut short goes on as it came."""
    rewrite: _Rewrite = session.state["rewrite"]
    rest = bytes(rewrite.held + rewrite.server.pending)
    rewrite.held.clear()
    rewrite.server.pending.clear()
    return rest


@dataclass
class _Rewrite:
    client: _HTTP1Framer
    server: _HTTP1Framer
    held_head: _Head | None = None  # the response being held back, and its bytes so far
    held: bytearray = field(default_factory=bytearray)


def _is_rewritable(head: _Head) -> bool:
    encodings = [v.strip().lower() for v in b",".join(head.values(b"content-encoding")).split(b",")]
    identity = all(coding in (b"", b"identity") for coding in encodings)
    return (
        head.status >= 200 and head.body == "length" and head.length <= MAX_BODY_BYTES and identity
    )


def _rewritten(head: _Head, raw: bytes) -> bytes:
    """The response `raw` (its head `head`, then its whole body) with the header added, the
    body's text replaced and its Content-Length fixed."""
    body = raw[len(raw) - head.length :]
    if REWRITE_FROM:
        body = body.replace(REWRITE_FROM, REWRITE_TO)
    lines = [head.start_line]
    for name, value in head.headers:
        if name.lower() == b"content-length":
            lines.append(name + b": " + str(len(body)).encode())
        elif name.lower() != HEADER[0].lower():
            lines.append(name + b": " + value)
    lines.append(HEADER[0] + b": " + HEADER[1])
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --- HTTP/1 framing: the same in http_log.py, rewrite_response.py and block_uploads.py ------
# (each example is one file you can copy alone; tests/unit/test_examples.py keeps the copies
# identical)

_MAX_HEAD_BYTES = 64 * 1024
_MAX_LINE_BYTES = 4 * 1024  # a chunk-size or trailer line
_MAX_WAITING_REQUESTS = 128
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LEADING_NEWLINES = re.compile(rb"[\r\n]*")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") [^\x00-\x20\x7f]+ HTTP/1\.[01]")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_HEADER_NAME = re.compile(_TOKEN)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?\n")


@dataclass(frozen=True, slots=True)
class _Head:
    """A message's start line and headers (names as sent), and how its body is framed.

    `method` is a request's method; for a response, the method of the request it answers
    (`request`; b"" and None when unknown). `status` is a response's status (0 for a request).
    `body` is "none", "length" (`length` bytes), "chunked" or "close" (until the FIN).
    """

    start_line: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    method: bytes = b""
    status: int = 0
    body: str = "none"
    length: int = 0
    request: _Head | None = None

    def values(self, name: bytes) -> list[bytes]:
        """The values of header `name` (lower case), in order."""
        return [value for key, value in self.headers if key.lower() == name]


@dataclass(frozen=True, slots=True)
class _Piece:
    """A run of one direction's bytes: "head" (a whole head, `head` parsed), "body" (body
    bytes, chunk framing included), "end" (no bytes: the message ended) or "opaque" (bytes
    after the framer stopped understanding: a tunnel, an upgrade, not HTTP/1)."""

    kind: str
    raw: bytes = b""
    head: _Head | None = None


@dataclass
class _HTTP1Framer:
    """Cuts one direction of an HTTP/1.x connection into heads, bodies and message ends, from
    chunks cut anywhere. Pure: bytes in, pieces out; `b"".join(raw of the pieces)` is what was
    fed, minus an unfinished head (`pending`), which is returned once it is whole.

    A request's head goes to `requests` (shared with the response side's framer), so a
    response knows which request it answers: a response to HEAD has no body. What it cannot
    frame (not HTTP/1, a head over 64 KiB, conflicting lengths, a CONNECT or upgrade) ends the
    framing: the rest of the direction is one "opaque" run. Nothing it is fed makes it raise.
    """

    response: bool
    requests: deque[_Head] = field(default_factory=lambda: deque(maxlen=_MAX_WAITING_REQUESTS))
    pending: bytearray = field(default_factory=bytearray)
    state: str = "head"  # "head", "length", "chunk_size", "chunk_data", "chunk_end",
    # "trailer", "close" or "opaque"
    left: int = 0  # body bytes still to come ("length", "chunk_data")
    line: bytearray = field(default_factory=bytearray)  # a chunk-size or trailer line so far
    newlines: int = 0  # the empty lines `pending` starts with
    after: str = "head"  # the state once this message ends: "head", or "opaque" for a tunnel

    @property
    def between_messages(self) -> bool:
        """Every byte fed so far belongs to a message that has ended."""
        return self.state == "head" and not self.pending

    def feed(self, data: bytes) -> list[_Piece]:
        """The pieces `data` completes, in order."""
        pieces: list[_Piece] = []
        data = bytes(data)
        while data:
            if self.state == "head":
                data = self._feed_head(data, pieces)
            elif self.state in ("opaque", "close"):
                pieces.append(_Piece("opaque" if self.state == "opaque" else "body", data))
                data = b""
            elif self.state in ("length", "chunk_data"):
                taken, data = data[: self.left], data[self.left :]
                self.left -= len(taken)
                pieces.append(_Piece("body", taken))
                if self.left == 0 and self.state == "length":
                    self._end_body(pieces)
                elif self.left == 0:
                    self._go("chunk_end")
            else:
                data = self._feed_line(data, pieces)
        return pieces

    def _go(self, state: str) -> None:
        self.state = state
        self.line.clear()

    def _end_body(self, pieces: list[_Piece]) -> None:
        pieces.append(_Piece("end"))
        self._go(self.after)

    def _feed_head(self, data: bytes, pieces: list[_Piece]) -> bytes:
        searched = max(0, len(self.pending) - 3)  # the head's end was not before this
        self.pending += data
        # Empty lines before a message are tolerated (RFC 9112 2.2); they stay in its head.
        leading = _LEADING_NEWLINES.match(self.pending, self.newlines)  # always matches
        first = self.newlines = leading.end() if leading else self.newlines
        end = _HEAD_END.search(self.pending, max(first, searched))
        if end is None:
            if len(self.pending) > _MAX_HEAD_BYTES:
                self._opaque(pieces)
            return b""
        raw, rest = bytes(self.pending[: end.end()]), bytes(self.pending[end.end() :])
        self.pending.clear()
        self.newlines = 0
        head = self._parse_head(raw[first : end.start()])
        if head is None:
            self.pending += raw + rest
            self._opaque(pieces)
            return b""
        pieces.append(_Piece("head", raw, head))
        self.after = "head"
        if head.method == b"CONNECT" and (not self.response or 200 <= head.status < 300):
            self.after = "opaque"
        if head.status == 101 or (not self.response and head.values(b"upgrade")):
            self.after = "opaque"
        if head.body == "none":
            self._end_body(pieces)
        else:
            self.left = head.length
            self._go({"length": "length", "chunked": "chunk_size", "close": "close"}[head.body])
            if head.body == "length" and head.length == 0:
                self._end_body(pieces)
        return rest

    def _opaque(self, pieces: list[_Piece]) -> None:
        pieces.append(_Piece("opaque", bytes(self.pending)))
        self.pending.clear()
        self._go("opaque")

    def _parse_head(self, text: bytes) -> _Head | None:
        lines = [line.removesuffix(b"\r") for line in text.split(b"\n")]
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _HEADER_NAME.fullmatch(name):
                return None  # no colon, space before it, obs-fold: not for us to guess
            headers.append((name, value.strip(b" \t")))
        head = _Head(lines[0], tuple(headers))
        body, length = "none", 0
        if codings := head.values(b"transfer-encoding"):
            last = b",".join(codings).split(b",")[-1].strip().lower()
            body = "chunked" if last == b"chunked" else "close"
        elif lengths := head.values(b"content-length"):
            # "5, 5" and two headers saying 5 are one length; anything else is not framable.
            given = {value.strip() for value in b",".join(lengths).split(b",")}
            if len(given) != 1 or not (text := given.pop()).isdigit():
                return None
            body, length = "length", int(text)
        if not self.response:
            request = _REQUEST_LINE.fullmatch(lines[0])
            if request is None or body == "close":
                return None
            head = _Head(head.start_line, head.headers, request[1], 0, body, length)
            self.requests.append(head)
            return head
        status_line = _STATUS_LINE.fullmatch(lines[0])
        if status_line is None:
            return None
        status = int(status_line[1])
        answered = self.requests.popleft() if status >= 200 and self.requests else None
        method = answered.method if answered is not None else b""
        no_body = status < 200 or status in (204, 304) or method == b"HEAD"
        if no_body or (method == b"CONNECT" and status < 300):
            body, length = "none", 0
        elif body == "none":
            body = "close"
        return _Head(head.start_line, head.headers, method, status, body, length, answered)

    def _feed_line(self, data: bytes, pieces: list[_Piece]) -> bytes:
        newline = data.find(b"\n")
        taken = data if newline == -1 else data[: newline + 1]
        pieces.append(_Piece("body", taken))
        self.line += taken
        if len(self.line) > _MAX_LINE_BYTES:
            self._go("opaque")
        elif newline != -1:
            line = bytes(self.line)
            self.line.clear()
            if self.state == "chunk_size":
                size = _CHUNK_SIZE.fullmatch(line)
                if size is None:
                    self._go("opaque")
                else:
                    self.left = int(size[1], 16)
                    self._go("chunk_data" if self.left else "trailer")
            elif self.state == "chunk_end":
                self._go("chunk_size" if line in (b"\r\n", b"\n") else "opaque")
            elif line in (b"\r\n", b"\n"):  # the empty line that ends the trailers
                self._end_body(pieces)
        return data[len(taken) :]


# --- end of HTTP/1 framing -------------------------------------------------------------------
