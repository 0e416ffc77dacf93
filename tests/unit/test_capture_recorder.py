"""The recorder between a relay and its capture file: every chunk and end in order, the cut at
`capture_max_bytes`, a failed write that ends the recording (never raising), and the close."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.unit.pcapng_reader import ACK, FIN, RST, SYN, parse_pcapng
from tproxy.capture.files import CaptureFile, open_capture
from tproxy.capture.pcapng import TcpConversation
from tproxy.capture.recorder import Recorder

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
