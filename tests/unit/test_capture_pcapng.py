"""The pcapng encoder: files read back by our own strict reader (random chunkings, both directions,
sequence numbers across 2**32) and by tshark, which must follow both streams byte for byte."""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.capture.pcapng import LINKTYPE_RAW, MAX_SEGMENT_BYTES, TTL, WINDOW, TcpConversation

from .pcapng_reader import ACK, FIN, PSH, RST, SYN, parse_pcapng, reassemble

T0 = 1764555000.123456
V4 = (("198.18.1.2", 50000), ("198.18.2.2", 443))
V6 = (("fd00:1::2", 50000), ("fd00:2::2", 443))


@dataclass(frozen=True)
class Chunk:
    from_client: bool
    payload: bytes


def write(
    conv: TcpConversation,
    chunks: Sequence[Chunk],
    end: str = "",
    comment_after: int | None = None,
    comment: str = "capture cut at 16777216 bytes (capture_max_bytes)",
) -> bytes:
    """A whole file: header, handshake, `chunks` 1 ms apart, a comment after chunk
    `comment_after`, then `end`: "fin" (client, then server), "rst" (client), or nothing."""
    parts = [conv.file_header(), conv.handshake(T0)]
    ts = T0
    for i, chunk in enumerate(chunks):
        ts += 0.001
        parts.append(conv.data(chunk.from_client, chunk.payload, ts))
        if i == comment_after:
            parts.append(conv.comment(comment, ts))
    if end == "fin":
        parts += [conv.fin(True, ts + 0.001), conv.fin(False, ts + 0.002)]
    elif end == "rst":
        parts.append(conv.rst(True, ts + 0.001))
    return b"".join(parts)


def sent(chunks: Sequence[Chunk], from_client: bool) -> bytes:
    return b"".join(c.payload for c in chunks if c.from_client == from_client)


# --- read back by our own reader ----------------------------------------------------------------


def test_file_header_says_raw_ip_in_microseconds() -> None:
    capture = parse_pcapng(TcpConversation(*V4, T0).file_header())
    assert capture.linktype == LINKTYPE_RAW == 101
    assert capture.snaplen == 262144
    assert capture.tsresol == 6
    assert capture.user_application == "tproxy"
    assert capture.packets == []


@pytest.mark.parametrize(("client", "server"), [V4, V6], ids=["ipv4", "ipv6"])
def test_headers_carry_the_original_addresses_and_follow_the_bytes(
    client: tuple[str, int], server: tuple[str, int]
) -> None:
    conv = TcpConversation(client, server, T0, client_isn=1000, server_isn=5000)
    chunks = [Chunk(True, b"GET / HTTP/1.1\r\n\r\n"), Chunk(False, b"HTTP/1.1 200 OK\r\n\r\n")]
    packets = parse_pcapng(write(conv, chunks, "fin")).packets
    summary = [(p.src, p.sport, p.flags, p.seq, p.ack, len(p.payload)) for p in packets]
    c, s = client, server
    assert summary == [
        (c[0], c[1], SYN, 1000, 0, 0),
        (s[0], s[1], SYN | ACK, 5000, 1001, 0),
        (c[0], c[1], ACK, 1001, 5001, 0),
        (c[0], c[1], PSH | ACK, 1001, 5001, 18),
        (s[0], s[1], ACK, 5001, 1019, 0),
        (s[0], s[1], PSH | ACK, 5001, 1019, 19),
        (c[0], c[1], ACK, 1019, 5020, 0),
        (c[0], c[1], FIN | ACK, 1019, 5020, 0),
        (s[0], s[1], ACK, 5020, 1020, 0),
        (s[0], s[1], FIN | ACK, 5020, 1020, 0),
        (c[0], c[1], ACK, 1020, 5021, 0),
    ]
    assert all(p.window == WINDOW and p.ttl == TTL for p in packets)
    assert all(p.version == (6 if ":" in client[0] else 4) for p in packets)
    # The SYN and the SYN-ACK offer the segment size as their MSS (kind 2, length 4).
    mss = bytes([2, 4]) + MAX_SEGMENT_BYTES.to_bytes(2, "big")
    assert [p.tcp_options for p in packets[:3]] == [mss, mss, b""]
    assert {p.ts_us for p in packets[:3]} == {round(T0 * 1e6)}
    assert packets[3].ts_us == round((T0 + 0.001) * 1e6)


