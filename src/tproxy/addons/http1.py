"""A small HTTP/1.x framer for addons: one direction of a connection cut into message heads,
bodies and ends, from chunks cut anywhere (what a byte hook is given). Pure, no I/O; it never
raises on what it is fed (it is fuzzed with random bytes and with real messages cut at every
offset: tests/unit/test_examples.py).

    framer_up = HTTP1Framer(response=False)
    framer_down = HTTP1Framer(response=True, connection=framer_up.connection)
    for piece in framer_up.feed(chunk):  # in client_data
        if piece.kind == "head" and piece.head is not None:
            print(piece.head.start_line)

What it frames: Content-Length and chunked bodies (trailers included), responses without a body
(to HEAD, 1xx, 204, 304), bodies that end at the FIN, empty lines between messages. What it
cannot frame ends the framing: the rest of that direction is one "opaque" run. That is: bytes
that are not HTTP/1 (a byte no head may hold, a first line that is not a request or status
line), a head over 64 KiB, conflicting lengths, a CONNECT, and on both directions a switch of
protocols (a 101, a 2xx to a CONNECT). A request's `Upgrade` alone changes nothing: the server
may decline it, and the connection goes on in HTTP/1.1.

Pairing. The two framers of a connection share a `Connection`: the request side records what
the response side needs of each request (its method, for a HEAD's bodiless answer, and the
start of its request line, for a log), and the response side takes the oldest for each final
response. At most MAX_WAITING_REQUESTS requests, and MAX_WAITING_BYTES of what they keep, wait
per connection; a request past either bound is not recorded, and the response side stops
framing (opaque) once it reaches the responses it can no longer pair: a response is never
paired with another request.

Cost. A chunk is parsed in place, with offsets, never resliced per message or line: the work is
linear in the bytes fed, and a run of body bytes (chunk-size lines included) is one piece.
`Head`, `Piece` and `Request` are plain dataclasses, not frozen ones, whose construction costs
three times as much (`object.__setattr__` per field): a third of the cost of a small message.
Read them; do not change them.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

__all__ = ["Connection", "HTTP1Framer", "Head", "Piece", "Request"]


_MAX_HEAD_BYTES = 64 * 1024  # a head with its empty line, and the empty lines before it
_MAX_LINE_BYTES = 4 * 1024  # a chunk-size or trailer line, its newline included
MAX_WAITING_REQUESTS = 32
MAX_WAITING_BYTES = 4 * 1024  # the methods and request lines the waiting requests keep
KEPT_REQUEST_LINE_BYTES = 200  # what a waiting request keeps of its request line
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_LEADING_NEWLINES = re.compile(rb"[\r\n]*")
# What no head holds (RFC 9112 and 9110 5.5: field values are VCHAR, obs-text, SP and HTAB):
# a stream with one of these in a head is not HTTP/1, which is seen at once.
_NOT_IN_HEAD = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
# A whole head after its leading empty lines, up to its empty line, without such a byte.
_WHOLE_HEAD = re.compile(
    rb"[\r\n]*+([^\r\n\x00-\x08\x0b\x0c\x0e-\x1f\x7f][^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*?)\r?\n\r?\n"
)
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") [^\x00-\x20\x7f]+ HTTP/1\.[01]")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_HEADER_NAME = re.compile(_TOKEN)
_TOKEN_CHARS = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_STATUS_START = re.compile(rb"H(?:T(?:T(?:P(?:/(?:1(?:\.[01]?)?)?)?)?)?)?")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?\r?\n")
_EMPTY_LINES = (b"\r\n", b"\n")


@dataclass(slots=True)
class Request:
    """What a response needs of the request it answers: `method` (for a HEAD's answer, which
    has no body) and `start_line` (cut to its first KEPT_REQUEST_LINE_BYTES bytes, for a log).
    """

    method: bytes
    start_line: bytes


@dataclass
class Connection:
    """What the two framers of one connection share: the requests waiting for their
    responses, oldest first, and whether the connection stopped being HTTP/1."""

    waiting: deque[Request] = field(default_factory=deque)
    waiting_bytes: int = 0  # of the methods and start lines in `waiting`
    requests_lost: bool = False  # a request was not recorded: later responses cannot be paired
    switched: bool = False  # a 101 or a 2xx to a CONNECT: both directions are opaque after it

    def record(self, request: Request) -> None:
        """Add a request, unless one was lost already or it would pass a bound (then it is
        lost)."""
        size = len(request.method) + len(request.start_line)
        if (
            self.requests_lost
            or len(self.waiting) >= MAX_WAITING_REQUESTS
            or self.waiting_bytes + size > MAX_WAITING_BYTES
        ):
            self.requests_lost = True
            return
        self.waiting.append(request)
        self.waiting_bytes += size

    def answered(self) -> Request | None:
        """The oldest waiting request, removed; None when none is waiting."""
        if not self.waiting:
            return None
        request = self.waiting.popleft()
        self.waiting_bytes -= len(request.method) + len(request.start_line)
        return request


@dataclass(slots=True)
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
    request: Request | None = None

    def values(self, name: bytes) -> list[bytes]:
        """The values of header `name` (lower case), in order."""
        return [value for key, value in self.headers if key.lower() == name]


@dataclass(slots=True)
class Piece:
    """A run of one direction's bytes: "head" (a whole head, `head` parsed), "body" (body
    bytes, chunk framing included), "end" (no bytes: the message ended) or "opaque" (bytes
    after the framer stopped understanding: a tunnel, an upgrade, not HTTP/1)."""

    kind: str
    raw: bytes = b""
    head: Head | None = None


_END = Piece("end")


@dataclass
class HTTP1Framer:
    """Cuts one direction of an HTTP/1.x connection into heads, bodies and message ends, from
    chunks cut anywhere. Pure: bytes in, pieces out; `b"".join(raw of the pieces)` is what was
    fed, minus an unfinished head (`pending`), which is returned once it is whole. The heads
    and message ends do not depend on how the bytes were cut (how body and opaque bytes are
    cut into pieces does).

    A request framer records its requests in `connection`, which a response framer of the
    same connection shares: a response knows which request it answers (a response to HEAD has
    no body), and a 101 makes both directions opaque. Nothing it is fed makes it raise.
    """

    response: bool
    connection: Connection = field(default_factory=Connection)
    pending: bytearray = field(default_factory=bytearray)  # an unfinished head
    state: str = "head"  # "head", "length", "chunk_size", "chunk_data", "chunk_end",
    # "trailer", "close" or "opaque"
    left: int = 0  # body bytes still to come ("length", "chunk_data")
    line: bytearray = field(default_factory=bytearray)  # a chunk-size or trailer line so far
    after: str = "head"  # the state once this message ends: "head", or "opaque" for a tunnel
    # Of the unfinished head (offsets in `pending`): its leading empty lines, how far it was
    # looked at (for the head's end and for bytes no head holds), whether its first line was
    # whole and a start line.
    newlines: int = 0
    scanned: int = 0
    first_line_ok: bool = False

    @property
    def between_messages(self) -> bool:
        """Every byte fed so far belongs to a message that has ended."""
        return self.state == "head" and not self.pending

    @property
    def inside_message(self) -> bool:
        """The bytes fed so far end inside a message the framer understands (an unfinished
        head with nothing wrong in it so far, or a body): more of it is to come."""
        return self.state != "opaque" and not self.between_messages

    def feed(self, data: bytes) -> list[Piece]:
        """The pieces `data` completes, in order."""
        pieces: list[Piece] = []
        data = bytes(data)
        end = len(data)
        if end and (self.state == "opaque" or (self.connection.switched and not self.response)):
            self._opaque(data, 0, pieces)
            return pieces
        pos = 0
        run = -1  # where the body bytes not yet in a piece start
        while pos < end:
            state = self.state
            if state == "head":
                pos = self._feed_head(data, pos, pieces)
                continue
            if state == "opaque":
                break
            if run < 0:
                run = pos
            ended = False
            if state == "length":
                taken = min(self.left, end - pos)
                pos += taken
                self.left -= taken
                ended = not self.left
            elif state == "close":
                pos = end
            else:
                pos, ended = self._feed_chunks(data, pos)
            if ended or self.state == "opaque":
                if pos > run:
                    pieces.append(Piece("body", data[run:pos]))
                run = -1
                if ended:
                    pieces.append(_END)
                    self._go(self.after)
        if 0 <= run < pos:
            pieces.append(Piece("body", data[run:pos]))
        if pos < end:  # the framing stopped at `pos`
            self._opaque(data, pos, pieces)
        return pieces

    def _go(self, state: str) -> None:
        self.state = state
        self.line.clear()
        if state == "opaque" and not self.response:
            self.connection.requests_lost = True  # no request is recorded any more

    def _opaque(self, data: bytes, pos: int, pieces: list[Piece]) -> None:
        """The framing ends: what is pending and `data` from `pos` are one opaque run."""
        raw = bytes(self.pending) + data[pos:] if self.pending else data[pos:]
        self.pending.clear()
        self.newlines = self.scanned = 0
        self.first_line_ok = False
        self._go("opaque")
        if raw:
            pieces.append(Piece("opaque", raw))

    def _feed_head(self, data: bytes, pos: int, pieces: list[Piece]) -> int:
        """Look for the end of the head that starts at `pending` and goes on at `data[pos:]`;
        returns where in `data` the head ended (the end of `data` when it did not)."""
        if not self.pending:  # most often the whole head is in `data`: one match finds it
            whole = _WHOLE_HEAD.match(data, pos, pos + _MAX_HEAD_BYTES)
            if whole is not None:
                head = self._parse_head(whole[1])
                if head is None:
                    self._opaque(data, pos, pieces)
                    return len(data)
                pieces.append(Piece("head", data[pos : whole.end()], head))
                self._start_body(head, pieces)
                return whole.end()
        old = len(self.pending)
        buf: bytes | bytearray = data
        base = pos  # where the head starts in `buf`
        if old:  # at most _MAX_HEAD_BYTES of the head are ever looked at, so copied
            self.pending += data[pos : pos + _MAX_HEAD_BYTES - old]
            buf, base = self.pending, 0
        stop = min(len(buf), base + _MAX_HEAD_BYTES)
        # Empty lines before a message are tolerated (RFC 9112 2.2); they stay in its head.
        leading = _LEADING_NEWLINES.match(buf, base + self.newlines, stop)
        first = leading.end() if leading is not None else stop  # it always matches
        scanned = max(first, base + self.scanned)
        found = _HEAD_END.search(buf, max(first, scanned - 3), stop)
        if found is None:
            if stop - base < _MAX_HEAD_BYTES and self._may_be_head(buf, first, scanned, stop):
                if not old:
                    self.pending += data[pos:]
                self.newlines, self.scanned = first - base, stop - base
                return len(data)
            del self.pending[old:]
            self._opaque(data, pos, pieces)
            return len(data)
        bad = _NOT_IN_HEAD.search(buf, first, found.start())
        head = None if bad else self._parse_head(bytes(buf[first : found.start()]))
        if head is None:
            del self.pending[old:]
            self._opaque(data, pos, pieces)
            return len(data)
        pieces.append(Piece("head", bytes(buf[base : found.end()]), head))
        self.pending.clear()
        self.newlines = self.scanned = 0
        self.first_line_ok = False
        self._start_body(head, pieces)
        return pos + found.end() - base - old

    def _may_be_head(self, buf: bytes | bytearray, first: int, scanned: int, stop: int) -> bool:
        """Whether `buf[first:stop]`, looked at up to `scanned` before, may be the start of a
        head: no byte that no head holds, and a first line that is a start line (when whole)
        or may start one. Notes when the first line is whole and right."""
        if _NOT_IN_HEAD.search(buf, scanned, stop):
            return False
        if self.first_line_ok:
            return True
        newline = buf.find(b"\n", scanned, stop)
        if newline == -1:
            return self._may_start(buf, first, stop)
        self.first_line_ok = self._is_start_line(buf[first:newline])
        return self.first_line_ok

    def _may_start(self, buf: bytes | bytearray, first: int, stop: int) -> bool:
        """Whether `buf[first:stop]`, a first line without its end, can start a start line: a
        method and a space, or "HTTP/1.x". Only its first bytes are looked at (a method of
        more than 32 is not refused here), so a stream fed a byte at a time costs no more."""
        if first == stop:
            return True
        if self.response:
            return _STATUS_START.fullmatch(buf, first, min(stop, first + 8)) is not None
        window = min(stop, first + 32)
        method = _TOKEN_CHARS.match(buf, first, window)
        after = method.end() if method is not None else first  # it always matches
        return after == window or (after > first and buf[after] == 0x20)

    def _is_start_line(self, line: bytes | bytearray) -> bool:
        line = line[:-1] if line.endswith(b"\r") else line
        return (_STATUS_LINE if self.response else _REQUEST_LINE).fullmatch(line) is not None

    def _parse_head(self, text: bytes) -> Head | None:
        """The head `text` (without its empty line, nor a byte no head holds) parsed; None
        when it is not one."""
        lines = text.split(b"\n")
        start_line = lines[0].removesuffix(b"\r")
        headers = []
        codings: list[bytes] = []
        lengths: list[bytes] = []
        for line in lines[1:]:
            name, colon, value = line.removesuffix(b"\r").partition(b":")
            if not colon or not _HEADER_NAME.fullmatch(name):
                return None  # no colon, space before it, obs-fold: not for us to guess
            value = value.strip(b" \t")
            headers.append((name, value))
            lower = name.lower()
            if lower == b"transfer-encoding":
                codings.append(value)
            elif lower == b"content-length":
                lengths.append(value)
        body, length = "none", 0
        if codings:
            last = b",".join(codings).split(b",")[-1].strip().lower()
            body = "chunked" if last == b"chunked" else "close"
        elif lengths:
            # "5, 5" and two headers saying 5 are one length; anything else is not framable.
            given = {value.strip() for value in b",".join(lengths).split(b",")}
            if len(given) != 1 or not (digits := given.pop()).isdigit():
                return None
            body, length = "length", int(digits)
        if not self.response:
            request_line = _REQUEST_LINE.fullmatch(start_line)
            if request_line is None or body == "close":
                return None
            method = request_line[1]
            kept = start_line[:KEPT_REQUEST_LINE_BYTES]
            self.connection.record(Request(method[:KEPT_REQUEST_LINE_BYTES], kept))
            return Head(start_line, tuple(headers), method, 0, body, length)
        status_line = _STATUS_LINE.fullmatch(start_line)
        if status_line is None:
            return None
        status = int(status_line[1])
        answered = None
        if status >= 200 or status == 101:  # a final status: it answers the oldest request
            answered = self.connection.answered()
            if answered is None and self.connection.requests_lost:
                return None  # it answers a request that was not recorded: stop, not mispair
        method = answered.method if answered is not None else b""
        no_body = status < 200 or status in (204, 304) or method == b"HEAD"
        if no_body or (method == b"CONNECT" and status < 300):
            body, length = "none", 0
        elif body == "none":
            body = "close"
        return Head(start_line, tuple(headers), method, status, body, length, answered)

    def _start_body(self, head: Head, pieces: list[Piece]) -> None:
        self.after = "head"
        if not self.response and head.method == b"CONNECT":
            self.after = "opaque"  # the tunnel's bytes may follow before the answer
        elif self.response and (
            head.status == 101 or (head.method == b"CONNECT" and 200 <= head.status < 300)
        ):
            self.after = "opaque"
            self.connection.switched = True  # the request side stops too
        if head.body == "none" or (head.body == "length" and not head.length):
            pieces.append(_END)
            self._go(self.after)
        else:
            self.left = head.length
            self._go({"length": "length", "chunked": "chunk_size", "close": "close"}[head.body])

    def _feed_chunks(self, data: bytes, pos: int) -> tuple[int, bool]:
        """Take a chunked body's bytes from `data[pos:]`, up to its end or the end of `data`;
        returns where that is and whether the message ended. On a wrong line, the state is
        "opaque" and where the line starts is returned."""
        end = len(data)
        while pos < end:
            state = self.state
            if state == "chunk_data":
                taken = min(self.left, end - pos)
                pos += taken
                self.left -= taken
                if self.left:
                    break
                self.state = "chunk_end"
                continue
            if not self.line:  # most often the whole line is in `data`: no copy
                if state == "chunk_size":
                    size = _CHUNK_SIZE.match(data, pos, pos + _MAX_LINE_BYTES)
                    if size is not None:
                        self.left = int(size[1], 16)
                        self.state = "chunk_data" if self.left else "trailer"
                        pos = size.end()
                        continue
                elif state == "chunk_end" and data.startswith(b"\r\n", pos):
                    self.state = "chunk_size"
                    pos += 2
                    continue
            pos, ended = self._feed_line(data, pos)
            if ended or self.state == "opaque":
                return pos, ended
        return pos, False

    def _feed_line(self, data: bytes, pos: int) -> tuple[int, bool]:
        """Take a chunk-size line, the end of a chunk's data or a trailer line from
        `data[pos:]`, or what `data` holds of it; returns where that ended in `data` and
        whether the message ended. On a wrong line, the state is "opaque" and `pos` is
        returned."""
        state = self.state
        room = _MAX_LINE_BYTES - len(self.line)
        limit = min(len(data), pos + room)
        newline = data.find(b"\n", pos, limit)
        if newline == -1:
            if limit - pos >= room:
                self._go("opaque")  # a line too long
                return pos, False
            self.line += data[pos:]
            return len(data), False
        taken = newline + 1
        self.line += data[pos:taken]
        line = bytes(self.line)
        self.line.clear()
        if state == "chunk_size":
            size = _CHUNK_SIZE.fullmatch(line)
            if size is None:
                self._go("opaque")
                return pos, False
            self.left = int(size[1], 16)
            self._go("chunk_data" if self.left else "trailer")
        elif state == "chunk_end":
            if line not in _EMPTY_LINES:
                self._go("opaque")
                return pos, False
            self._go("chunk_size")
        elif line in _EMPTY_LINES:  # the empty line that ends the trailers
            return taken, True
        return taken, False
