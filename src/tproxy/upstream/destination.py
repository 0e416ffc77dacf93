"""Check the destination a handshake asks the proxy for: an IP literal or a DNS name, and a port.

The name goes into a SOCKS5 request (one length byte) or an HTTP request line and Host header,
so it is checked here, before the engine connects anywhere: a name the rule took from a sniffed
SNI or Host header is the client's text, and a space, CR or LF in it would let a client write
its own request to the proxy (header injection).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

MAX_NAME_BYTES = 255
"""SOCKS5 carries a name's length in one byte (RFC 1928 section 5); the DNS allows 253 (255
octets on the wire). The same bound holds for HTTP CONNECT so both proxies accept the same."""

# Letters, digits, hyphen and underscore (seen in real names, e.g. _dmarc or SRV-style hosts),
# in dot-separated labels, with an optional trailing dot. No IDNA: a sniffed name arrives as
# ASCII (A-labels); anything else cannot be a name a resolver would find.
_NAME = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?")


@dataclass(frozen=True, slots=True)
class Destination:
    """Where the proxy is asked to connect: `address` is an IP address, or None when `name`
    is a DNS name (the proxy resolves it)."""

    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    name: str
    port: int

    @property
    def authority(self) -> str:
        """`host:port` as in an HTTP request target, IPv6 in brackets (RFC 9112 3.2.3)."""
        if isinstance(self.address, ipaddress.IPv6Address):
            return f"[{self.address}]:{self.port}"
        return f"{self.name}:{self.port}"


def parse_destination(host: str, port: int) -> Destination:
    """Check `host` (IPv4 or IPv6 text, or a DNS name) and `port`.

    Raises:
        ValueError: the port is not 1-65535; the host is an IPv6 address with a zone
            (`%eth0`: meaningless at the proxy), or neither an IP literal nor a DNS name
            (empty, a character outside letters, digits, `-`, `_`, `.`), or a name longer
            than `MAX_NAME_BYTES`.
    """
    if not 0 < port < 65536:
        raise ValueError(f"destination port {port} is not 1-65535")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            raise ValueError("an IPv6 destination with a zone cannot be sent to a proxy")
        return Destination(address, str(address), port)
    if len(host) > MAX_NAME_BYTES:
        raise ValueError(f"destination name is {len(host)} bytes long, more than {MAX_NAME_BYTES}")
    if not _NAME.fullmatch(host):
        raise ValueError(f"destination {host[:64]!r} is neither an IP address nor a DNS name")
    return Destination(None, host, port)
