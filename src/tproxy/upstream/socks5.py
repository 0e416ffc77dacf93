"""The client side of a SOCKS5 CONNECT (RFC 1928), with username/password (RFC 1929).

Theory of operation. Three exchanges, each one message from us and one reply:

    us                                   proxy
    05 NMETHODS METHODS...        ->               greeting: 00 (no auth) [, 02 (user/pass)]
                                  <-   05 METHOD   the method the proxy picked, FF: none
    01 ULEN USER PLEN PASS        ->               only if the proxy picked 02 (RFC 1929)
                                  <-   01 STATUS   00: accepted; anything else: rejected
    05 01 00 ATYP ADDR PORT       ->               CONNECT; ATYP 1 IPv4, 4 IPv6, 3 name
                                  <-   05 REP 00 ATYP BND.ADDR BND.PORT    REP 00: connected

The proxy may not send a reply before it has our message, so bytes beyond a method or status
reply are a protocol error (a proxy that "pipelines" would otherwise leave us waiting for a
reply it already sent). Only the CONNECT reply may be followed by more: those are the
destination's first bytes (`Established.leftover`).

Leniencies, as curl and common clients have them: the RFC 1929 status reply's version byte may
be 01 (the RFC) or 05 (some servers); the reserved byte of the CONNECT reply is not checked.
A non-zero REP is answered as soon as it is read, without waiting for BND.ADDR: some proxies
close right after it, and the code is what the operator needs.

Not supported: GSSAPI (method 01), BIND and UDP ASSOCIATE, SOCKS4/4a.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from typing import Final

from tproxy.upstream.answers import (
    HANDSHAKE_OVER,
    NEED_MORE,
    Answer,
    Established,
    Refused,
    Send,
)
from tproxy.upstream.destination import Destination

VERSION: Final = 0x05
AUTH_VERSION: Final = 0x01  # RFC 1929 section 2
METHOD_NO_AUTH: Final = 0x00
METHOD_USER_PASS: Final = 0x02
METHOD_NONE_ACCEPTABLE: Final = 0xFF
CMD_CONNECT: Final = 0x01
ATYP_IPV4: Final = 0x01
ATYP_DOMAIN: Final = 0x03
ATYP_IPV6: Final = 0x04
MAX_CREDENTIAL_BYTES: Final = 255  # ULEN and PLEN are one byte each

REPLY_CODES: Final = {
    1: "general SOCKS server failure",
    2: "connection not allowed by ruleset",
    3: "network unreachable",
    4: "host unreachable",
    5: "connection refused by destination host",
    6: "TTL expired",
    7: "command not supported",
    8: "address type not supported",
}
"""RFC 1928 section 6's names for the reply codes (REP) other than 00 "succeeded"."""

_ADDRESS_BYTES: Final = {ATYP_IPV4: 4, ATYP_IPV6: 16}


class _Step(enum.Enum):
    METHOD = "method"
    AUTH = "auth"
    CONNECT = "connect"
    OVER = "over"


