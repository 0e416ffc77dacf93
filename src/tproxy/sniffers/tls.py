"""Read the facts of a TLS ClientHello (SNI, ALPN, highest offered version, ECH) from a client's
first bytes, without terminating TLS.

Theory of operation
-------------------
`sniff_tls` is called with everything the client has sent so far, again after each read, and
keeps no state: it walks the bytes from the start each time. It answers `NEED_MORE` while the
bytes are a valid start of a ClientHello, the facts once the first ClientHello is complete, and
`NotThis` as soon as the bytes cannot be one. It reads only what it must: nothing after the
first ClientHello (early data, a second hello after a HelloRetryRequest) changes the answer.

Two layers are walked. The **record layer** (RFC 8446 §5.1) frames the bytes::

    +------+--------+--------+----------------------+
    | 0x16 | 0x03xx | length | fragment (length)    |   type 22 = handshake, 1 <= length <= 2^14
    +------+--------+--------+----------------------+
      1 B     2 B      2 B

A ClientHello may be cut into any number of handshake records, down to one byte of fragment
each (caddy-l4 and others shipped parsers that assumed one record), and the records into any
number of TCP segments (HAProxy configs, sslsplit and mihomo assumed one segment or 1 KiB).
The fragments of consecutive type-22 records are joined into the **handshake stream**; any
other record type before the hello is complete is not a TLS client's first flight. When the
whole hello sits in the first record (nearly always) it is parsed in place, without a copy.

The handshake stream starts with the ClientHello message (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2)::

    msg_type = 1 (1 B) | length (3 B) | body (length B):
        legacy_version             2 B     fallback for the offered version
        random                    32 B
        legacy_session_id         1 B length, 0..32 B
        cipher_suites             2 B length, 2..2^16-2 B, even (GREASE values skipped unread)
        legacy_compression_methods 1 B length, 1..255 B
        extensions                2 B length, then to the end of the body exactly; may be
                                  absent altogether (TLS 1.2 and earlier): then no SNI, no ALPN
            extension_type 2 B | extension_data: 2 B length, data

and the four extensions read are::

    server_name (0)             RFC 6066 §3: ServerNameList 2 B length, entries
                                name_type 1 B (0 = host_name) | HostName 2 B length, 1.. B
    alpn (16)                   RFC 7301 §3.1: ProtocolNameList 2 B length, entries
                                ProtocolName 1 B length, 1..255 B
    supported_versions (43)     RFC 8446 §4.2.1: versions 1 B length, 2..254 B, 2 B each
    encrypted_client_hello      draft-ietf-tls-esni (0xfe0d): present or not; not read

Every other extension (GREASE 0x?A?A, padding, key_share, unknown ones) is skipped by its length.

What counts as a lie. Each length must fit in its container, and each vector must fill its
container exactly, as OpenSSL and BoringSSL require (`PACKET_as_length_prefixed_*`): bytes left
over after the extensions, an odd cipher-suite length, an empty host name or ALPN name, a
second host name or a repeated server_name / alpn / supported_versions / ECH extension make the
answer `NotThis`. The repeats matter beyond tidiness: a sniffer that reads the first SNI while
the server reads the last is how name-based rules get evaded, so an ambiguous hello has no name.
A hello no conforming server would accept is not worth a name.

Bounds. A hello must be complete within the first `MAX_SNIFF_BYTES` bytes (record headers
included): an announced handshake length that cannot fit is `NotThis("too large")` at once, and
`MAX_SNIFF_BYTES` bytes or more without a complete hello are too, so the caller never holds a full
buffer that still needs more. Records longer than 2^14 and zero-length records (both forbidden by
RFC 8446 §5.1) are `NotThis`. Every read is bounds-checked before it happens: nothing here
raises, whatever the bytes.

Names are what the client claims: they are logged and matched, never used to connect. SNI is
lower-cased (ASCII) and loses one trailing dot; SNI and ALPN names are escaped alike: printable
ASCII stays, every other byte and the backslash itself become ``\\xNN`` (so the escaping cannot
be forged). The SNI is then cut at 255 characters, never inside an escape; an ALPN name is at
most 255 bytes on the wire, so at most 1,020 characters. `ech` only says the extension is
present: Chrome (BoringSSL) sends a GREASE ECH extension when it has no ECH config, so `ech` with
an ordinary SNI is common, and the SNI is then the real name.

Versions: supported_versions (GREASE ignored) when present with a value, else legacy_version.
Among TLS versions proper (0x03xx) the highest wins; other code points (TLS 1.3 drafts 0x7fxx,
experiments) do not order against them and are named only when nothing else is offered, as hex.
"""

