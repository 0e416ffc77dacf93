"""One captured session's recording: what the relay shows it, encoded (`pcapng`) into its file
(`files`), within the session's byte limit.

The relay calls `relayed()` with every chunk it writes, in order, and `ended()` with each side's
FIN or reset as it saw them; the session calls `close()` at its end. The file starts with the
handshake the proxy never saw as packets (it accepted the connection), stamped with the time the
session was accepted. Past `capture_max_bytes` of payload (both directions together) the
recording writes what fits, a packet comment saying where it was cut, and stops: the session
goes on uncaptured. A write that fails (a full disk) or an encoder that refuses ends the
recording, never the session: `error` says why, for the session to log.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tproxy.capture.files import CaptureFile
from tproxy.capture.pcapng import TcpConversation


class Recorder:
    """Records one session into `file` (see the module docstring).

    Args:
        conversation: the packets' encoder, for the session's client and original destination.
        file: where they go (a `.part` until `close()`).
        max_bytes: payload bytes recorded at most.
        started_at: when the session was accepted (epoch seconds): the handshake's time.
        clock: epoch seconds now (the packets' times).
    """

    __slots__ = (
        "_clock", "_conversation", "_file", "_max_bytes", "_reset", "_stopped", "error",
        "recorded_bytes", "truncated_at",
    )  # fmt: skip

    def __init__(
        self,
        conversation: TcpConversation,
        file: CaptureFile,
        max_bytes: int,
        started_at: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._conversation = conversation
        self._file = file
        self._max_bytes = max_bytes
        self._clock = clock
        self._stopped = False
        self._reset = False
        self.recorded_bytes = 0
        self.truncated_at: int | None = None
        self.error: str | None = None
        self._write(lambda: conversation.file_header() + conversation.handshake(started_at))

    def _write(self, encode: Callable[[], bytes]) -> None:
        if self._stopped:
            return
        try:
            packets = encode()
        except ValueError as exc:  # the encoder refused (a bug of ours): stop, say why
            self._stop(f"encoder: {exc}")
            return
        if not self._file.write(packets):
            self._stop(self._file.error or "write failed")

    def _stop(self, error: str) -> None:
        self._stopped = True
        self.error = error

    @property
    def stopped(self) -> bool:
        """Recording no more: cut at `max_bytes`, or writing failed (`error`)."""
        return self._stopped

    def relayed(self, from_client: bool, data: bytes | memoryview) -> bool:
        """`data` was written to the other side; False once the recording has stopped (the
        relay then stops showing it bytes and may splice again)."""
        if self._stopped:
            return False
        room = self._max_bytes - self.recorded_bytes
        now = self._clock()
        conversation = self._conversation
        if len(data) <= room:
            self.recorded_bytes += len(data)
            self._write(lambda: conversation.data(from_client, data, now))
            return not self._stopped
        cut = self.recorded_bytes + room
        self.recorded_bytes = cut
        self.truncated_at = cut
        note = f"capture cut at {cut} bytes (capture_max_bytes): the session went on uncaptured"
        self._write(lambda: conversation.data(from_client, data[:room], now)
                    + conversation.comment(note, now))  # fmt: skip
        self._stopped = True
        return False

    def ended(self, from_client: bool, reset: bool) -> None:
        """One side sent its FIN, or reset."""
        if self._stopped or self._reset:
            return
        now = self._clock()
        conversation = self._conversation
        if reset:
            self._reset = True
            self._write(lambda: conversation.rst(from_client, now))
        else:
            self._write(lambda: conversation.fin(from_client, now))

    def abandon(self) -> None:
        """Give the file up (its `.part` removed): for when `close` itself failed."""
        self._stopped = True
        self._file.abandon()

    def close(self, cut: bool) -> str | None:
        """The session ended (`cut`: the proxy reset both sides -- a timeout, a drain -- where
        no side's reset was recorded: the client saw a reset from the server's address). The
        final path, or None when the recording failed."""
        if cut and not self._reset:
            self.ended(from_client=False, reset=True)
        if self.error is not None:
            self._file.abandon()
            return None
        path = self._file.finish()
        if path is None:
            self.error = self._file.error or "could not finish the file"
        return path
