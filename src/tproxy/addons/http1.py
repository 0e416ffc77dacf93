"""A small HTTP/1.x framer for addons: one direction of a connection cut into message heads,
bodies and ends, from chunks cut anywhere (what a byte hook is given). Pure, no I/O; it never
raises on what it is fed (it is fuzzed with random bytes and with real messages cut at every
offset: tests/unit/test_examples.py).

    framer_up = HTTP1Framer(response=False)
    framer_down = HTTP1Framer(response=True, requests=framer_up.requests)
    for piece in framer_up.feed(chunk):  # in client_data
        if piece.kind == "head" and piece.head is not None:
            print(piece.head.start_line)

What it frames: Content-Length and chunked bodies (trailers included), responses without a body
(to HEAD, 1xx, 204, 304), bodies that end at the FIN, empty lines between messages. What it
cannot frame (not HTTP/1, a head over 64 KiB, conflicting lengths, a CONNECT or an upgrade)
ends the framing: the rest of that direction is one "opaque" run. `examples/http_log.py`,
`rewrite_response.py` and `block_uploads.py` use it.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

__all__ = ["HTTP1Framer", "Head", "Piece"]


_MAX_HEAD_BYTES = 64 * 1024
_MAX_LINE_BYTES = 4 * 1024  # a chunk-size or trailer line
MAX_WAITING_REQUESTS = 128
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LEADING_NEWLINES = re.compile(rb"[\r\n]*")
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") [^\x00-\x20\x7f]+ HTTP/1\.[01]")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_HEADER_NAME = re.compile(_TOKEN)
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?\n")


@dataclass(frozen=True, slots=True)
class Head:
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
    request: Head | None = None

    def values(self, name: bytes) -> list[bytes]:
        """The values of header `name` (lower case), in order."""
        return [value for key, value in self.headers if key.lower() == name]


@dataclass(frozen=True, slots=True)
class Piece:
    """A run of one direction's bytes: "head" (a whole head, `head` parsed), "body" (body
    bytes, chunk framing included), "end" (no bytes: the message ended) or "opaque" (bytes
    after the framer stopped understanding: a tunnel, an upgrade, not HTTP/1)."""

    kind: str
    raw: bytes = b""
    head: Head | None = None


@dataclass
class HTTP1Framer:
    """Cuts one direction of an HTTP/1.x connection into heads, bodies and message ends, from
    chunks cut anywhere. Pure: bytes in, pieces out; `b"".join(raw of the pieces)` is what was
    fed, minus an unfinished head (`pending`), which is returned once it is whole.

    A request's head goes to `requests` (shared with the response side's framer), so a
    response knows which request it answers: a response to HEAD has no body. What it cannot
    frame (not HTTP/1, a head over 64 KiB, conflicting lengths, a CONNECT or upgrade) ends the
    framing: the rest of the direction is one "opaque" run. Nothing it is fed makes it raise.
    """

    response: bool
    requests: deque[Head] = field(default_factory=lambda: deque(maxlen=MAX_WAITING_REQUESTS))
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

    def feed(self, data: bytes) -> list[Piece]:
        """The pieces `data` completes, in order."""
        pieces: list[Piece] = []
        data = bytes(data)
        while data:
            if self.state == "head":
                data = self._feed_head(data, pieces)
            elif self.state in ("opaque", "close"):
                pieces.append(Piece("opaque" if self.state == "opaque" else "body", data))
                data = b""
            elif self.state in ("length", "chunk_data"):
                taken, data = data[: self.left], data[self.left :]
                self.left -= len(taken)
                pieces.append(Piece("body", taken))
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

    def _end_body(self, pieces: list[Piece]) -> None:
        pieces.append(Piece("end"))
        self._go(self.after)

    def _feed_head(self, data: bytes, pieces: list[Piece]) -> bytes:
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
        pieces.append(Piece("head", raw, head))
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

    def _opaque(self, pieces: list[Piece]) -> None:
        pieces.append(Piece("opaque", bytes(self.pending)))
        self.pending.clear()
        self._go("opaque")

    def _parse_head(self, text: bytes) -> Head | None:
        lines = [line.removesuffix(b"\r") for line in text.split(b"\n")]
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _HEADER_NAME.fullmatch(name):
                return None  # no colon, space before it, obs-fold: not for us to guess
            headers.append((name, value.strip(b" \t")))
        head = Head(lines[0], tuple(headers))
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
            head = Head(head.start_line, head.headers, request[1], 0, body, length)
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
        return Head(head.start_line, head.headers, method, status, body, length, answered)

    def _feed_line(self, data: bytes, pieces: list[Piece]) -> bytes:
        newline = data.find(b"\n")
        taken = data if newline == -1 else data[: newline + 1]
        pieces.append(Piece("body", taken))
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
