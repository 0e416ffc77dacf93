"""Sniff an SSH client's identification line ("SSH-2.0-OpenSSH_9.2p1", RFC 4253 4.2).

The client must send its identification first (only a server may send other lines before its
own), so the bytes must start with "SSH-" followed by the protocol version "2.0" or "1.99" (a
client that also speaks SSH 1, RFC 4253 5.1) and a "-". The line ends with CR LF, or a bare LF
(RFC 4253 4.2 asks to accept it from old clients), and is at most 255 bytes with the CR LF.
Anything else after "SSH-2.0-" is taken as sent, escaped (`to_printable`): the sniffer names
the session, it does not check the software version's grammar.
"""

from __future__ import annotations

from typing import Final

from tproxy.sniffers.facts import NEED_MORE, NeedMore, NotThis, SshBanner
from tproxy.sniffers.printable import to_printable

MAX_BANNER_BYTES: Final = 255  # including the CR LF (RFC 4253 4.2)
_PREFIXES: Final = (b"SSH-2.0-", b"SSH-1.99-")


def sniff_ssh(data: bytes) -> SshBanner | NeedMore | NotThis:
    """Read the client's identification line from everything it has sent so far.

    Args:
        data: the client's bytes from the start of the connection (accumulated; no state is
            kept between calls).

    Returns:
        `SshBanner` with the line without its line end, escaped; `NEED_MORE` while `data` is a
        valid start of one (a prefix of "SSH-2.0-" or "SSH-1.99-", then up to 254 bytes with no
        line end yet); `NotThis` as soon as it cannot be one.
    """
    if not any(data.startswith(prefix) for prefix in _PREFIXES):
        if any(prefix.startswith(data) for prefix in _PREFIXES):
            return NEED_MORE
        return NotThis("not an SSH-2.0 identification")
    end = data.find(b"\n", 0, MAX_BANNER_BYTES)
    if end == -1:
        return NotThis("line too long") if len(data) >= MAX_BANNER_BYTES else NEED_MORE
    return SshBanner(to_printable(data[:end].removesuffix(b"\r"), MAX_BANNER_BYTES))
