"""The client side of an HTTP/1.1 CONNECT tunnel (RFC 9110 9.3.6), with Basic proxy credentials.

Theory of operation. We send one request head and read one response head:

    CONNECT 198.18.2.2:443 HTTP/1.1        (IPv6 in brackets: [2001:db8::2]:443)
    Host: 198.18.2.2:443
    Proxy-Authorization: Basic dXNlcjpwYXNz     (only with credentials, RFC 7617, UTF-8)

    HTTP/1.1 200 Connection established
    ...headers...
                                               <- the head ends here; what follows is the
                                                  destination's (Established.leftover)

Any 2xx status means the tunnel is up; anything else is a refusal, logged as
"HTTP <code> <reason>". A 2xx reply to CONNECT has no body whatever its headers say (RFC 9110
9.3.6), so the head's end is the tunnel's start. Interim 1xx responses (100, 102, 103) are
skipped, as RFC 9110 15.2 asks of a client; 101 is not interim here (a tunnel is not an
upgrade) and refuses.

Why httptools (llhttp) and a head-end search of our own: llhttp checks the status line and the
header syntax strictly (RFC 9112), which a hand-written parser would have to re-implement, but
it cannot tell where a CONNECT response ends (it would read a body until EOF, and does not
report offsets). So the head is found here (the first CRLF CRLF, within `MAX_HEAD_BYTES` of the
start of the reply) and only that head is given to a fresh llhttp parser. Bytes that cannot
begin "HTTP/", and a head llhttp rejects before it is complete, refuse at once, without waiting
for a head that will never end. llhttp's strictness has a price: a 2xx head with both
Content-Length and Transfer-Encoding (meaningless on a CONNECT reply, RFC 9110 9.3.6) is a
protocol error here; no proxy we know sends one. Each call parses the head so far with a fresh
parser, as the HTTP sniffer does: no parser state between calls, at the price of a reparse per
read (a head is at most 16 KiB and normally arrives in one).
"""

from __future__ import annotations

import base64
from typing import Final

import httptools

from tproxy.sniffers.printable import to_printable
from tproxy.upstream.answers import HANDSHAKE_OVER, NEED_MORE, Answer, Established, Refused
from tproxy.upstream.destination import Destination

MAX_HEAD_BYTES: Final = 16 * 1024
"""The longest reply head (interim 1xx heads included): anything longer is not a proxy's."""
MAX_REASON_CHARS: Final = 120
_HEAD_END: Final = b"\r\n\r\n"
_PREFIX: Final = b"HTTP/"


class _Status:
    """llhttp callbacks: the status line's reason phrase, and whether the head was complete."""

    __slots__ = ("complete", "reason")

    def __init__(self) -> None:
        self.reason = b""
        self.complete = False

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_headers_complete(self) -> None:
        self.complete = True


class HTTPConnectHandshake:
    """One CONNECT request to `destination`, with Basic credentials if given.

    Raises:
        ValueError: the username is empty or contains a colon (Basic cannot carry it:
            RFC 7617 section 2).
    """

    __slots__ = ("_buffer", "_consumed", "_over", "_request")

    def __init__(
        self, destination: Destination, username: str | None = None, password: str | None = None
    ) -> None:
        authority = destination.authority
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if username is not None:
            if not username or ":" in username:
                raise ValueError("an HTTP proxy username must be non-empty and without ':'")
            token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
            lines.append(f"Proxy-Authorization: Basic {token}")
        self._request = ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")
        self._buffer = b""  # the reply from the start of the current head
        self._consumed = 0  # bytes of interim heads already skipped
        self._over = False

    def start(self) -> bytes:
        """The CONNECT request head."""
        return self._request

    def receive(self, data: bytes) -> Answer:
        """The next bytes from the proxy; see the module docstring."""
        if self._over:
            return HANDSHAKE_OVER
        self._buffer += data
        while True:
            answer = self._head()
            if answer is not None:
                break
        if answer is not NEED_MORE:
            self._over = True
            self._buffer = b""
        return answer

    def _head(self) -> Answer | None:
        """Answer for the head at the start of the buffer; None: it was interim, go on."""
        buffer = self._buffer
        if not _PREFIX.startswith(buffer[: len(_PREFIX)]):
            return Refused("not an HTTP response", refused=False)
        room = MAX_HEAD_BYTES - self._consumed
        end = buffer.find(_HEAD_END, 0, room)
        if end != -1:
            end += len(_HEAD_END)
        # An incomplete head is parsed too: llhttp stops at the first byte no response can
        # have (a bare LF, a bad header token), so nonsense refuses now, not at 16 KiB.
        status = _Status()
        parser = httptools.HttpResponseParser(status)
        try:
            parser.feed_data(buffer[:end] if end != -1 else buffer[:room])
        except httptools.HttpParserError as error:
            # llhttp also "fails" after a complete head it will not read past (a 101, or an
            # Upgrade header): the head is all we wanted, so only an error before its end counts.
            if not status.complete:
                detail = to_printable(str(error).encode(errors="replace"), 80)
                return Refused(f"not an HTTP response: {detail}", refused=False)
        if end == -1:
            if len(buffer) >= room:
                return Refused("reply header too long", refused=False)
            return NEED_MORE
        if not status.complete:  # cannot happen after CRLF CRLF, but never trust a parser
            return Refused("not an HTTP response", refused=False)
        code = parser.get_status_code()
        if 200 <= code < 300:
            return Established(buffer[end:])
        if 100 <= code < 200 and code != 101:
            self._buffer = buffer[end:]
            self._consumed += end
            return None
        reason = to_printable(status.reason, MAX_REASON_CHARS)
        return Refused(f"HTTP {code} {reason}" if reason else f"HTTP {code}")
