"""The recorder between a relay and its capture file: every chunk and end in order, the cut at
`capture_max_bytes`, a failed write that ends the recording (never raising), and the close."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from pathlib import Path

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.pcapng_reader import ACK, FIN, RST, SYN, parse_pcapng
from tproxy.capture.files import CaptureFile, open_capture
from tproxy.capture.pcapng import TcpConversation
from tproxy.capture.recorder import Recorder
from tproxy.core.reasons import CloseReason
from tproxy.core.session import SessionRecord
from tproxy.engine.pipes import PipePool
from tproxy.engine.pump import COPY_CHUNK_BYTES
from tproxy.interception.sockopts import abort_socket, unacknowledged_bytes

from .relay_harness import read_until_end, relay, tcp_pair

CLIENT, SERVER = ("198.18.1.2", 50000), ("198.18.2.2", 443)
NAME = "20261201T041500Z_01kbj9dq70102_198.18.1.2_50000_to_198.18.2.2_443.pcapng"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def _recorder(directory: Path, max_bytes: int = 1 << 20) -> Recorder:
    conversation = TcpConversation(CLIENT, SERVER, 1_800_000_000.0)
    file = open_capture(str(directory), NAME)
    return Recorder(conversation, file, max_bytes, 1_800_000_000.0, clock=Clock())


def _streams(path: str) -> tuple[bytes, bytes]:
    packets = parse_pcapng(Path(path).read_bytes()).packets
    up = b"".join(p.payload for p in packets if (p.src, p.sport) == CLIENT)
    down = b"".join(p.payload for p in packets if (p.src, p.sport) == SERVER)
    return up, down


def test_what_the_relay_shows_is_the_file_and_the_part_becomes_the_final_name(
    tmp_path: Path,
) -> None:
    recorder = _recorder(tmp_path)
    assert os.listdir(tmp_path) == [NAME + ".part"]
    recorder.relayed(True, b"GET / HTTP/1.1\r\n\r\n")
    recorder.relayed(False, memoryview(b"HTTP/1.1 200 OK\r\n\r\nhello"))
    recorder.ended(from_client=True, reset=False)
    recorder.ended(from_client=False, reset=False)
    path = recorder.close(cut=False)
    assert path == str(tmp_path / NAME) and os.listdir(tmp_path) == [NAME]
    assert _streams(path) == (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\nhello")
    packets = parse_pcapng(Path(path).read_bytes()).packets
    assert [p.flags for p in packets[:3]] == [SYN, SYN | ACK, ACK]
    assert [p.flags & FIN for p in packets].count(FIN) == 2
    assert packets[0].ts_us == 1_800_000_000_000_000  # the handshake at the accept
    assert (recorder.error, recorder.truncated_at, recorder.recorded_bytes) == (None, None, 42)


@given(sizes=st.lists(st.integers(0, 5000), max_size=12), limit=st.integers(0, 20000))
def test_the_cut_keeps_exactly_the_first_max_bytes_and_says_where(
    sizes: list[int], limit: int
) -> None:
    with tempfile.TemporaryDirectory() as directory:
        recorder = _recorder(Path(directory), max_bytes=limit)
        sent = {True: b"", False: b""}
        for i, size in enumerate(sizes):
            chunk = bytes([i % 251]) * size
            recorder.relayed(i % 2 == 0, chunk)
            sent[i % 2 == 0] += chunk
        recorder.ended(from_client=True, reset=True)
        path = recorder.close(cut=True)
        assert path is not None
        total = sum(sizes)
        packets = parse_pcapng(Path(path).read_bytes()).packets
        comments = [p.comment for p in packets if p.comment is not None]
        if total > limit:
            assert recorder.truncated_at == limit == recorder.recorded_bytes
            assert comments == [
                f"capture cut at {limit} bytes (capture_max_bytes): the session went on uncaptured"
            ]
            assert not any(p.flags & RST for p in packets)  # the end was not recorded
            up, down = _streams(path)
            assert len(up) + len(down) == limit
        else:
            assert recorder.truncated_at is None and comments == []
            assert _streams(path) == (sent[True], sent[False])
            assert [p.flags & RST for p in packets].count(RST) == 1  # the client's, only


def test_a_cut_session_ends_with_the_servers_rst_unless_a_reset_was_recorded(
    tmp_path: Path,
) -> None:
    recorder = _recorder(tmp_path)
    recorder.relayed(True, b"x")
    path = recorder.close(cut=True)
    assert path is not None
    last = parse_pcapng(Path(path).read_bytes()).packets[-1]
    assert last.flags & RST and (last.src, last.sport) == SERVER


def test_a_failed_write_ends_the_recording_removes_the_part_and_never_raises(
    tmp_path: Path,
) -> None:
    part = tmp_path / (NAME + ".part")
    part.write_bytes(b"")
    full = CaptureFile(str(tmp_path / NAME), str(part), os.open("/dev/full", os.O_WRONLY))
    recorder = Recorder(TcpConversation(CLIENT, SERVER, 0.0), full, 1 << 20, 0.0, clock=Clock())
    assert recorder.error is not None and recorder.error.startswith("ENOSPC")
    recorder.relayed(True, b"more")  # ignored, no exception
    recorder.ended(from_client=True, reset=False)
    assert recorder.close(cut=True) is None
    assert not part.exists() and os.listdir(tmp_path) == []


# --- behind the engine's relay (real loopback TCP, splice pool) ---------------------------------


def _relayed_through_a_recorder(
    directory: Path, max_bytes: int, upstream_resets: bool
) -> tuple[SessionRecord, Recorder, str | None, CloseReason]:
    """1 MiB up (then the client's FIN), 1 MiB down (then the server's FIN, or its reset),
    relayed by the engine's relay with a pipe pool and a recorder; both ends checked intact."""
    up, down = bytes(range(256)) * 4096, bytes(reversed(range(256))) * 4096

    async def scenario() -> tuple[SessionRecord, Recorder, str | None, CloseReason]:
        loop = asyncio.get_running_loop()
        peer_client, proxy_client = await tcp_pair()
        proxy_upstream, peer_upstream = await tcp_pair()
        record = SessionRecord("t", "127.0.0.1:1", "127.0.0.1:2", time.monotonic())
        recorder = _recorder(directory, max_bytes)
        pool = PipePool()
        try:
            relaying = asyncio.ensure_future(
                relay(proxy_client, proxy_upstream, record, pool, recording=recorder)
            )
            client_reads = asyncio.ensure_future(read_until_end(peer_client))
            await loop.sock_sendall(peer_client, up)
            peer_client.shutdown(socket.SHUT_WR)
            assert await read_until_end(peer_upstream) == (up, "eof")
            await loop.sock_sendall(peer_upstream, down)
            if upstream_resets:
                while unacknowledged_bytes(peer_upstream):
                    await asyncio.sleep(0.001)
                abort_socket(peer_upstream)
            else:
                peer_upstream.shutdown(socket.SHUT_WR)
            reason = await relaying
            assert await client_reads == (down, "reset" if upstream_resets else "eof")
            return record, recorder, recorder.close(cut=False), reason
        finally:
            pool.close()
            for sock in (peer_client, proxy_client, proxy_upstream, peer_upstream):
                sock.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(scenario())