def test_ipv4_sets_df_and_counts_ip_ids_per_direction() -> None:
    conv = TcpConversation(*V4, T0)
    packets = parse_pcapng(write(conv, [Chunk(True, b"a"), Chunk(True, b"b")], "rst")).packets
    assert all(p.dont_fragment for p in packets)
    for host in (V4[0][0], V4[1][0]):
        ids = [p.ip_id for p in packets if p.src == host]
        assert ids == list(range(len(ids)))


def test_ipv4_mapped_addresses_give_ipv4_packets() -> None:
    conv = TcpConversation(("::ffff:198.18.1.2", 50000), ("::ffff:198.18.2.2", 443), T0)
    packets = parse_pcapng(write(conv, [Chunk(True, b"x")])).packets
    assert {(p.version, p.src) for p in packets} == {(4, "198.18.1.2"), (4, "198.18.2.2")}


def test_isns_are_derived_from_the_session_unless_given() -> None:
    def isns(started_at: float) -> tuple[int, int]:
        streams = reassemble(parse_pcapng(write(TcpConversation(*V4, started_at), [])).packets)
        return streams.client_isn, streams.server_isn

    assert isns(T0) == isns(T0)
    assert isns(T0) != isns(T0 + 1)
    assert len(set(isns(T0))) == 2
    assert write(TcpConversation(*V4, T0), [Chunk(True, b"x")], "fin") == write(
        TcpConversation(*V4, T0), [Chunk(True, b"x")], "fin"
    )


def test_segments_split_at_the_segment_size_and_accept_any_buffer() -> None:
    conv = TcpConversation(*V6, T0, max_segment_bytes=1000)
    payload = os.urandom(2500)
    chunks = [Chunk(True, payload)]
    data = conv.file_header() + conv.handshake(T0)
    data += conv.data(True, memoryview(bytearray(payload)), T0)
    assert conv.data(False, b"", T0) == b""
    packets = parse_pcapng(data).packets[3:]
    assert [(p.flags, len(p.payload)) for p in packets] == [
        (ACK, 1000),
        (ACK, 0),
        (ACK, 1000),
        (ACK, 0),
        (PSH | ACK, 500),
        (ACK, 0),
    ]
    assert reassemble(parse_pcapng(data).packets).client == sent(chunks, True)


def test_without_checksums_the_tcp_checksum_is_zero() -> None:
    conv = TcpConversation(*V4, T0, tcp_checksums=False)
    capture = parse_pcapng(write(conv, [Chunk(True, b"abc")]), check_tcp_checksums=False)
    assert {p.tcp_checksum for p in capture.packets} == {0}


def test_the_comment_rides_a_pure_ack_from_the_client() -> None:
    conv = TcpConversation(*V4, T0)
    data = write(conv, [Chunk(True, b"q"), Chunk(False, b"a" * 99)], "rst", 1, "cut: ünïcode")
    packets = parse_pcapng(data).packets
    [commented] = [p for p in packets if p.comment is not None]
    assert commented.comment == "cut: ünïcode"
    assert (commented.src, commented.flags, commented.payload) == (V4[0][0], ACK, b"")
    assert packets[-1].flags == RST | ACK
    assert reassemble(packets).server == b"a" * 99


def test_misuse_raises() -> None:
    with pytest.raises(ValueError, match="family"):
        TcpConversation(V4[0], V6[1], T0)
    with pytest.raises(ValueError):
        TcpConversation(("not-an-address", 1), V4[1], T0)
    with pytest.raises(ValueError, match="ports"):
        TcpConversation(V4[0], ("198.18.2.2", 65536), T0)
    with pytest.raises(ValueError, match="max_segment_bytes"):
        TcpConversation(*V4, T0, max_segment_bytes=65496)
    conv = TcpConversation(*V4, T0)
    with pytest.raises(ValueError, match="handshake"):
        conv.data(True, b"x", T0)
    with pytest.raises(ValueError, match="handshake"):
        conv.fin(True, T0)
    with pytest.raises(ValueError, match="open"):
        conv.rst(True, T0)
    with pytest.raises(ValueError, match="handshake"):
        conv.comment("x", T0)
    conv.handshake(T0)
    with pytest.raises(ValueError, match="already"):
        conv.handshake(T0)
    conv.fin(False, T0)
    with pytest.raises(ValueError, match="FIN"):
        conv.data(False, b"late", T0)
    conv.data(True, b"half-closed: the client may still send", T0)
    conv.rst(False, T0)
    with pytest.raises(ValueError, match="reset"):
        conv.data(True, b"x", T0)
    with pytest.raises(ValueError):
        conv.rst(True, T0)
    with pytest.raises(ValueError, match="65000"):
        conv.comment("x" * 65001, T0)