from __future__ import annotations

import struct

from tproxy.sniffers.facts import MAX_SNIFF_BYTES, NEED_MORE, NeedMore, NotThis, TlsHello
from tproxy.sniffers.printable import to_printable

# Bounds are checked before every read, so this never raises struct.error.
_read_u16_pair = struct.Struct(">HH").unpack_from

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_RECORD_HEADER = 5
_HANDSHAKE_HEADER = 4
_MAX_FRAGMENT = 1 << 14  # RFC 8446 §5.1: a TLSPlaintext fragment is at most 2^14 bytes

_EXT_SERVER_NAME = 0x0000
_EXT_ALPN = 0x0010
_EXT_SUPPORTED_VERSIONS = 0x002B
_EXT_ECH = 0xFE0D
_READ_EXTENSIONS = frozenset((_EXT_SERVER_NAME, _EXT_ALPN, _EXT_SUPPORTED_VERSIONS, _EXT_ECH))
_HOST_NAME = 0

# legacy_version (2) + random (32) + session id length (1) + cipher suites length (2) + one
# suite (2) + compression length (1) + one method (1): the shortest ClientHello body there is.
_MIN_BODY = 41
_MAX_NAME_CHARS = 255
_ANY_LENGTH = 4 * 255  # an ALPN name is at most 255 bytes, so never cut

_VERSION_NAMES = {0x0304: "1.3", 0x0303: "1.2", 0x0302: "1.1", 0x0301: "1.0"}


def sniff_tls(data: bytes) -> TlsHello | NeedMore | NotThis:
    """Read the first TLS ClientHello in `data`, everything the client has sent so far.

    Args:
        data: the client's bytes from the first one on; later calls get the same bytes and more.

    Returns:
        `TlsHello` with the facts once the first ClientHello is complete (bytes after it are not
        read), `NEED_MORE` while `data` is a valid start of one (also for empty `data`), or
        `NotThis` with a fixed reason when it cannot be one. Never raises.
    """
    size = len(data)
    if size == 0:
        return NEED_MORE
    if data[0] != _HANDSHAKE:
        return NotThis("not a TLS handshake record")

    # The common case: the whole hello in the first record, parsed in place.
    if size >= _RECORD_HEADER + _HANDSHAKE_HEADER:
        fragment_length = data[3] << 8 | data[4]
        hello_length = data[6] << 16 | data[7] << 8 | data[8]
        hello_end = _RECORD_HEADER + _HANDSHAKE_HEADER + hello_length
        if (
            data[1] == 3
            and data[5] == _CLIENT_HELLO
            and _HANDSHAKE_HEADER + hello_length <= fragment_length <= _MAX_FRAGMENT
            and hello_end <= size
            and hello_end <= MAX_SNIFF_BYTES
        ):
            return _parse_body(data, _RECORD_HEADER + _HANDSHAKE_HEADER, hello_end)

    return _reassemble(data)


