"""Sniffing as the bytes pass: what a session is, read from its first bytes without delaying them.

When no rule needs facts before the upstream connect, a session connects at once and relays as
always; its first bytes pass through Python anyway (each direction copies its first 64 KiB
before splicing), and `FirstBytes` looks at them on the way: the client's bytes, accumulated up
to `MAX_SNIFF_BYTES`, go to `classify` until it answers; the first bytes from the upstream, if
they come before any from the client, make the session `silent` (a server-first protocol, or a
client that waits). Pure: the relay calls it, it keeps no socket.
"""

from __future__ import annotations

from tproxy.sniffers.classify import SILENT, UNKNOWN, Sniffed, classify
from tproxy.sniffers.facts import MAX_SNIFF_BYTES, NeedMore

# The first reads are each classified as they come (a ClientHello in one or two segments is
# decided at once); after that, only when the bytes held have grown by half since the last try.
# The sniffers re-parse from the start, so a client that dribbles its first message a byte at a
# time would otherwise cost a parse of up to 16 KiB per byte; this way the whole costs a few.
_EAGER_READS = 4
# A session that waits for its facts (`eager`) classifies on every read -- the decision must
# come as soon as the bytes are there -- until it has re-parsed this many bytes in all; then it
# backs off as above. A normal client's first message comes in one to a few reads, and even a
# 500-byte ClientHello sent one byte per segment stays within it (about 130 KB parsed); a client
# dribbling a 16 KiB hello of 1-byte TLS records (each parse walks every record) would
# otherwise cost the worker about 0.7 ms of CPU per byte it sends.
_EAGER_PARSE_BUDGET = 256 * 1024


class FirstBytes:
    """Watches one session's first bytes; `result` once decided, `final()` at the end."""

    __slots__ = ("_buffer", "_eager", "_next_try", "_parsed", "_reads", "result")

    def __init__(self, *, eager: bool = False) -> None:
        """`eager`: classify on every read, within `_EAGER_PARSE_BUDGET` (a session waiting for
        its facts: the answer must come as soon as the bytes are there)."""
        # The client's bytes so far: the first read as it came, a bytearray once more come (each
        # later read appends in place: no copy of everything held per read).
        self._buffer: bytes | bytearray = b""
        self._eager = eager
        self._reads = 0
        self._parsed = 0
        self._next_try = 0
        self.result: Sniffed | None = None

    def client_sent(self, data: bytes) -> bool:
        """The client sent `data` (next in its stream); True while more of it is wanted."""
        if self.result is not None:
            return False
        buffer = self._buffer
        if not buffer:
            buffer = data
        elif isinstance(buffer, bytearray):
            buffer += data
        else:
            buffer = bytearray(buffer)
            buffer += data
        self._buffer = buffer
        held = len(buffer)
        self._reads += 1
        spent = self._parsed > _EAGER_PARSE_BUDGET if self._eager else self._reads > _EAGER_READS
        if spent and held < min(self._next_try, MAX_SNIFF_BYTES):
            return True  # not worth a parse yet; the upstream's answer or the end is
        self._parsed += held
        if self._try(buffer):
            return False
        if held >= MAX_SNIFF_BYTES:  # a sniffer never needs more than this
            self._finish(UNKNOWN)
            return False
        self._next_try = held + held // 2
        return True

    def passed(self, from_client: bool, data: bytes) -> bool:
        """`data` passed on its way (the relays call this with each chunk until it returns
        False): the client's bytes go to `client_sent`, the upstream's first to
        `upstream_sent`. True while more of the client's are wanted. A sniffer's bug ends the
        sniffing, never the session."""
        try:
            if from_client:
                return self.client_sent(data)
            self.upstream_sent()
        except Exception:
            self.cannot_see()
        return False

    def upstream_sent(self) -> None:
        """The upstream's first bytes arrived: before any of the client's, the session is
        `silent`; otherwise the client's bytes so far get one more look (the upstream answered
        them: the client's first message is likely all there)."""
        if self.result is None:
            if not self._buffer:
                self._finish(SILENT)
            else:
                self._try(self._buffer)

    def _try(self, buffer: bytes | bytearray) -> bool:
        """Classify `buffer`; True (and decided) unless it needs more. A sniffer's bug (they are
        fuzzed never to raise) ends the sniffing as `unknown`, never the session or its close."""
        try:
            answer = classify(bytes(buffer[:MAX_SNIFF_BYTES]))  # (bytes of bytes: no copy)
        except Exception:
            self._finish(UNKNOWN)
            return True
        if isinstance(answer, NeedMore):
            return False
        self._finish(answer)
        return True

    def cannot_see(self) -> None:
        """The client's bytes now pass where they cannot be read (spliced): decide with what
        was seen."""
        if self.result is None:
            self._finish(UNKNOWN if self._buffer else SILENT)

    def final(self) -> Sniffed:
        """What the session was, at its end: undecided with some client bytes is `unknown`
        (they never completed a first message), with none `silent`."""
        if self.result is None and not (self._buffer and self._try(self._buffer)):
            self._finish(UNKNOWN if self._buffer else SILENT)
        assert self.result is not None
        return self.result

    def _finish(self, result: Sniffed) -> None:
        self.result = result
        self._buffer = b""