@pytest.mark.parametrize("upstream_resets", [False, True])
def test_behind_the_relay_every_byte_and_end_is_recorded_and_nothing_spliced(
    tmp_path: Path, upstream_resets: bool
) -> None:
    record, recorder, path, reason = _relayed_through_a_recorder(tmp_path, 1 << 30, upstream_resets)
    assert (record.relay, record.spliced_bytes) == ("capture", 0)
    assert reason == ("upstream_reset" if upstream_resets else "closed")
    assert path is not None and recorder.truncated_at is None
    up, down = _streams(path)
    assert (up, down) == (bytes(range(256)) * 4096, bytes(reversed(range(256))) * 4096)
    packets = parse_pcapng(Path(path).read_bytes()).packets
    ends = [(p.src, p.sport, p.flags & (FIN | RST)) for p in packets if p.flags & (FIN | RST)]
    if upstream_resets:
        assert ends == [(*CLIENT, FIN), (*SERVER, RST)]
    else:
        assert ends == [(*CLIENT, FIN), (*SERVER, FIN)]


def test_behind_the_relay_a_cut_recording_lets_the_session_splice_again(tmp_path: Path) -> None:
    limit = 300_000
    record, recorder, path, reason = _relayed_through_a_recorder(tmp_path, limit, False)
    assert reason == "closed" and recorder.truncated_at == limit
    assert record.relay == "capture"
    # Past the cut, both directions went back to the zero-copy path.
    assert record.spliced_bytes >= 2 * (1 << 20) - limit - 2 * COPY_CHUNK_BYTES, record
    assert path is not None
    up, down = _streams(path)
    assert up == (bytes(range(256)) * 4096)[:limit] and down == b""