class Socks5Handshake:
    """One SOCKS5 CONNECT to `destination`, with credentials if given.

    Args:
        destination: checked by `parse_destination`; a name is sent as ATYP 3 (the proxy
            resolves it), an address as ATYP 1 or 4.
        username, password: offered as RFC 1929 username/password when `username` is given
            (`password` None is sent as empty); encoded as UTF-8.

    Raises:
        ValueError: the username is empty or longer than 255 bytes, or the password longer
            than 255 bytes (RFC 1929 asks for 1-255; an empty password is sent as curl does).
    """

    __slots__ = ("_buffer", "_credentials", "_request", "_step")

    def __init__(
        self, destination: Destination, username: str | None = None, password: str | None = None
    ) -> None:
        self._credentials: tuple[bytes, bytes] | None = None
        if username is not None:
            user, secret = username.encode(), (password or "").encode()
            if not 0 < len(user) <= MAX_CREDENTIAL_BYTES:
                raise ValueError("SOCKS5 username must be 1-255 bytes (RFC 1929)")
            if len(secret) > MAX_CREDENTIAL_BYTES:
                raise ValueError("SOCKS5 password must be at most 255 bytes (RFC 1929)")
            self._credentials = (user, secret)
        self._request = render_connect(destination)
        self._buffer = b""
        self._step = _Step.METHOD

    def start(self) -> bytes:
        """The greeting: no authentication, plus username/password when we have credentials."""
        if self._credentials is None:
            return bytes((VERSION, 1, METHOD_NO_AUTH))
        return bytes((VERSION, 2, METHOD_NO_AUTH, METHOD_USER_PASS))

    def receive(self, data: bytes) -> Answer:
        """The next bytes from the proxy; see the module docstring for the exchanges."""
        if self._step is _Step.OVER:
            return HANDSHAKE_OVER
        self._buffer += data
        if self._step is _Step.METHOD:
            answer = self._method_reply()
        elif self._step is _Step.AUTH:
            answer = self._auth_reply()
        else:
            answer = self._connect_reply()
        if isinstance(answer, Established | Refused):
            self._step = _Step.OVER
            self._buffer = b""
        return answer

    def _method_reply(self) -> Answer:
        buffer = self._buffer
        if buffer[:1] and buffer[0] != VERSION:
            return Refused("not a SOCKS5 reply", refused=False)
        if len(buffer) < 2:
            return NEED_MORE
        method = buffer[1]
        if method == METHOD_NONE_ACCEPTABLE:
            offered = "no authentication" + (" or username/password" if self._credentials else "")
            return Refused(f"SOCKS5: no acceptable authentication method (offered {offered})")
        if len(buffer) > 2:
            return Refused("SOCKS5: bytes after the method selection", refused=False)
        self._buffer = b""
        if method == METHOD_NO_AUTH:
            self._step = _Step.CONNECT
            return Send(self._request)
        if method == METHOD_USER_PASS and self._credentials is not None:
            user, secret = self._credentials
            self._step = _Step.AUTH
            return Send(bytes((AUTH_VERSION, len(user))) + user + bytes((len(secret),)) + secret)
        return Refused(f"SOCKS5: the proxy chose method 0x{method:02x}, not offered", False)

    def _auth_reply(self) -> Answer:
        buffer = self._buffer
        if buffer[:1] and buffer[0] not in (AUTH_VERSION, VERSION):
            return Refused("not a SOCKS5 username/password reply", refused=False)
        if len(buffer) < 2:
            return NEED_MORE
        if buffer[1] != 0:
            return Refused(f"SOCKS5: authentication failed (status {buffer[1]})")
        if len(buffer) > 2:
            return Refused("SOCKS5: bytes after the authentication status", refused=False)
        self._buffer = b""
        self._step = _Step.CONNECT
        return Send(self._request)

    def _connect_reply(self) -> Answer:
        buffer = self._buffer
        if buffer[:1] and buffer[0] != VERSION:
            return Refused("not a SOCKS5 reply", refused=False)
        if len(buffer) < 2:
            return NEED_MORE
        code = buffer[1]
        if code != 0:
            name = REPLY_CODES.get(code)
            return Refused(f"SOCKS5: {name} ({code})" if name else f"SOCKS5: reply code {code}")
        if len(buffer) < 5:  # up to ATYP and the first byte of BND.ADDR (a name's length)
            return NEED_MORE
        atyp = buffer[3]
        if atyp == ATYP_DOMAIN:
            address_bytes = 1 + buffer[4]
        elif atyp in _ADDRESS_BYTES:
            address_bytes = _ADDRESS_BYTES[atyp]
        else:
            return Refused(f"SOCKS5: unknown address type {atyp} in the reply", refused=False)
        end = 4 + address_bytes + 2  # VER REP RSV ATYP, BND.ADDR, BND.PORT
        if len(buffer) < end:
            return NEED_MORE
        return Established(buffer[end:])


def render_connect(destination: Destination) -> bytes:
    """The CONNECT request for `destination` (RFC 1928 section 4)."""
    address = destination.address
    if isinstance(address, ipaddress.IPv4Address):
        target = bytes((ATYP_IPV4,)) + address.packed
    elif isinstance(address, ipaddress.IPv6Address):
        target = bytes((ATYP_IPV6,)) + address.packed
    else:
        name = destination.name.encode("ascii")  # checked by parse_destination
        target = bytes((ATYP_DOMAIN, len(name))) + name
    return bytes((VERSION, CMD_CONNECT, 0)) + target + struct.pack("!H", destination.port)
