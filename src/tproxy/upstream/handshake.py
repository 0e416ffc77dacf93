"""The client side of upstream proxies: the handshake a `via` rule's session runs over its TCP
connection to the proxy, before relaying. Pure (sans-IO): bytes in, answers out.

Supported:
* SOCKS5 (RFC 1928) CONNECT, to an IPv4 or IPv6 address or a name the proxy resolves, with no
  authentication or username/password (RFC 1929) — `socks5.py`.
* HTTP/1.1 CONNECT, with `Proxy-Authorization: Basic` credentials — `http_connect.py`.

Not supported: SOCKS4/4a, GSSAPI authentication, SOCKS5 BIND and UDP ASSOCIATE, HTTP proxy
authentication other than Basic (Digest, NTLM, Negotiate), TLS to the proxy itself (https://).

How the engine drives one (the connection to the proxy is the engine's):

    handshake = handshake_for(rule.via, host, port)     # ValueError: do not connect at all
    write(handshake.start())
    while True:
        answer = handshake.receive(read())               # EOF first: the proxy closed early
        Send: write answer.data | NEED_MORE: read again
        Established: relay, answer.leftover first to the client | Refused: close, log detail
"""

from __future__ import annotations

from tproxy.policy.model import UpstreamProxy
from tproxy.upstream.answers import (
    NEED_MORE,
    Answer,
    Established,
    NeedMore,
    ProxyHandshake,
    Refused,
    Send,
)
from tproxy.upstream.destination import MAX_NAME_BYTES, Destination, parse_destination
from tproxy.upstream.http_connect import HTTPConnectHandshake
from tproxy.upstream.socks5 import Socks5Handshake

__all__ = [
    "MAX_NAME_BYTES",
    "NEED_MORE",
    "Answer",
    "Destination",
    "Established",
    "HTTPConnectHandshake",
    "NeedMore",
    "ProxyHandshake",
    "Refused",
    "Send",
    "Socks5Handshake",
    "handshake_for",
]


def handshake_for(proxy: UpstreamProxy, host: str, port: int) -> ProxyHandshake:
    """A fresh handshake asking `proxy` to connect to `host`:`port`.

    Args:
        proxy: the rule's `via` (scheme `socks5` or `http`, credentials optional).
        host: the destination, an IP literal (IPv4 or IPv6 text, no brackets) or, when the rule
            has `remote_name`, a DNS name the proxy resolves.
        port: the destination port.

    Raises:
        ValueError: checked before any connection is made, so the engine can fail the session
            without connecting: an unknown scheme; a host that is neither an IP literal nor a
            DNS name (a sniffed name with a space, CR or LF would otherwise end up in the
            proxy's request), or a name longer than 255 bytes; a port outside 1-65535;
            credentials the protocol cannot carry (SOCKS5: over 255 bytes; HTTP: a username
            with a colon).
    """
    destination = parse_destination(host, port)
    if proxy.scheme == "socks5":
        return Socks5Handshake(destination, proxy.username, proxy.password)
    if proxy.scheme == "http":
        return HTTPConnectHandshake(destination, proxy.username, proxy.password)
    raise ValueError(f"unknown upstream proxy scheme {proxy.scheme!r}")
