"""What sniffers answer: one result type per protocol, plus "need more" and "not this"."""

from __future__ import annotations

import enum
from dataclasses import dataclass

# The most a session buffers while sniffing: a ClientHello with post-quantum key shares is
# 1.7 KB or more and may span TLS records, 16 KiB holds any real one (and a request head).
MAX_SNIFF_BYTES = 16 * 1024


class NeedMore(enum.Enum):
    """The bytes so far are a valid start of this protocol's first message, not all of it."""

    NEED_MORE = "need_more"


NEED_MORE = NeedMore.NEED_MORE


@dataclass(frozen=True, slots=True)
class NotThis:
    """The bytes are not (or no longer) this protocol's first message; `why` says what broke,
    for tests and debugging (never logged with the client's bytes in it)."""

    why: str


@dataclass(frozen=True, slots=True)
class TlsHello:
    """The facts of a TLS ClientHello.

    Args:
        sni: the server name (host_name) from server_name, lower-cased, without a trailing dot,
            escaped (`sniffers.printable`) and at most 255 characters; None if absent. With real
            ECH it is the outer, public name; browsers also send a fake ("GREASE") ECH
            extension when they have no ECH config, and then it is the real name.
        alpn: the offered ALPN protocol names in the client's order, GREASE values left out,
            decoded as ASCII with backslash escapes for any other byte.
        offered_version: the highest version offered ("1.3", "1.2", "1.1", "1.0"), from
            supported_versions when present (GREASE ignored), else legacy_version.
        ech: the ClientHello carries the Encrypted Client Hello extension (0xfe0d): real ECH or
            the GREASE one browsers send without an ECH config (the sniffer cannot tell).
    """

    sni: str | None
    alpn: tuple[str, ...]
    offered_version: str | None
    ech: bool


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """The first HTTP/1.x request's head: `method`, `host` (the Host header, port stripped,
    lower-cased; None if absent), `path` (the request target: may hold secrets, not logged by
    default)."""

    method: str
    host: str | None
    path: str


@dataclass(frozen=True, slots=True)
class SshBanner:
    """The client's SSH identification line ("SSH-2.0-OpenSSH_9.2p1"), without CR LF."""

    banner: str
