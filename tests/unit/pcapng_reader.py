"""Read back what `tproxy.capture.pcapng` writes, strictly, for the tests: pcapng blocks, then the
IPv4/IPv6 and TCP headers (checksums verified), then each direction's stream by sequence number.

Written apart from the encoder (word-by-word checksums, no shared code), so a mistake in one is
not mirrored in the other. It reads only what the encoder writes: one little-endian section, one
LINKTYPE_RAW interface, Enhanced Packet Blocks of TCP.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10


@dataclass(frozen=True)
class Packet:
    ts_us: int
    version: int  # 4 or 6
    src: str
    dst: str
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    tcp_options: bytes
    payload: bytes
    comment: str | None
    ip_id: int | None  # IPv4 only
    ttl: int  # hop limit for IPv6
    dont_fragment: bool
    tcp_checksum: int


@dataclass(frozen=True)
class Capture:
    linktype: int
    snaplen: int
    tsresol: int
    user_application: str | None
    packets: list[Packet]


def _checksum_ok(data: bytes) -> bool:
    """The ones' complement sum of `data`'s 16-bit words, the checksum among them, is 0xFFFF."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total == 0xFFFF


def _options(data: bytes) -> dict[int, bytes]:
    found: dict[int, bytes] = {}
    pos = 0
    while pos < len(data):
        code, length = struct.unpack_from("<HH", data, pos)
        if code == 0:
            assert pos + 4 == len(data), "bytes after opt_endofopt"
            return found
        found[code] = data[pos + 4 : pos + 4 + length]
        pos += 4 + length + (-length % 4)
    raise AssertionError("options without opt_endofopt")


def parse_pcapng(data: bytes, *, check_tcp_checksums: bool = True) -> Capture:
    """Every block of the file, checked; the TCP packets decoded."""
    pos = 0
    linktype = snaplen = -1
    tsresol = 6
    userappl: str | None = None
    packets: list[Packet] = []
    blocks = 0
    while pos < len(data):
        block_type, length = struct.unpack_from("<II", data, pos)
        assert length % 4 == 0 and length >= 12 and pos + length <= len(data), "block length"
        assert struct.unpack_from("<I", data, pos + length - 4)[0] == length, "trailing length"
        body = data[pos + 8 : pos + length - 4]
        if blocks == 0:
            assert block_type == 0x0A0D0D0A, "the file starts with a Section Header Block"
            magic, major, minor, section_length = struct.unpack_from("<IHHq", body)
            assert (magic, major, minor, section_length) == (0x1A2B3C4D, 1, 0, -1)
            userappl = _options(body[16:]).get(4, b"").decode() or None
        elif block_type == 1:
            assert linktype == -1, "one interface"
            linktype, reserved, snaplen = struct.unpack_from("<HHI", body)
            assert reserved == 0
            options = _options(body[8:])
            if 9 in options:
                tsresol = options[9][0]
        elif block_type == 6:
            assert linktype != -1, "a packet before its interface"
            interface, high, low, caplen, origlen = struct.unpack_from("<IIIII", body)
            assert interface == 0 and caplen == origlen
            padded = caplen + (-caplen % 4)
            options = _options(body[20 + padded :]) if len(body) > 20 + padded else {}
            comment = options[1].decode() if 1 in options else None
            packets.append(
                _decode(body[20 : 20 + caplen], (high << 32) | low, comment, check_tcp_checksums)
            )
        else:
            raise AssertionError(f"unexpected block type {block_type:#x}")
        blocks += 1
        pos += length
    return Capture(linktype, snaplen, tsresol, userappl, packets)