def _reassemble(data: bytes) -> TlsHello | NeedMore | NotThis:
    """Join the fragments of the handshake records until the ClientHello is complete."""
    # What lies past the sniff buffer's size never counts, whoever buffered it: the answer is
    # the same as the engine's, whose buffer holds MAX_SNIFF_BYTES.
    data = data[:MAX_SNIFF_BYTES]
    size = len(data)
    fragments: list[bytes] = []
    have = 0  # handshake bytes collected so far
    need = 0  # handshake bytes the hello takes (header included), once its header is in
    pos = 0
    while pos < size:
        if data[pos] != _HANDSHAKE:
            return NotThis("a record that is not a handshake before the ClientHello is complete")
        if pos + 1 < size and data[pos + 1] != 3:
            return NotThis("record version is not 3.x")
        if pos + _RECORD_HEADER > size:
            break
        length = data[pos + 3] << 8 | data[pos + 4]
        if length == 0:
            return NotThis("zero-length record")
        if length > _MAX_FRAGMENT:
            return NotThis("record longer than 2^14 bytes")
        start = pos + _RECORD_HEADER
        pos = start + length
        fragment = data[start:pos]  # shorter than `length` when the record is still arriving
        fragments.append(fragment)
        have += len(fragment)
        if need == 0 and have >= 1:
            if fragments[0][0] != _CLIENT_HELLO:  # `have` > 0: the first record has a byte
                return NotThis("the first handshake message is not a ClientHello")
            if have >= _HANDSHAKE_HEADER:
                header = b"".join(fragments)[:_HANDSHAKE_HEADER]
                need = _HANDSHAKE_HEADER + (header[1] << 16 | header[2] << 8 | header[3])
                if _RECORD_HEADER + need > MAX_SNIFF_BYTES:
                    return NotThis("too large")
        if need and have >= need:
            stream = b"".join(fragments)
            return _parse_body(stream, _HANDSHAKE_HEADER, need)
    if size == MAX_SNIFF_BYTES:
        return NotThis("too large")
    return NEED_MORE


def _parse_body(buf: bytes, pos: int, end: int) -> TlsHello | NotThis:
    """Parse the ClientHello body in `buf[pos:end]` (the handshake header already checked)."""
    if end - pos < _MIN_BODY:
        return NotThis("ClientHello shorter than its fixed fields")
    legacy_version = buf[pos] << 8 | buf[pos + 1]
    pos += 34  # legacy_version, random
    session_id_length = buf[pos]
    if session_id_length > 32:
        return NotThis("session id longer than 32 bytes")
    pos += 1 + session_id_length
    if pos + 2 > end:
        return NotThis("cipher suites run past the ClientHello")
    suites_length = buf[pos] << 8 | buf[pos + 1]
    pos += 2 + suites_length
    if suites_length == 0 or suites_length & 1:
        return NotThis("cipher suites length is zero or odd")
    if pos + 1 > end:
        return NotThis("cipher suites run past the ClientHello")
    compression_length = buf[pos]
    pos += 1 + compression_length
    if compression_length == 0:
        return NotThis("no compression method")
    if pos > end:
        return NotThis("compression methods run past the ClientHello")
    if pos == end:  # no extensions at all: TLS 1.2 and earlier allow it
        return TlsHello(None, (), _version_name(legacy_version), ech=False)
    if pos + 2 > end:
        return NotThis("extensions length runs past the ClientHello")
    extensions_length = buf[pos] << 8 | buf[pos + 1]
    pos += 2
    if pos + extensions_length != end:
        return NotThis("extensions do not end where the ClientHello does")

    # One pass finds the extensions read (and repeats); they are parsed after it.
    found: dict[int, tuple[int, int]] = {}
    last_header = end - 4
    while pos < end:
        if pos > last_header:
            return NotThis("extension header runs past the extensions")
        kind, length = _read_u16_pair(buf, pos)
        pos += 4 + length
        if pos > end:
            return NotThis("extension runs past the extensions")
        if kind in _READ_EXTENSIONS:
            if kind in found:
                return NotThis("an extension is repeated")
            found[kind] = (pos - length, pos)

    sni: str | None = None
    alpn: tuple[str, ...] = ()
    offered: str | None = None
    if (span := found.get(_EXT_SERVER_NAME)) is not None:
        name = _server_name(buf, *span)
        if isinstance(name, NotThis):
            return name
        sni = name
    if (span := found.get(_EXT_ALPN)) is not None:
        names = _alpn(buf, *span)
        if isinstance(names, NotThis):
            return names
        alpn = names
    if (span := found.get(_EXT_SUPPORTED_VERSIONS)) is not None:
        highest = _supported_versions(buf, *span)
        if isinstance(highest, NotThis):
            return highest
        offered = highest
    return TlsHello(sni, alpn, offered or _version_name(legacy_version), ech=_EXT_ECH in found)


