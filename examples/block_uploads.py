"""Block uploads that contain a marker string: the client gets 403, the server never the marker.

Run it::

    tproxy run --addon examples/block_uploads.py
    TPROXY_BLOCK_MARKER="CONFIDENTIAL" tproxy run --addon examples/block_uploads.py

It says `sniff = True` and claims every session whose first bytes are not TLS or SSH (on any
port), and TLS that tproxy intercepts (its plaintext): HTTP/1 requests, and also what was
sniffed `unknown` or `silent`, which is what an HTTP client slower than the sniff timeout looks
like (the scan works on the raw bytes, so it needs no sniffed facts; encrypted bytes would not
show a marker). Everything their client sends streams through to the server, except that while
an HTTP/1 request is not complete the last few bytes that could be the start of the marker (at
most len(marker) - 1) are held back until the next chunk shows whether the marker follows: so a
marker split across a request's chunks is caught before any of it leaves, whatever the chunks,
and nothing is held once a request is complete (a request that ends with "TOP-SEC" is not
stalled). Outside a request (between requests, bytes that are not HTTP/1, after an upgrade)
nothing is held, as the client may be waiting for an answer: a marker split across chunks there
is still caught before its last byte leaves, but its first bytes have gone. When the marker is
seen, the client gets `403 Forbidden` with `Connection: close`, the chunk that holds it is
dropped, and the session is closed (the server gets a FIN, and no byte of the marker's chunk).

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
      is not a data-loss-prevention product. HTTP/1.x in clear, and inside TLS that tproxy
      intercepts (a `tls = "intercept"` rule); other TLS is not claimed.
    * The 403 is queued after whatever the server's responses already queued for the client:
      if a response is still on its way (pipelining), the client sees it cut short.
    * Every session waits for its client's first bytes before it connects (a protocol whose
      server speaks first waits until the sniff timeout: 1 s without a policy), and every
      session but TLS and SSH runs through this addon's Python, chunk by chunk, instead of
      the zero-copy path.
    * A client whose first bytes look like TLS or SSH is not scanned, whatever it sends next.
    * An unfinished head holds back the start of a marker at the end of a chunk as long as
      nothing in it shows it is not HTTP/1 (a byte no head holds, a first line that is not a
      request line): a text protocol that sends a line without its newline and waits for an
      answer can stall, when that line ends like the marker starts.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from tproxy.addons.api import Session
from tproxy.addons.http1 import HTTP1Framer

sniff = True

MARKER = os.environ.get("TPROXY_BLOCK_MARKER", "TOP-SECRET").encode()
if not MARKER:
    raise ValueError("TPROXY_BLOCK_MARKER must not be empty")

ENCRYPTED = ("tls", "ssh")  # what is not claimed: a marker would not show in its bytes

_EXPLANATION = b"blocked by tproxy: the upload contains a forbidden marker\n"
FORBIDDEN = (
    b"HTTP/1.1 403 Forbidden\r\n"
    b"Content-Type: text/plain\r\n"
    b"Content-Length: " + str(len(_EXPLANATION)).encode() + b"\r\n"
    b"Connection: close\r\n"
    b"\r\n" + _EXPLANATION
)


def session_start(session: Session) -> None:
    # Not encrypted, or TLS that a `tls = "intercept"` rule decrypts (the hooks see plaintext).
    if session.tls is not None or session.sniffed is None or session.sniffed.proto not in ENCRYPTED:
        session.claim()
        session.state["block"] = _Scan(HTTP1Framer(response=False))


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
    keep = _marker_start_at_end(window) if scan.framer.inside_message else 0
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
    framer: HTTP1Framer
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