def _decode(frame: bytes, ts_us: int, comment: str | None, check_tcp: bool) -> Packet:
    version = frame[0] >> 4
    if version == 4:
        assert frame[0] == 0x45, "a 20-byte IPv4 header"
        total, ip_id, frag, ttl, proto = struct.unpack_from("!HHHBB", frame, 2)
        assert total == len(frame) and proto == 6
        assert _checksum_ok(frame[:20]), "IPv4 header checksum"
        src, dst = frame[12:16], frame[16:20]
        segment = frame[20:]
        pseudo = src + dst + struct.pack("!BBH", 0, 6, len(segment))
        dont_fragment = frag == 0x4000
        id_or_none: int | None = ip_id
    else:
        assert version == 6
        first, payload_length, next_header, ttl = struct.unpack_from("!IHBB", frame)
        assert first == 0x60000000 and next_header == 6 and payload_length == len(frame) - 40
        src, dst = frame[8:24], frame[24:40]
        segment = frame[40:]
        pseudo = src + dst + struct.pack("!IxxxB", len(segment), 6)
        dont_fragment, id_or_none = False, None
    sport, dport, seq, ack, offset, flags, window, checksum, urgent = struct.unpack_from(
        "!HHIIBBHHH", segment
    )
    header_length = (offset >> 4) * 4
    assert offset & 0x0F == 0 and urgent == 0 and 20 <= header_length <= len(segment)
    if check_tcp:
        assert _checksum_ok(pseudo + segment), "TCP checksum"
    return Packet(
        ts_us=ts_us,
        version=version,
        src=str(ipaddress.ip_address(src)),
        dst=str(ipaddress.ip_address(dst)),
        sport=sport,
        dport=dport,
        seq=seq,
        ack=ack,
        flags=flags,
        window=window,
        tcp_options=segment[20:header_length],
        payload=segment[header_length:],
        comment=comment,
        ip_id=id_or_none,
        ttl=ttl,
        dont_fragment=dont_fragment,
        tcp_checksum=checksum,
    )


@dataclass(frozen=True)
class Streams:
    client: bytes  # what the client sent, in sequence order
    server: bytes
    client_isn: int
    server_isn: int


def reassemble(packets: list[Packet]) -> Streams:
    """Each direction's bytes by sequence number, checking the TCP rules the encoder promises:
    the handshake first; every segment exactly at its sender's next sequence number (nothing
    lost, repeated or reordered, modulo 2**32); every ACK for all the peer has sent; nothing
    after a FIN from its side but pure ACKs, nothing at all after a RST."""
    assert len(packets) >= 3, "a handshake"
    syn, syn_ack, ack = packets[:3]
    assert syn.flags == SYN and syn.ack == 0 and not syn.payload
    assert syn_ack.flags == SYN | ACK and syn_ack.ack == (syn.seq + 1) % 2**32
    assert ack.flags == ACK and (ack.sport, ack.dport) == (syn.sport, syn.dport)
    client = (syn.src, syn.sport)
    nxt = {client: (syn.seq + 1) % 2**32}
    server = (syn_ack.src, syn_ack.sport)
    assert (syn_ack.dst, syn_ack.dport) == client and (syn.dst, syn.dport) == server
    nxt[server] = (syn_ack.seq + 1) % 2**32
    data: dict[tuple[str, int], bytearray] = {client: bytearray(), server: bytearray()}
    fin_sent: set[tuple[str, int]] = set()
    reset = False
    for packet in packets[2:]:
        sender = (packet.src, packet.sport)
        assert sender in nxt, f"a packet from {sender}"
        peer = server if sender == client else client
        assert (packet.dst, packet.dport) == peer
        assert not reset, "nothing after a RST"
        assert packet.flags & ACK and packet.ack == nxt[peer], "acknowledges all the peer sent"
        assert packet.seq == nxt[sender], "in order, nothing lost or repeated"
        assert not packet.flags & SYN
        if sender in fin_sent:
            assert not packet.payload and packet.flags in (ACK, RST | ACK), "data after FIN"
        data[sender] += packet.payload
        nxt[sender] = (nxt[sender] + len(packet.payload)) % 2**32
        if packet.flags & FIN:
            fin_sent.add(sender)
            nxt[sender] = (nxt[sender] + 1) % 2**32
        if packet.flags & RST:
            reset = True
    return Streams(bytes(data[client]), bytes(data[server]), syn.seq, syn_ack.seq)
