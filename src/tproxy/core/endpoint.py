"""Endpoints: an IP address and a TCP port, parsed from user input, printed the one way we log.

IPv6 endpoints are written `[ip]:port` everywhere (logs, JSON, errors), IPv4 ones `ip:port`, so a
log line can be split on the last colon and pasted back into `--listen`.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EndpointError(ValueError):
    """User input that is not an endpoint; the message is one sentence for the command line."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """An IP address and a TCP port."""

    ip: IPAddress
    port: int

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if self.ip.version == 6 else socket.AF_INET

    @property
    def sockaddr(self) -> tuple[str, int]:
        """The tuple `socket.connect`/`bind` take (a 2-tuple works for AF_INET6 too)."""
        return (str(self.ip), self.port)

    @classmethod
    def from_sockaddr(cls, sockaddr: tuple[str, int] | tuple[str, int, int, int]) -> Endpoint:
        """From what `accept()`/`getsockname()` return; IPv4-mapped IPv6 addresses become IPv4."""
        ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return cls(ip, int(sockaddr[1]))

    def __str__(self) -> str:
        return format_sockaddr(self.sockaddr)


def format_sockaddr(sockaddr: tuple[Any, ...]) -> str:
    """`ip:port`, or `[ip]:port` for IPv6, straight from a socket address (no parsing: this runs
    for every connection); IPv4-mapped IPv6 addresses print as IPv4 and scope ids are dropped,
    as `Endpoint.from_sockaddr` reads them."""
    host, port = sockaddr[0], sockaddr[1]
    if ":" not in host:
        return f"{host}:{port}"
    if host.startswith("::ffff:") and "." in host:
        return f"{host[7:]}:{port}"
    return f"[{host.split('%', 1)[0]}]:{port}"


def parse_port(text: str) -> int:
    """A TCP port number, 1 to 65535."""
    if not text.isdigit():
        raise EndpointError(f"invalid port {text!r}: expected a number from 1 to 65535")
    port = int(text)
    if not 1 <= port <= 65535:
        raise EndpointError(f"port {port} out of range: expected 1 to 65535")
    return port


def parse_endpoint(text: str) -> Endpoint:
    """`HOST:PORT` with HOST an IPv4 literal, or `[IPv6]:PORT`; no names (no DNS on this path).

    Raises:
        EndpointError: the text is not of that form, the address is not an IP or the port is off.
    """
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise EndpointError(f"invalid address {text!r}: expected [IPv6]:PORT")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host:
            raise EndpointError(f"invalid address {text!r}: expected HOST:PORT or [IPv6]:PORT")
        if ":" in host:
            raise EndpointError(f"invalid address {text!r}: write IPv6 addresses as [IPv6]:PORT")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise EndpointError(f"invalid address {text!r}: {host!r} is not an IP address") from None
    if (ip.version == 6) != text.startswith("["):
        if ip.version == 6:
            raise EndpointError(f"invalid address {text!r}: write IPv6 addresses as [IPv6]:PORT")
        raise EndpointError(f"invalid address {text!r}: brackets are for IPv6 only")
    return Endpoint(ip, parse_port(port_text))
