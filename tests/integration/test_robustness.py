"""Never lose a byte, never hang, never fall over: faults, timeouts, limits, stop and reload.

Each test asserts what a client or server would notice, then that the proxy's accounting is true
afterwards: no live session left and no descriptor leaked.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import apply_rules, client_json, start_proxy
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import PEER_PORT, PeerServer, start_peer_server
from tproxy.lab.topology import Lab, wait_until

MIB = 1024 * 1024


@pytest.fixture
def peer_lab(lab: Lab) -> Iterator[tuple[Lab, PeerServer]]:
    """The lab with the peer server on port 9000, diverted."""
    server = start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    yield lab, server


def settled(proxy: ProxyProcess, baseline_fds: int, sessions: int | None = None) -> None:
    """Every session closed (`sessions` of them, if known), the live count back to 0, no
    descriptor left behind."""
    if sessions is not None:
        proxy.wait_for(
            lambda e: e.get("event") == "session_close", f"{sessions} closes", 30, sessions
        )
    opened = len(proxy.named("session_open"))
    closes = proxy.wait_for(lambda e: e.get("event") == "session_close", "all closes", 30, opened)
    assert len(closes) == opened
    assert closes[-1]["active"] == 0
    wait_until(lambda: proxy.open_fds() == baseline_fds, 10, "descriptors back to baseline")


def peer(lab: Lab) -> str:
    return str(lab.server.endpoint(PEER_PORT))


@pytest.mark.parametrize("client_rate", [0, 4_000_000], ids=["fast-reader", "slow-reader"])
def test_upstream_abort_reaches_the_client_after_every_byte(
    peer_lab: tuple[Lab, PeerServer], client_rate: int
) -> None:
    lab, _ = peer_lab
    proxy = start_proxy(lab, "--spoof-source")
    fds = proxy.open_fds()
    size = 8 * MIB
    got = client_json(lab, ["download", peer(lab), "--abort", "--bytes", str(size),
                            "--rate", str(client_rate)])  # fmt: skip
    assert got["end"] == "ECONNRESET", got
    assert got["received"] == size and got["intact"], got
    settled(proxy, fds, 1)
    assert proxy.named("session_close")[0]["reason"] == "upstream_reset"


def test_client_aborts_mid_upload_20_times(peer_lab: tuple[Lab, PeerServer]) -> None:
    lab, server = peer_lab
    proxy = start_proxy(lab)
    fds = proxy.open_fds()
    for i in range(20):
        sent = client_json(lab, ["upload", peer(lab), "--abort", "--bytes", str(MIB),
                                 "--seed", str(i)])  # fmt: skip
        assert sent["aborted"]
    settled(proxy, fds, 20)
    closes = proxy.named("session_close")
    assert [e["reason"] for e in closes] == ["client_reset"] * 20
    assert max(e["duration_s"] for e in closes) < 2
    wait_until(lambda: len(server.ends()) == 20, 10, "the server to see 20 ends")
    assert [e["end"] for e in server.ends()] == ["reset"] * 20


def test_blackholed_destination_resets_the_client_at_the_connect_timeout(lab: Lab) -> None:
    lab.run(lab.server, ["nft", "-f", "-"], stdin=b"""
        table inet blackhole { chain input { type filter hook input priority 0;
            tcp dport 82 drop; }; }""")  # fmt: skip
    apply_rules(lab, "--ports", "82")
    proxy = start_proxy(lab, "--connect-timeout", "2")
    fds = proxy.open_fds()
    seen = client_json(lab, ["probe", str(lab.server.endpoint(82)), "--timeout", "10"])
    assert seen["read"] == "ECONNRESET", seen
    assert 1.8 <= seen["elapsed_s"] <= 3.5, seen
    settled(proxy, fds, 1)
    assert proxy.named("session_close")[0]["reason"] == "upstream_timeout"


def test_idle_sessions_are_cut_and_talking_ones_are_not(peer_lab: tuple[Lab, PeerServer]) -> None:
    lab, _ = peer_lab
    proxy = start_proxy(lab, "--idle-timeout", "2")
    fds = proxy.open_fds()
    idle = client_json(lab, ["probe", peer(lab), "--send", "ECHO\n", "--timeout", "10"])
    assert idle["read"] == "ECONNRESET", idle
    assert 1.8 <= idle["elapsed_s"] <= 3.5, idle
    talking = client_json(lab, ["chatter", peer(lab), "--interval", "0.5", "--duration", "4"])
    assert talking["survived"], talking
    settled(proxy, fds, 2)
    assert [e["reason"] for e in proxy.named("session_close")] == ["idle_timeout", "closed"]


def test_half_closed_sessions_that_go_silent_are_cut(peer_lab: tuple[Lab, PeerServer]) -> None:
    lab, _ = peer_lab
    proxy = start_proxy(lab, "--half-closed-timeout", "2")
    fds = proxy.open_fds()
    # The client sends FIN; the server never does: without the limit this session lives forever.
    seen = client_json(
        lab, ["probe", peer(lab), "--send", "HOLD\n", "--half-close", "--timeout", "10"]
    )
    assert seen["read"] == "ECONNRESET", seen
    assert 1.8 <= seen["elapsed_s"] <= 3.5, seen
    settled(proxy, fds, 1)
    assert proxy.named("session_close")[0]["reason"] == "half_closed_timeout"


def test_a_slow_reader_does_not_grow_the_proxy(peer_lab: tuple[Lab, PeerServer]) -> None:
    lab, _ = peer_lab
    proxy = start_proxy(lab)
    baseline = proxy.rss_bytes()
    peak = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            peak[0] = max(peak[0], proxy.rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        up = client_json(lab, ["upload", peer(lab), "--bytes", str(128 * MIB),
                               "--rate", "5000000"], timeout_s=120)  # fmt: skip
    finally:
        done.set()
        sampler.join()
    assert up["intact"], up
    growth = peak[0] - baseline
    # The documented ceiling is one 64 KiB chunk per direction per session; allow the
    # allocator and the event loop some slack, far below what buffering the transfer would take.
    assert growth < 4 * MIB, f"the proxy grew by {growth / MIB:.1f} MiB"


def test_3000_concurrent_sessions_all_intact(peer_lab: tuple[Lab, PeerServer]) -> None:
    lab, _ = peer_lab
    proxy = start_proxy(lab)
    fds = proxy.open_fds()
    result = client_json(lab, ["swarm", peer(lab), "--count", "3000", "--bytes", "10000"], 300)
    assert result["outcomes"] == {"intact": 3000}, result
    settled(proxy, fds, 3000)
    assert max(e["active"] for e in proxy.named("session_open")) == 3000


def test_max_connections_resets_the_excess(peer_lab: tuple[Lab, PeerServer]) -> None:
    lab, _ = peer_lab
    proxy = start_proxy(lab, "--max-connections", "50")
    fds = proxy.open_fds()
    result = client_json(lab, ["swarm", peer(lab), "--count", "80"])
    outcomes = result["outcomes"]
    assert outcomes.get("intact") == 50, result
    assert outcomes.get("ECONNRESET", 0) + outcomes.get("EPIPE", 0) == 30, result
    settled(proxy, fds, 50)
    refused = proxy.wait_for(lambda e: e.get("event") == "connections_refused", "the count")
    assert (refused[0]["count"], refused[0]["reason"]) == (30, "max_connections")
    assert refused[0]["detail"] == "max connections (50) reached"


@pytest.mark.parametrize("limit", ["derived", "above-the-descriptors"])
def test_running_out_of_descriptors_degrades_and_recovers(
    peer_lab: tuple[Lab, PeerServer], limit: str
) -> None:
    lab, _ = peer_lab
    args = ["--workers", "1"] + ([] if limit == "derived" else ["--max-connections", "1000"])
    proxy = ProxyProcess(lab, lab.router, args, wrapper=["prlimit", "--nofile=256:256", "--"])
    listening = proxy.wait_listening()
    fds = proxy.open_fds()
    assert listening["nofile_limit"] == 256
    if limit == "derived":
        assert listening["max_connections"] == (256 - 64) // 2
    result = client_json(lab, ["swarm", peer(lab), "--count", "600"], 120)
    outcomes = result["outcomes"]
    assert proxy.proc.poll() is None, "the proxy died"
    resets = outcomes.get("ECONNRESET", 0) + outcomes.get("EPIPE", 0)
    # Every connection got an answer: served or reset, none left hanging to time out.
    assert outcomes.get("intact", 0) + resets == 600, result
    assert resets > 0 and outcomes.get("intact", 0) >= 50, result
    if limit == "derived":
        assert outcomes["intact"] == 96, result
    again = client_json(lab, ["swarm", peer(lab), "--count", "50"])
    assert again["outcomes"] == {"intact": 50}, again
    settled(proxy, fds)


def _start_slow_upload(lab: Lab, size: int, rate: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "tproxy.lab.peers", "upload", peer(lab),
            "--bytes", str(size), "--rate", str(rate)]  # fmt: skip
    return lab.start(lab.client, argv, stdout=subprocess.PIPE)


def test_sigterm_drains_live_sessions_and_refuses_new_ones(
    peer_lab: tuple[Lab, PeerServer],
) -> None:
    lab, _ = peer_lab
    proxy = start_proxy(lab)
    upload = _start_slow_upload(lab, 16 * MIB, 8_000_000)  # about 2 s
    proxy.wait_for(lambda e: e.get("event") == "upstream_connected", "the upload's session")
    proxy.signal(signal.SIGTERM)
    proxy.wait_for(lambda e: "draining 1 live" in e.get("message", ""), "the drain notice")
    refused = client_json(lab, ["probe", peer(lab)])
    assert refused["connect"] == "ECONNREFUSED", refused
    out, _ = upload.communicate(timeout=60)
    assert json.loads(out)["intact"]
    assert proxy.proc.wait(10) == 0
    assert proxy.named("stopped")[0]["sessions_cut"] == 0
    assert proxy.named("session_close")[0]["reason"] == "closed"


def test_sigterm_with_a_short_drain_resets_what_is_left(peer_lab: tuple[Lab, PeerServer]) -> None:
    lab, _ = peer_lab
    proxy = start_proxy(lab, "--drain-timeout", "1")
    upload = _start_slow_upload(lab, 64 * MIB, 2_000_000)  # about 30 s: cannot finish
    proxy.wait_for(lambda e: e.get("event") == "upstream_connected", "the upload's session")
    proxy.signal(signal.SIGTERM)
    assert proxy.proc.wait(5) == 0
    assert proxy.named("stopped")[0]["sessions_cut"] == 1
    assert proxy.named("session_close")[0]["reason"] == "drain_timeout"
    upload.wait(10)
    assert upload.returncode != 0  # the client saw its transfer cut, not completed


def test_sighup_reloads_without_dropping_anything(
    peer_lab: tuple[Lab, PeerServer], tmp_path: Path
) -> None:
    lab, _ = peer_lab
    config = tmp_path / "tproxy.toml"
    config.write_text("idle_timeout = 600\n")
    proxy = start_proxy(lab, "--config", str(config))
    fds = proxy.open_fds()
    upload = _start_slow_upload(lab, 16 * MIB, 8_000_000)
    proxy.wait_for(lambda e: e.get("event") == "upstream_connected", "the upload's session")

    config.write_text("idle_timeout = 'soon'\n")
    proxy.signal(signal.SIGHUP)
    failed = proxy.wait_for(lambda e: "reload failed" in e.get("message", ""), "the refusal")
    assert "idle_timeout must be a number of seconds" in failed[0]["message"]

    config.write_text("idle_timeout = 2\n")
    proxy.signal(signal.SIGHUP)
    proxy.wait_for(lambda e: "reloaded" in e.get("message", ""), "the reload")
    # New sessions are served after the reload, and get its idle timeout.
    idle = client_json(lab, ["probe", peer(lab), "--send", "ECHO\n", "--timeout", "10"])
    assert idle["read"] == "ECONNRESET" and idle["elapsed_s"] <= 3.5, idle
    out, _ = upload.communicate(timeout=60)
    assert json.loads(out)["intact"], "the live transfer was disturbed by the reloads"
    assert proxy.proc.poll() is None
    settled(proxy, fds, 2)


def test_sighup_switches_the_log_format_and_names_what_needs_a_restart(
    peer_lab: tuple[Lab, PeerServer], tmp_path: Path
) -> None:
    lab, _ = peer_lab
    config = tmp_path / "tproxy.toml"
    config.write_text('log_format = "text"\n')
    # No --log-format on the command line: it would win over the file, also on reload.
    proxy = ProxyProcess(lab, lab.router, ["--workers", "1", "--config", str(config)],
                         log_format=None)  # fmt: skip
    proxy.wait_for(lambda e: " listening on " in e.get("line", ""), "tproxy to listen (text)")
    upload = ["upload", peer(lab), "--bytes", "1000"]
    assert client_json(lab, upload)["intact"]
    proxy.wait_for(lambda e: " closed (closed): " in e.get("line", ""), "a text session_close")

    config.write_text('log_format = "json"\nloop = "asyncio"\n')
    proxy.signal(signal.SIGHUP)
    proxy.wait_for(lambda e: "reloaded" in e.get("message", ""), "the reload, in JSON")
    assert client_json(lab, upload)["intact"]
    proxy.wait_for(lambda e: e.get("event") == "session_close", "a JSON session_close")

    events = proxy.snapshot()
    notice = next(i for i, e in enumerate(events) if e.get("event") == "notice")
    # Text until the reload, JSON from its first notice on: one notice naming loop, the reload,
    # then the next session's lines.
    assert {e["event"] for e in events[:notice]} == {"unparsed"}
    assert [e["event"] for e in events[notice:]] == [
        "notice", "notice", "session_open", "upstream_connected", "session_close",
    ]  # fmt: skip
    assert events[notice]["message"] == "reload: loop changes only on restart; kept as is"
    assert not any("loop" in str(e.get("line")) for e in events[:notice])
    assert proxy.stop() == 0
