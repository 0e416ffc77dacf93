"""The self-connection guard: refuse a session whose original destination is our own listener.

A client that connects straight to the proxy's address and port (not diverted, just addressed to
the box) is accepted by our wildcard listener; its "original destination" is then the proxy
itself, and connecting there would accept again, forever. One packet takes down sslsplit, Xray and
mitmproxy setups this way, and it killed the 2011 seed. We refuse such sessions at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from tproxy.core.endpoint import Endpoint, IPAddress


class SelfConnectGuard:
    """Decides whether a destination is one of our listening endpoints.

    Args:
        listen: the listening endpoints (wildcards included).
        is_local: tells whether an IP is configured on this host; injected so the decision is
            testable without sockets.
    """

    def __init__(self, listen: Sequence[Endpoint], is_local: Callable[[IPAddress], bool]) -> None:
        self._listen = tuple(listen)
        self._ports = frozenset(ep.port for ep in listen)
        self._is_local = is_local

    def is_self(self, dst_addr: tuple[Any, ...]) -> bool:
        """Whether a session to `dst_addr` (host, port) would connect to this proxy itself."""
        if dst_addr[1] not in self._ports:  # the common case: one set lookup, no parsing
            return False
        dst = Endpoint.from_sockaddr(dst_addr)
        for ep in self._listen:
            if ep.port != dst.port or ep.ip.version != dst.ip.version:
                continue
            if ep.ip == dst.ip:
                return True
            if ep.ip.is_unspecified and self._is_local(dst.ip):
                return True
        return False
