"""Captures on the real path (issue 11): what a capturing rule relayed, read back by tshark byte
for byte with the original addresses; a reset that ends the file with RST; the per-session cut;
the directory's total and age limits with two workers; files that are 0600 and only ever whole
under their final name; a full disk that ends the capture and not the session. Default workers
throughout: the captures of both workers land in one directory."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import (
    apply_rules,
    client_json,
    client_per_worker,
    curl,
    start_proxy,
)
from tests.unit.pcapng_reader import ACK, FIN, RST, SYN, Packet, parse_pcapng
from tests.unit.test_capture_pcapng import expert, followed, tshark
from tproxy.capture.files import is_capture_name
from tproxy.lab.peers import pattern_chunks
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import HTTP_PORT, PEER_PORT
from tproxy.lab.topology import Lab

MIB = 1 << 20

CAPTURE_PEER = f"""
default = "allow"

[[rule]]
name = "capture-peer"
ports = [{PEER_PORT}]
action = "allow"
capture = true
"""


def _directory(lab: Lab, name: str = "captures") -> Path:
    """A fresh capture directory, 0700 as the README tells operators to make it."""
    base = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-capture-"))
    lab.cleanup_paths.append(base)
    path = base / name
    path.mkdir(mode=0o700)
    return path


def _start(lab: Lab, directory: Path, *args: str, policy: str | None = CAPTURE_PEER,
           umask: int | None = None) -> ProxyProcess:  # fmt: skip
    """`tproxy run` with the default workers, capturing into `directory` (under `policy`'s
    capture rule, unless None), its umask `umask` when given."""
    argv = ["--capture-dir", str(directory), *args]
    if policy is not None:
        path = directory.parent / "policy.toml"
        path.write_text(policy)
        argv += ["--policy", str(path)]
    if umask is None:
        return start_proxy(lab, *argv, default_workers=True)
    wrapper = ["sh", "-c", f'umask {umask:03o}; exec "$@"', "sh"]
    proxy = ProxyProcess(lab, lab.router, argv, wrapper=wrapper)
    proxy.wait_for(lambda e: e.get("event") == "listening", "every worker",
                   count=os.cpu_count() or 1)  # fmt: skip
    return proxy


def _closes(proxy: ProxyProcess, count: int) -> list[dict[str, Any]]:
    return proxy.wait_for(lambda e: e.get("event") == "session_close", f"{count} closes",
                          count=count)  # fmt: skip


def _close_to(closes: list[dict[str, Any]], port: int) -> dict[str, Any]:
    [close] = [e for e in closes if e["dst"].endswith(f":{port}")]
    return close


def _capture_of(close: dict[str, Any]) -> Path:
    assert close["capture"] is not None, close
    path = Path(close["capture"])
    assert path.name.endswith(".pcapng") and is_capture_name(path.name), path
    return path


def _packets(path: Path) -> list[Packet]:
    return parse_pcapng(path.read_bytes()).packets


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pattern(seed: int, size: int) -> bytes:
    return b"".join(pattern_chunks(seed, size))


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _assert_clean(path: Path) -> None:
    """tshark reads the file without a complaint and its expert finds nothing wrong with it."""
    found = expert(tshark(path, "-q", "-z", "expert"))
    assert not found.get("Errors") and not found.get("Warns"), found


@pytest.mark.parametrize("family", [4, 6])
def test_4_mib_each_way_tshark_follows_both_directions_with_the_original_addresses(
    served_lab: Lab, family: int
) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", f"{HTTP_PORT},{PEER_PORT}")
    directory = _directory(lab)
    proxy = _start(lab, directory, "--spoof-source")
    peer = str(lab.server.endpoint(PEER_PORT, family))
    up = client_json(lab, ["upload", peer, "--bytes", str(4 * MIB), "--seed", "31"])
    assert up["intact"], up
    down = client_json(lab, ["download", peer, "--bytes", str(4 * MIB), "--seed", "32"])
    assert down["intact"], down
    code, _ = curl(lab, f"http://{lab.server.endpoint(HTTP_PORT, family)}/")  # not captured
    assert code == 200
    closes = _closes(proxy, 3)

    web = _close_to(closes, HTTP_PORT)
    assert (web["capture"], web["relay"]) == (None, "splice"), web
    [upload] = [e for e in closes if e["bytes_up"] > MIB]
    [download] = [e for e in closes if e["bytes_down"] > MIB]
    for close in (upload, download):
        assert (close["rule"], close["relay"], close["spliced_bytes"]) == (
            "capture-peer", "capture", 0), close  # fmt: skip
        assert close["capture_truncated_at"] is None
    files = sorted(p.name for p in directory.iterdir())
    assert files == sorted([_capture_of(upload).name, _capture_of(download).name])

    # Upload: the client sent the request line and the stream; the server hashed the stream
    # and answered with its verdict, after the client's FIN.
    path = _capture_of(upload)
    _assert_clean(path)
    sent, answered = followed(tshark(path, "-q", "-z", "follow,tcp,raw,0"))
    assert sent[:7] == b"UPLOAD\n" and len(sent) == 7 + 4 * MIB
    assert _sha256(sent[7:]) == up["server"]["sha256"] == up["sent_sha256"]
    assert json.loads(answered) == up["server"] and len(answered) == up["reply_bytes"]
    # Download: the request line up, the stream down, as the client hashed it.
    path = _capture_of(download)
    _assert_clean(path)
    asked, received = followed(tshark(path, "-q", "-z", "follow,tcp,raw,0"))
    assert asked == b"DOWNLOAD %d 32\n" % (4 * MIB)
    assert _sha256(received) == down["received_sha256"] == _sha256(_pattern(32, 4 * MIB))

    # The packets carry the original addresses: the client's, and the destination it dialled.
    for close in (upload, download):
        packets = _packets(_capture_of(close))
        client, server = _endpoint(close["client"]), _endpoint(close["dst"])
        assert server == _endpoint(peer)
        assert {(p.src, p.sport, p.dst, p.dport) for p in packets} == {
            (*client, *server), (*server, *client)}  # fmt: skip
        assert {p.version for p in packets} == {family}
        assert [p.flags for p in packets[:3]] == [SYN, SYN | ACK, ACK]
        # Both sides' FINs, as it happened: the session closed cleanly.
        assert sum(1 for p in packets if p.flags & FIN) == 2
        assert not any(p.flags & RST for p in packets)
        fields = tshark(_capture_of(close), "-T", "fields", "-e", "ip.src" if family == 4
                        else "ipv6.src", "-e", "tcp.srcport", "-c", "1")  # fmt: skip
        assert fields.split() == [client[0], str(client[1])]


def test_a_reset_session_ends_its_file_with_the_rst_of_the_side_that_reset(
    served_lab: Lab,
) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(PEER_PORT))
    directory = _directory(lab)
    proxy = _start(lab, directory)
    peer = str(lab.server.endpoint(PEER_PORT))
    # The server sends 1 MiB, waits until it is acknowledged, and resets.
    down = client_json(lab, ["download", peer, "--bytes", str(MIB), "--seed", "5", "--abort"])
    assert down["end"] == "ECONNRESET" and down["intact"], down
    [close] = _closes(proxy, 1)
    assert close["reason"] == "upstream_reset", close
    path = _capture_of(close)
    found = expert(tshark(path, "-q", "-z", "expert"))
    assert not found.get("Errors") and found.get("Warns") == {"Connection reset (RST)"}, found
    packets = _packets(path)
    server = _endpoint(close["dst"])
    assert packets[-1].flags & RST and (packets[-1].src, packets[-1].sport) == server
    assert sum(1 for p in packets if p.flags & RST) == 1
    _, received = followed(tshark(path, "-q", "-z", "follow,tcp,raw,0"))
    assert _sha256(received) == down["received_sha256"]

    # The client resets in the middle of its upload.
    client_json(lab, ["upload", peer, "--bytes", str(MIB), "--seed", "6", "--abort"])
    close = _closes(proxy, 2)[1]
    assert close["reason"] == "client_reset", close
    packets = _packets(_capture_of(close))
    client = _endpoint(close["client"])
    assert packets[-1].flags & RST and (packets[-1].src, packets[-1].sport) == client


def test_capture_max_bytes_cuts_the_file_says_where_and_the_session_goes_on(
    served_lab: Lab,
) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(PEER_PORT))
    directory = _directory(lab)
    proxy = _start(lab, directory, "--capture-max-bytes", "100K")
    peer = str(lab.server.endpoint(PEER_PORT))
    up = client_json(lab, ["upload", peer, "--bytes", str(MIB), "--seed", "7"])
    assert up["intact"], up  # the session went on, whole, after the cut
    [close] = _closes(proxy, 1)
    assert close["capture_truncated_at"] == 100 * 1024
    assert close["bytes_up"] == 7 + MIB and close["relay"] == "capture"
    path = _capture_of(close)
    _assert_clean(path)
    sent, answered = followed(tshark(path, "-q", "-z", "follow,tcp,raw,0"))
    assert (len(sent), answered) == (100 * 1024, b"")
    assert sent == (b"UPLOAD\n" + _pattern(7, MIB))[: 100 * 1024]
    comments = tshark(path, "-T", "fields", "-e", "frame.comment", "-Y", "frame.comment")
    assert comments.strip() == (
        "capture cut at 102400 bytes (capture_max_bytes): the session went on uncaptured"
    )
    assert "captured to" not in close.get("text", "")


def _slow_upload(lab: Lab, peer: str, size: int, rate: int) -> subprocess.Popen[bytes]:
    """A capturing session that stays open a while: the server reads `rate` bytes/s."""
    argv = [sys.executable, "-m", "tproxy.lab.peers", "upload", peer, "--bytes", str(size),
            "--rate", str(rate), "--seed", "9"]  # fmt: skip
    return lab.start(lab.client, argv, stdout=subprocess.PIPE)


def _parts(directory: Path) -> list[str]:
    return [name for name in os.listdir(directory) if name.endswith(".part")]


def _captures_bytes(directory: Path) -> int:
    return sum((directory / n).stat().st_size for n in os.listdir(directory) if is_capture_name(n))


def test_the_total_limit_deletes_the_oldest_finished_files_never_one_being_written(
    served_lab: Lab,
) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(PEER_PORT))
    directory = _directory(lab)
    operator_file = directory / "notes.pcapng"  # not named as a capture: never counted or pruned
    operator_file.write_bytes(b"x" * 300_000)
    limit = 600 * 1024
    proxy = _start(lab, directory, "--capture-max-total", "600K")
    peer = str(lab.server.endpoint(PEER_PORT))
    # One session stays open for 10 s, its .part growing to about 200 KB.
    slow = _slow_upload(lab, peer, 200_000, 20_000)
    deadline_at = time.monotonic() + 10
    while not _parts(directory) and time.monotonic() < deadline_at:
        time.sleep(0.05)
    [part] = _parts(directory)
    # Six finished captures of about 200 KB each, from every worker (one client address each).
    sources = list(client_per_worker(lab, os.cpu_count() or 1).values())
    for seed in range(6):
        source = str(sources[seed % len(sources)])
        up = client_json(lab, ["upload", peer, "--bytes", "200000", "--seed", str(100 + seed),
                               "--source", source])  # fmt: skip
        assert up["intact"], up
    closes = _closes(proxy, 6)
    finished = [_capture_of(e).name for e in closes]
    assert len({e["worker"] for e in closes}) == (os.cpu_count() or 1) > 1, "not every worker"
    # The pruner runs every 5 seconds: wait for it to bring the directory within the limit.
    deadline_at = time.monotonic() + 15
    while _captures_bytes(directory) > limit and time.monotonic() < deadline_at:
        time.sleep(0.25)
    names = set(os.listdir(directory))
    assert _captures_bytes(directory) <= limit, names
    assert part in names, "the pruner deleted a capture still being written"
    assert operator_file.name in names
    kept = [name for name in finished if name in names]
    assert 1 <= len(kept) < len(finished)
    assert kept == finished[len(finished) - len(kept) :], "not the oldest were deleted"
    assert slow.wait(60) == 0
    pruned = [
        e["message"] for e in proxy.named("notice") if e["message"].startswith("capture: pruned")
    ]
    deleted = sum(int(m.split()[2]) for m in pruned)
    assert deleted == len(finished) - len(kept), pruned


def test_the_age_limit_deletes_finished_files_once_old_never_one_being_written(
    served_lab: Lab,
) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(PEER_PORT))
    directory = _directory(lab)
    proxy = _start(lab, directory, "--capture-max-age", "2s")
    peer = str(lab.server.endpoint(PEER_PORT))
    for seed in range(4):
        assert client_json(lab, ["upload", peer, "--bytes", "1000", "--seed", str(seed)])["intact"]
    finished = {Path(_capture_of(e)).name for e in _closes(proxy, 4)}
    assert finished <= set(os.listdir(directory))
    slow = _slow_upload(lab, peer, 300_000, 20_000)  # open for 15 s: older than 2 s while open
    deadline_at = time.monotonic() + 20
    while set(os.listdir(directory)) & finished and time.monotonic() < deadline_at:
        time.sleep(0.25)
    names = set(os.listdir(directory))
    assert not names & finished, "finished captures older than the age limit were kept"
    [part] = _parts(directory)
    assert slow.wait(60) == 0
    [close] = [e for e in _closes(proxy, 5) if e["bytes_up"] > 100_000]
    assert Path(_capture_of(close)).name == part.removesuffix(".part")


def _watch(directory: Path, stop: threading.Event, seen: dict[str, tuple[int, int]]) -> None:
    """Until `stop`: each name in `directory`, with its size and mode the first time seen."""
    while not stop.is_set():
        for name in os.listdir(directory):
            if name in seen:
                continue
            try:
                info = os.stat(directory / name)
            except FileNotFoundError:  # a .part renamed between listdir and stat
                continue
            seen[name] = (info.st_size, stat.S_IMODE(info.st_mode))
        time.sleep(0.001)


def test_files_are_0600_whatever_the_umask_and_only_ever_whole_under_their_final_name(
    served_lab: Lab,
) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(PEER_PORT))
    directory = _directory(lab)
    proxy = _start(lab, directory, "--capture-all", policy=None, umask=0)
    stop, seen = threading.Event(), dict[str, tuple[int, int]]()
    watcher = threading.Thread(target=_watch, args=(directory, stop, seen), daemon=True)
    watcher.start()
    try:
        peer = str(lab.server.endpoint(PEER_PORT))
        for seed in range(3):
            up = client_json(lab, ["upload", peer, "--bytes", str(2 * MIB), "--seed", str(seed)])
            assert up["intact"], up
        closes = _closes(proxy, 3)
        time.sleep(0.1)
    finally:
        stop.set()
        watcher.join(5)
    finals = {_capture_of(e).name for e in closes}
    assert set(os.listdir(directory)) == finals
    parts = {name for name in seen if name.endswith(".part")}
    assert parts == {name + ".part" for name in finals}, seen  # written as .part first
    for name, (size, mode) in seen.items():
        assert mode == 0o600, (name, oct(mode))
        if name in finals:  # first seen already whole: as big as it ends up, and readable
            assert size == (directory / name).stat().st_size, name
            parse_pcapng((directory / name).read_bytes())
    for name in finals:
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600


def test_a_full_disk_ends_the_capture_not_the_session(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(PEER_PORT))
    directory = _directory(lab)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tproxy-test-full",
                    str(directory)], check=True)  # fmt: skip
    try:
        proxy = _start(lab, directory)
        peer = str(lab.server.endpoint(PEER_PORT))
        up = client_json(lab, ["upload", peer, "--bytes", str(2 * MIB), "--seed", "8"])
        assert up["intact"], up
        [close] = _closes(proxy, 1)
        assert (close["reason"], close["capture"], close["relay"]) == (
            "closed", None, "capture"), close  # fmt: skip
        notices = [e["message"] for e in proxy.named("notice")]
        assert any(re.search(r"capture ended: ENOSPC", m) for m in notices), notices
        assert os.listdir(directory) == []  # the cut .part was removed: the space is back
        # The next session is captured again, into the space given back.
        down = client_json(lab, ["download", peer, "--bytes", "50000", "--seed", "9"])
        assert down["intact"]
        close = _closes(proxy, 2)[1]
        assert _capture_of(close).exists()
        proxy.stop()
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)
