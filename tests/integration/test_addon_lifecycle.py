"""Addons at the edges of tproxy's own life, on the real path with default workers: the sessions
cut when tproxy stops still get their `async def session_end`."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.integration.conftest import apply_rules, start_proxy
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


def test_sessions_cut_at_stop_still_get_their_async_session_end(lab: Lab) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    folder = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-addons-"))
    lab.cleanup_paths.append(folder)
    addon = folder / "late_end.py"
    addon.write_text(LATE_END)
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
