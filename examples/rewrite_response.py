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
    * anything after a CONNECT, a switch of protocols (101) or bytes that are not HTTP/1 (the
      rest of the connection; an `Upgrade` the server declines changes nothing), and a
      response the server cut short (sent as it came, at the server's FIN);
    * the responses from the one that answers the 33rd request waiting for its response on
      (or past 4 KiB of waiting request lines): which of them answers a HEAD is not known.
    HTTP/1.x in clear, and inside TLS that tproxy intercepts (a `tls = "intercept"` rule);
    other TLS is not claimed, and HTTP/2 is passed unchanged. Every session waits for its
    client's first bytes before it connects (a protocol whose server speaks first waits until
    the sniff timeout: 1 s without a policy). The replacement is on the body's bytes: a string split
    across the held body is found, whatever the chunks were.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tproxy.addons.api import Session
from tproxy.addons.http1 import Head, HTTP1Framer

sniff = True

REWRITE_FROM = os.environ.get("TPROXY_REWRITE_FROM", "hello").encode()
REWRITE_TO = os.environ.get("TPROXY_REWRITE_TO", "goodbye").encode()
HEADER = (b"X-Rewritten-By", b"tproxy")
MAX_BODY_BYTES = 1 << 20


def session_start(session: Session) -> None:
    # HTTP in clear, or TLS that a `tls = "intercept"` rule decrypts (the hooks see plaintext).
    if session.tls is not None or (session.sniffed is not None and session.sniffed.proto == "http"):
        session.claim()
        client = HTTP1Framer(response=False)
        server = HTTP1Framer(response=True, connection=client.connection)
        session.state["rewrite"] = _Rewrite(client, server)


def client_data(session: Session, data: bytes) -> bytes:
    rewrite: _Rewrite = session.state["rewrite"]
    rewrite.client.feed(data)  # it records the requests: a response to HEAD has no body
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
    client: HTTP1Framer
    server: HTTP1Framer
    held_head: Head | None = None  # the response being held back, and its bytes so far
    held: bytearray = field(default_factory=bytearray)


def _is_rewritable(head: Head) -> bool:
    encodings = [v.strip().lower() for v in b",".join(head.values(b"content-encoding")).split(b",")]
    identity = all(coding in (b"", b"identity") for coding in encodings)
    return (
        head.status >= 200 and head.body == "length" and head.length <= MAX_BODY_BYTES and identity
    )


def _rewritten(head: Head, raw: bytes) -> bytes:
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
