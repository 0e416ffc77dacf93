"""The addon relay on the real path, default workers, real clients: a claimed session behind a
slow reader keeps the workers' memory flat and arrives intact; a byte hook that raises resets
its session only; the sessions cut when tproxy stops still get their `async def session_end`.
(The examples' own tests: test_addon_examples.py.)"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tests.integration.conftest import apply_rules, client_json, start_proxy
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import PEER_PORT, start_peer_server
from tproxy.lab.topology import Lab

MIB = 1024 * 1024

LATE_END = """
import asyncio
from pathlib import Path


async def session_end(session):
    await asyncio.sleep(0.3)  # still running when the worker stops
    with Path(__file__).with_name("ends.log").open("a") as log:
        log.write(f"{session.id} {session.reason}\\n")
"""


CLAIM_ALL = """
def session_start(session):
    session.claim()


def client_data(session, data):
    if data.startswith(b"BOOM"):
        raise KeyError("boom")
    return data


def server_data(session, data):
    return data
"""


def _addon(lab: Lab, name: str, text: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-addons-"))
    lab.cleanup_paths.append(folder)
    path = folder / name
    path.write_text(text)
    return path


def _tree_rss(proxy: ProxyProcess) -> int:
    """The resident memory of the proxy and its workers."""
    pids, total = [proxy.proc.pid], 0
    while pids:
        pid = pids.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue  # gone meanwhile
        kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
        total += int(kib) * 1024
        pids += [int(child) for child in children]
    return total


def test_a_claimed_session_behind_a_slow_reader_keeps_memory_flat_and_arrives_intact(
    lab: Lab,
) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    addon = _addon(lab, "claim_all.py", CLAIM_ALL)
    proxy = start_proxy(lab, "--addon", str(addon), default_workers=True)
    baseline = _tree_rss(proxy)
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], _tree_rss(proxy))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        down = client_json(lab, ["download", str(lab.server.endpoint(PEER_PORT)),
                                 "--bytes", str(64 * MIB), "--rate", "8000000"],
                           timeout_s=120)  # fmt: skip
    finally:
        done.set()
        sampler.join()
    assert down["intact"], down
    growth = peak[0] - baseline
    # One 64 KiB chunk per direction per session, plus the allocator's slack: far below the
    # megabytes a relay reading ahead of the client would hold.
    assert growth < 4 * MIB, f"the proxy grew by {growth / MIB:.1f} MiB"
    close = proxy.wait_for(lambda e: e.get("event") == "session_close", "the close")[0]
    assert (close["relay"], close["addons"], close["spliced_bytes"]) == (
        "addon", [str(addon)], 0,
    )  # fmt: skip
    assert close["bytes_down"] == 64 * MIB and close["reason"] == "closed"


def test_a_byte_hook_that_raises_resets_its_session_and_the_next_works(lab: Lab) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    addon = _addon(lab, "claim_all.py", CLAIM_ALL)
    proxy = start_proxy(lab, "--addon", str(addon), default_workers=True)
    peer = str(lab.server.endpoint(PEER_PORT))
    boom = client_json(lab, ["probe", peer, "--send", "BOOM\n", "--timeout", "5"])
    assert boom["read"] == "ECONNRESET", boom
    fine = client_json(lab, ["upload", peer, "--bytes", str(4 * MIB)])
    assert fine["intact"], fine
    closes = proxy.wait_for(lambda e: e.get("event") == "session_close", "2 closes", count=2)
    assert sorted(c["reason"] for c in closes) == ["addon_error", "closed"]
    failed = proxy.named("session_error")
    assert [(f["addon"], f["hook"], f["error"]) for f in failed] == [
        (str(addon), "client_data", "KeyError: 'boom'"),
    ]  # fmt: skip
    assert proxy.proc.poll() is None


def test_sessions_cut_at_stop_still_get_their_async_session_end(lab: Lab) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    addon = _addon(lab, "late_end.py", LATE_END)
    proxy = start_proxy(lab, "--addon", str(addon), "--drain-timeout", "0.2",
                        default_workers=True)  # fmt: skip
    peer = str(lab.server.endpoint(PEER_PORT))
    argv = [sys.executable, "-m", "tproxy.lab.peers", "upload", peer,
            "--bytes", str(64 * MIB), "--rate", str(8_000_000)]  # fmt: skip
    upload = lab.start(lab.client, argv, stdout=subprocess.PIPE)
    opened = proxy.wait_for(lambda e: e.get("event") == "upstream_connected", "the session")
    proxy.signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0
    upload.kill()
    upload.wait()
    closes = proxy.named("session_close")
    assert [(c["session"], c["reason"]) for c in closes] == [
        (opened[0]["session"], "drain_timeout")
    ]
    assert addon.with_name("ends.log").read_text().split() == [
        opened[0]["session"], "drain_timeout",
    ]  # fmt: skip