def _server_name(buf: bytes, pos: int, end: int) -> str | NotThis | None:
    """The host_name of a server_name extension in `buf[pos:end]`; None if it has none."""
    if pos + 2 > end or pos + 2 + (buf[pos] << 8 | buf[pos + 1]) != end or pos + 2 == end:
        return NotThis("server name list does not fill its extension")
    pos += 2
    host: bytes | None = None
    while pos < end:
        if pos + 3 > end:
            return NotThis("server name entry runs past its list")
        name_type = buf[pos]
        name_end = pos + 3 + (buf[pos + 1] << 8 | buf[pos + 2])
        if name_end > end:
            return NotThis("server name runs past its list")
        if name_end == pos + 3:
            return NotThis("empty server name")
        if name_type == _HOST_NAME:
            if host is not None:
                return NotThis("two host names")
            host = buf[pos + 3 : name_end]
        pos = name_end
    if host is None:
        return None
    host = host.lower()
    if host.endswith(b"."):
        host = host[:-1]
    return to_printable(host, _MAX_NAME_CHARS)


def _alpn(buf: bytes, pos: int, end: int) -> tuple[str, ...] | NotThis:
    """The protocol names of an ALPN extension in `buf[pos:end]`, GREASE left out."""
    if pos + 2 > end or pos + 2 + (buf[pos] << 8 | buf[pos + 1]) != end or pos + 2 == end:
        return NotThis("ALPN list does not fill its extension")
    pos += 2
    names: list[str] = []
    while pos < end:
        name_end = pos + 1 + buf[pos]
        if name_end > end:
            return NotThis("ALPN name runs past its list")
        if name_end == pos + 1:
            return NotThis("empty ALPN name")
        # GREASE ALPN identifiers (RFC 8701 §2) are the two bytes 0x?A 0x?A, both the same.
        if not (name_end == pos + 3 and buf[pos + 1] == buf[pos + 2] and buf[pos + 1] & 15 == 10):
            names.append(to_printable(buf[pos + 1 : name_end], _ANY_LENGTH))
        pos = name_end
    return tuple(names)


def _supported_versions(buf: bytes, pos: int, end: int) -> str | NotThis | None:
    """The highest version in a ClientHello's supported_versions in `buf[pos:end]`, GREASE
    ignored; None if it offers nothing else."""
    if pos + 1 > end or pos + 1 + buf[pos] != end or buf[pos] & 1 or buf[pos] == 0:
        return NotThis("supported versions do not fill their extension")
    best_tls = best_other = -1
    for i in range(pos + 1, end, 2):
        version = buf[i] << 8 | buf[i + 1]
        if version >> 8 == 3:  # TLS proper (GREASE values never start with 0x03)
            best_tls = max(best_tls, version)
        # RFC 8701 §2: GREASE code points are 0x0A0A, 0x1A1A, ... 0xFAFA.
        elif not (version & 0x0F0F == 0x0A0A and version >> 8 == version & 0xFF):
            best_other = max(best_other, version)
    if best_tls >= 0:
        return _version_name(best_tls)
    return _version_name(best_other) if best_other >= 0 else None


def _version_name(version: int) -> str:
    return _VERSION_NAMES.get(version) or f"0x{version:04x}"
