"""Sniff the head of a client's first HTTP/1.0 or 1.1 request: method, Host and target.

Theory of operation. Each call parses everything the client has sent so far with a fresh
httptools (llhttp) request parser: a parser costs about 0.3 µs to make and curl's head about
1.5 µs to parse (about 4 µs for the whole call, most of the rest building the answer), so keeping
one per session would save little and would make the sniffer stateful. The price is a reparse
per call: a head trickled one byte per call costs O(n²), about 70 ms for 16 KiB.
llhttp is strict (RFC 9112): it fails on the first byte that cannot continue a request — a method
it does not know, a bad request line, a bad header token — which gives the early answers the
engine needs: `NotThis` as soon as the bytes cannot be HTTP/1, `NEED_MORE` only while they still
can. The head ends at the empty line after the headers; the body, if any, is never needed:
whatever follows the first head is ignored, and an error in it (a bad chunk size, a malformed
pipelined request) does not undo the facts.

Decisions, each one a `NotThis` with its reason:
* HTTP/2's prior-knowledge preface (`PRI * HTTP/2.0`, RFC 9113 3.4) is not an HTTP/1 request:
  it carries no Host (the authority comes later, HPACK-encoded), and `PRI` is registered only for
  that preface, so it is answered as soon as the method reads `PRI` (after any empty lines).
* Versions other than 1.0 and 1.1 (llhttp also parses 0.9 and 2.0 request lines).
* More than one Host header: RFC 9112 3.2 has servers reject such a request (400), and the
  servers that accept it disagree about which one counts, so no name is claimed.
* Lines ended by a bare LF: llhttp rejects them (RFC 9112 2.2 only allows accepting them), and
  real clients send CRLF.
* A head not complete within `MAX_SNIFF_BYTES`: "too large".
"""

from __future__ import annotations

from typing import Final

import httptools

from tproxy.sniffers.facts import MAX_SNIFF_BYTES, NEED_MORE, HttpRequest, NeedMore, NotThis
from tproxy.sniffers.printable import to_printable

MAX_HOST_CHARS: Final = 255
MAX_PATH_CHARS: Final = 2048

# What a request may start with: the first letter of a method llhttp knows, or the empty lines
# RFC 9112 2.2 lets a server skip before the request line. Anything else (a TLS record's 0x16, a
# NUL, a lower-case letter) is answered without building a parser.
_FIRST_BYTES: Final = frozenset(b"ABCDGHLMNOPQRSTU\r\n")
_H2_PREFACE_METHOD: Final = b"PRI"


class _Head:
    """The parser's callbacks: collect the first head's target, Host headers, method, version.

    Once that head is complete the callbacks ignore everything after it (a body, pipelined
    requests): llhttp goes on parsing, which is cheaper than stopping it with an exception.
    """

    __slots__ = ("complete", "hosts", "method", "parser", "target", "version")

    def __init__(self) -> None:
        self.target = b""
        self.hosts: list[bytes] = []
        self.complete = False
        self.method = b""
        self.version = ""
        self.parser: httptools.HttpRequestParser | None = None

    def on_url(self, url: bytes) -> None:
        if not self.complete:
            self.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete and len(name) == 4 and name.lower() == b"host":
            self.hosts.append(value)

    def on_headers_complete(self) -> None:
        if not self.complete and self.parser is not None:
            self.complete = True
            self.method = self.parser.get_method()
            self.version = self.parser.get_http_version()


def sniff_http(data: bytes) -> HttpRequest | NeedMore | NotThis:
    """Read the first request head from everything the client has sent so far.

    Args:
        data: the client's bytes from the start of the connection (accumulated; no state is
            kept between calls).

    Returns:
        The request's facts once its head is complete; `NEED_MORE` while `data` is a valid,
        incomplete start of a request head; `NotThis` with the reason once it cannot be one.
        `host` is the Host header with its port and one trailing dot removed, lower-cased,
        escaped (`to_printable`) and cut to `MAX_HOST_CHARS`; None when absent or empty.
        `path` is the request target as sent (absolute-form included), escaped and cut to
        `MAX_PATH_CHARS`.
    """
    if not data:
        return NEED_MORE
    if data[0] not in _FIRST_BYTES:
        return NotThis("not an HTTP method")
    if (data if data[0] not in b"\r\n" else data.lstrip(b"\r\n")).startswith(_H2_PREFACE_METHOD):
        return NotThis("HTTP/2 prior-knowledge preface")
    head = _Head()
    head.parser = httptools.HttpRequestParser(head)
    try:
        head.parser.feed_data(memoryview(data)[:MAX_SNIFF_BYTES])
    except (httptools.HttpParserError, httptools.HttpParserUpgrade) as error:
        if not head.complete:
            return NotThis(f"not HTTP/1: {error}")
    finally:
        head.parser = None  # the parser holds `head`'s methods: no cycle for the GC to find
    if not head.complete:
        return NotThis("too large") if len(data) >= MAX_SNIFF_BYTES else NEED_MORE
    if head.version not in ("1.1", "1.0"):
        return NotThis(f"HTTP/{head.version}")
    if len(head.hosts) > 1:
        return NotThis("several Host headers")
    return HttpRequest(
        method=head.method.decode("ascii"),
        host=_host_name(head.hosts[0]) if head.hosts else None,
        path=to_printable(head.target, MAX_PATH_CHARS),
    )


def _host_name(value: bytes) -> str | None:
    """The name in a Host header value: without the port, lower-cased, without a trailing dot."""
    value = value.strip(b" \t")
    if value.startswith(b"["):  # an IP literal, "[2001:db8::1]:80" (RFC 3986 3.2.2)
        end = value.find(b"]")
        name = value[1:end] if end != -1 else value
    elif value.count(b":") == 1:
        name = value.partition(b":")[0]
    else:  # no port; or an unbracketed IPv6 address, which is invalid and kept whole
        name = value
    name = name.lower()
    if name.endswith(b"."):
        name = name[:-1]
    return to_printable(name, MAX_HOST_CHARS) or None
