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


class FirstBytes:
    """Watches one session's first bytes; `result` once decided, `final()` at the end."""

    __slots__ = ("_buffer", "result")

    def __init__(self) -> None:
        self._buffer = b""
        self.result: Sniffed | None = None

    def client_sent(self, data: bytes) -> bool:
        """The client sent `data` (next in its stream); True while more of it is wanted."""
        if self.result is not None:
            return False
        buffer = self._buffer + data if self._buffer else data
        answer = classify(buffer[:MAX_SNIFF_BYTES])
        if isinstance(answer, NeedMore):
            if len(buffer) >= MAX_SNIFF_BYTES:  # a sniffer never needs more than this
                self._finish(UNKNOWN)
                return False
            self._buffer = buffer
            return True
        self._finish(answer)
        return False

    def upstream_sent(self) -> None:
        """The upstream's first bytes arrived: before any of the client's, the session is
        `silent`; otherwise this changes nothing."""
        if self.result is None and not self._buffer:
            self._finish(SILENT)

    def cannot_see(self) -> None:
        """The client's bytes now pass where they cannot be read (spliced): decide with what
        was seen."""
        if self.result is None:
            self._finish(UNKNOWN if self._buffer else SILENT)

    def final(self) -> Sniffed:
        """What the session was, at its end: undecided with some client bytes is `unknown`
        (they never completed a first message), with none `silent`."""
        if self.result is None:
            self._finish(UNKNOWN if self._buffer else SILENT)
        assert self.result is not None
        return self.result

    def _finish(self, result: Sniffed) -> None:
        self.result = result
        self._buffer = b""
