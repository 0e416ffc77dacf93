"""Block uploads that contain a marker string: the client gets 403, the server never the marker.

Run it::

    tproxy run --addon examples/block_uploads.py
    TPROXY_BLOCK_MARKER="CONFIDENTIAL" tproxy run --addon examples/block_uploads.py

It says `sniff = True` and claims the sessions whose first bytes are an HTTP/1 request (on any
port). Everything their client sends streams through to the server, except that while a
request is not complete the last few bytes that could be the start of the marker (at most
len(marker) - 1) are held back until the next chunk shows whether the marker follows: so a
marker split across chunks is caught, whatever the chunks, and nothing is held once a request
is complete (a request that ends with "TOP-SEC" is not stalled). When the marker is seen, the
client gets `403 Forbidden` with `Connection: close`, the chunk that holds it is dropped, and the
session is closed (the server gets a FIN, and no byte of the marker's chunk).

The marker is looked for in all the bytes the client sends (request lines, headers and bodies
as they are on the wire), not in decoded bodies: a marker in a URL is blocked too, and no
disagreement between this addon's idea of where a body starts and the server's can let one
through. The HTTP/1 framer (Content-Length and chunked bodies) only tells when a request is
complete.

Environment:
    TPROXY_BLOCK_MARKER: the marker (UTF-8, not empty), default "TOP-SECRET"; matched byte for
        byte (case matters).

Limits:
    * The bytes of the blocked request before its marker's chunk have reached the server (the
      body streams): the server sees an upload cut short, then the FIN.
    * A marker that is encoded (compressed, base64, split by a chunked body's framing into two
      chunks of the transfer coding, percent-encoded) is not found: this shows the hooks, it
      is not a data-loss-prevention product. HTTP/1.x in clear only (TLS is not claimed).
    * The 403 is queued after whatever the server's responses already queued for the client:
      if a response is still on its way (pipelining), the client sees it cut short.
    * Every session waits for its client's first bytes before it connects (a protocol whose
      server speaks first waits until the sniff timeout: 1 s without a policy).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import deque
from dataclasses import dataclass, field

from tproxy.addons.api import Session

sniff = True

MARKER = os.environ.get("TPROXY_BLOCK_MARKER", "TOP-SECRET").encode()
if not MARKER:
    raise ValueError("TPROXY_BLOCK_MARKER must not be empty")

_EXPLANATION = b"blocked by tproxy: the upload contains a forbidden marker\n"
FORBIDDEN = (
    b"HTTP/1.1 403 Forbidden\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(_EXPLANATION)).encode() + b"\r\n"
    b"Connection: close\r\n"
    b"\r\n" + _EXPLANATION
)


def session_start(session: Session) -> None:
    if session.sniffed is not None and session.sniffed.proto == "http":
        session.claim()
        session.state["block"] = _Scan(_HTTP1Framer(response=False, requests=deque(maxlen=1)))


def client_data(session: Session, data: bytes) -> bytes:
    scan: _Scan = session.state["block"]
    if scan.blocked:
        return b""
    window = scan.held + bytes(data)
    if MARKER in scan.sent_tail + window:
        scan.blocked = True
        scan.held = b""
        # RuntimeError: the client's side is shut already (the server's FIN went on): nothing
        # can reach it any more.
        with contextlib.suppress(RuntimeError):
            session.send_to_client(FORBIDDEN)
        session.close()
        return b""
    scan.framer.feed(data)
    keep = 0 if scan.framer.between_messages else _marker_start_at_end(window)
    out, scan.held = window[: len(window) - keep], window[len(window) - keep :]
    scan.sent_tail = (scan.sent_tail + out)[-(len(MARKER) - 1) :] if len(MARKER) > 1 else b""
    return out


def client_eof(session: Session) -> bytes:
    """The client is done: what was held back cannot be the start of a marker any more."""
    scan: _Scan = session.state["block"]
    held, scan.held = (b"" if scan.blocked else scan.held), b""
    return held


@dataclass
class _Scan:
    framer: _HTTP1Framer
    held: bytes = b""  # not sent yet: it could be the start of the marker
    sent_tail: bytes = b""  # the last len(MARKER) - 1 bytes sent, for a marker across both
    blocked: bool = False


def _marker_start_at_end(window: bytes) -> int:
    """The length of the longest end of `window` that is a start of the marker (shorter than
    the marker: a whole one was looked for already)."""
    for length in range(min(len(MARKER) - 1, len(window)), 0, -1):
        if window.endswith(MARKER[:length]):
            return length
    return 0


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