ISNS = st.one_of(st.integers(2**32 - 600, 2**32 - 1), st.integers(0, 2**32 - 1))
CHUNKS = st.lists(
    st.builds(
        Chunk,
        st.booleans(),
        st.one_of(st.binary(max_size=3), st.binary(max_size=300)),
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(
    chunks=CHUNKS,
    client_isn=ISNS,
    server_isn=ISNS,
    segment=st.integers(1, 64),
    end=st.sampled_from(["", "fin", "rst"]),
    comment_after=st.one_of(st.none(), st.integers(0, 29)),
    ipv6=st.booleans(),
)
def test_any_chunking_reads_back_as_the_same_streams(  # noqa: PLR0917 (hypothesis gives them)
    chunks: list[Chunk],
    client_isn: int,
    server_isn: int,
    segment: int,
    end: str,
    comment_after: int | None,
    ipv6: bool,
) -> None:
    client, server = V6 if ipv6 else V4
    conv = TcpConversation(
        client,
        server,
        T0,
        client_isn=client_isn,
        server_isn=server_isn,
        max_segment_bytes=segment,
    )
    packets = parse_pcapng(write(conv, chunks, end, comment_after, "cut")).packets
    streams = reassemble(packets)
    assert streams.client == sent(chunks, True)
    assert streams.server == sent(chunks, False)
    assert (streams.client_isn, streams.server_isn) == (client_isn, server_isn)
    assert all(len(p.payload) <= segment for p in packets)
    expected_comments = 1 if comment_after is not None and comment_after < len(chunks) else 0
    assert [p.comment for p in packets if p.comment] == ["cut"] * expected_comments
    last = packets[-1]
    if end == "rst":
        assert (last.src, last.flags) == (client[0], RST | ACK)
    elif end == "fin":
        assert [p.flags for p in packets[-4:]] == [FIN | ACK, ACK, FIN | ACK, ACK]
    else:
        assert not any(p.flags & (FIN | RST) for p in packets)


# --- read back by tshark -------------------------------------------------------------------------

TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(
    TSHARK is None, reason="tshark is not installed (scripts/bootstrap installs Debian's tshark)"
)
# tshark's own greeting when run as root; anything else on stderr is a complaint.
ROOT_NOTICE = re.compile(r'^Running as user "root" and group "root"\. This could be dangerous\.$')


def tshark(path: Path, *args: str) -> str:
    """tshark's stdout for `path`, with default preferences (no user profile), after checking it
    exited 0 and said nothing on stderr."""
    assert TSHARK is not None
    home = path.parent / "tshark-home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home)}
    done = subprocess.run(
        [TSHARK, "-r", str(path), *args], capture_output=True, text=True, env=env, check=False
    )
    complaints = [line for line in done.stderr.splitlines() if not ROOT_NOTICE.match(line)]
    assert done.returncode == 0 and not complaints, (done.returncode, done.stderr)
    return done.stdout


def followed(output: str) -> tuple[bytes, bytes]:
    """Both directions from `-z follow,tcp,raw,N`: node 0's lines are flush left, node 1's
    indented by a tab."""
    body = output.split("=" * 67)[1]
    node0, node1 = bytearray(), bytearray()
    for line in body.splitlines():
        if re.fullmatch(r"\t?[0-9a-f]+", line):
            (node1 if line.startswith("\t") else node0).extend(bytes.fromhex(line.strip()))
    return bytes(node0), bytes(node1)


def expert(output: str) -> dict[str, set[str]]:
    """`-z expert`'s summaries by severity ("Errors", "Warns", "Notes", "Chats", "Comments")."""
    found: dict[str, set[str]] = {}
    severity = ""
    for line in output.splitlines():
        header = re.fullmatch(r"(\w+) \(\d+\)", line.strip())
        if header:
            severity = header.group(1)
            found[severity] = set()
        elif severity and re.match(r"\s+\d+\s", line):
            # Frequency, Group, Protocol, Summary: columns separated by runs of spaces.
            found[severity].add(re.split(r"\s{2,}", line.strip(), maxsplit=3)[3])
    return found


def random_chunks(rng: random.Random, size: int) -> list[Chunk]:
    """`size` random bytes each way, in chunks of 0 to 64 KiB (many small ones), interleaved."""
    left = {True: size, False: size}
    chunks = []
    while left[True] or left[False]:
        side = rng.choice([s for s in (True, False) if left[s]])
        n = min(left[side], rng.choice([0, 1, rng.randint(2, 1500), rng.randint(1, 65536)]))
        chunks.append(Chunk(side, rng.randbytes(n)))
        left[side] -= n
    return chunks


@needs_tshark
@pytest.mark.parametrize("end", ["fin", "rst"])
@pytest.mark.parametrize(("client", "server"), [V4, V6], ids=["ipv4", "ipv6"])
def test_tshark_follows_both_directions_byte_for_byte(
    tmp_path: Path, client: tuple[str, int], server: tuple[str, int], end: str
) -> None:
    rng = random.Random(f"{client}{end}")
    chunks = random_chunks(rng, 1 << 20)
    # The client's sequence numbers wrap past 2**32 within the first MiB.
    conv = TcpConversation(client, server, T0, client_isn=2**32 - 300_000)
    path = tmp_path / "session.pcapng"
    comment = "capture cut at 16777216 bytes (capture_max_bytes)"
    path.write_bytes(write(conv, chunks, end, len(chunks) // 2, comment))

    from_client, from_server = followed(tshark(path, "-q", "-z", "follow,tcp,raw,0"))
    assert hashlib.sha256(from_client).digest() == hashlib.sha256(sent(chunks, True)).digest()
    assert hashlib.sha256(from_server).digest() == hashlib.sha256(sent(chunks, False)).digest()

    # Checksum validation on (it is off by default): a bad one would be an error.
    checksums = ("-o", "tcp.check_checksum:TRUE", "-o", "ip.check_checksum:TRUE")
    found = expert(tshark(path, "-q", "-z", "expert", *checksums))
    assert "Errors" not in found
    assert found.get("Warns", set()) == ({"Connection reset (RST)"} if end == "rst" else set())
    # The comment's packet repeats the client's last ACK; the first FIN starts the closing and
    # the second one answers it.
    notes = {"Duplicate ACK (#1)"}
    if end == "fin":
        notes |= {
            "This frame initiates the connection closing",
            "This frame undergoes the connection closing",
        }
    assert found["Notes"] == notes
    assert found["Comments"] == {comment}

    fields = tshark(
        path,
        "-T",
        "fields",
        "-E",
        "separator=|",
        *("-e", "ip.src", "-e", "ipv6.src", "-e", "tcp.srcport"),
        *("-e", "ip.dst", "-e", "ipv6.dst", "-e", "tcp.dstport"),
        *("-e", "tcp.flags.reset", "-e", "frame.comment"),
    )
    rows = [line.split("|") for line in fields.splitlines()]
    ends = {(r[0] or r[1], int(r[2]), r[3] or r[4], int(r[5])) for r in rows}
    assert ends == {(*client, *server), (*server, *client)}
    assert [r[7] for r in rows if r[7]] == [comment]
    resets = [i for i, r in enumerate(rows) if r[6] in ("1", "True")]
    assert resets == ([len(rows) - 1] if end == "rst" else [])


@needs_tshark
def test_tshark_says_nothing_of_zero_checksums_by_default(tmp_path: Path) -> None:
    conv = TcpConversation(*V4, T0, tcp_checksums=False)
    path = tmp_path / "session.pcapng"
    path.write_bytes(write(conv, random_chunks(random.Random(1), 100_000), "fin"))
    found = expert(tshark(path, "-q", "-z", "expert"))
    assert set(found) == {"Notes", "Chats"}
    assert followed(tshark(path, "-q", "-z", "follow,tcp,raw,0"))[0]
