"""Where an accepted connection was really going: per interception mode.

TPROXY leaves the packet untouched and only assigns it to our transparent listener, so the
accepted socket's own address (`getsockname()`) *is* the original destination. REDIRECT (NAT)
rewrote the destination to our port; conntrack remembers the original and hands it out through
SO_ORIGINAL_DST (IPv4) and IP6T_SO_ORIGINAL_DST (IPv6), as a raw `struct sockaddr_in[6]`.
SO_ORIGINAL_DST on a TPROXY socket can be wrong (there was no NAT), so each mode uses its own.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

from tproxy.core.config import InterceptMode

# <linux/netfilter_ipv4.h> and <linux/netfilter_ipv6/ip6_tables.h>: both are 80.
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28

Destination = Callable[[socket.socket], tuple[Any, ...]]


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """`(ip, port)` from a raw `struct sockaddr_in` or `sockaddr_in6` as the kernel returns it.

    Raises:
        ValueError: not an AF_INET/AF_INET6 address of the right length.
    """
    if len(raw) < 2:
        raise ValueError(f"a socket address of {len(raw)} bytes")
    (family,) = struct.unpack_from("=H", raw)  # sa_family is in host byte order
    if family == socket.AF_INET and len(raw) >= _SOCKADDR_IN_LEN:
        (port,) = struct.unpack_from("!H", raw, 2)
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= _SOCKADDR_IN6_LEN:
        (port,) = struct.unpack_from("!H", raw, 2)
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raise ValueError(f"a socket address of family {family} and {len(raw)} bytes")


def redirect_destination(sock: socket.socket) -> tuple[str, int]:
    """The destination before REDIRECT rewrote it, from conntrack.

    Raises:
        OSError: conntrack knows no such connection (ENOENT: it was not redirected).
    """
    if sock.family == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
    return parse_sockaddr(raw)


def destination_lookup(mode: InterceptMode) -> Destination:
    """How to find an accepted socket's original destination in `mode`."""
    if mode is InterceptMode.REDIRECT:
        return redirect_destination
    return socket.socket.getsockname
