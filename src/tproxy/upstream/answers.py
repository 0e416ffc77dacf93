"""What a proxy handshake answers after each read, and the interface the engine drives.

The handshakes are sans-IO (as h11 is): they never touch a socket. The engine connects to the
proxy, writes `start()`, then hands every chunk it reads to `receive()` and carries out the
answer, until `Established` (relay from then on) or `Refused` (close, log `detail`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from tproxy.sniffers.facts import NEED_MORE, NeedMore

__all__ = ["NEED_MORE", "Answer", "Established", "NeedMore", "ProxyHandshake", "Refused", "Send"]

MAX_DETAIL_CHARS = 200
"""The longest `Refused.detail`: one log line."""


@dataclass(frozen=True, slots=True)
class Send:
    """Write `data` to the proxy, then go on reading (SOCKS5's second and third message)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Established:
    """The tunnel is up. `leftover`: what the proxy sent after its reply, already the
    destination's first bytes (a server that speaks first), to be relayed to the client."""

    leftover: bytes = b""


@dataclass(frozen=True, slots=True)
class Refused:
    """No tunnel. `refused=True`: the proxy said no (a SOCKS5 reply code, rejected credentials,
    an HTTP status other than 2xx). `refused=False`: it broke the protocol (not a reply of the
    kind expected, lying lengths, a head too long). `detail` is one log line: printable ASCII,
    at most `MAX_DETAIL_CHARS` characters, with nothing the proxy sent in it unescaped."""

    detail: str
    refused: bool = True


Answer = Send | Established | Refused | NeedMore
"""What `ProxyHandshake.receive` returns; `NEED_MORE`: read more, nothing to send yet."""


class ProxyHandshake(Protocol):
    """One handshake with one proxy for one destination; used once, then dropped."""

    def start(self) -> bytes:
        """The first bytes to send once the TCP connection to the proxy is up."""
        ...

    def receive(self, data: bytes) -> Answer:
        """Take the next bytes read from the proxy; never raises, whatever they are.

        After `Established` or `Refused` the handshake is over: a further call answers
        `Refused(..., refused=False)` and the bytes are not looked at.
        """
        ...


HANDSHAKE_OVER = Refused("the handshake is already over", refused=False)
