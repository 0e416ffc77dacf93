"""Per-client limits on the real path, default workers: one client holding thousands of
connections does not stop another client (on the same worker) from being served; what the limit
refused is counted in `connections_refused` and the notice names the client; an IPv6 client
rotating through the addresses of its /64 is one client for the connection rate."""

from __future__ import annotations

import ipaddress
import json
import subprocess
import sys
from typing import Any

from tests.integration.conftest import apply_rules, client_json, start_proxy
from tproxy.engine.steering import worker_for
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import PEER_PORT, start_peer_server
from tproxy.lab.topology import Lab, wait_until

WORKERS = 2


def _refused(proxy: ProxyProcess, reason: str) -> int:
    return sum(e["count"] for e in proxy.named("connections_refused") if e["reason"] == reason)


def _notices(proxy: ProxyProcess) -> list[str]:
    return [e["message"] for e in proxy.named("notice") if "per-client limits" in e["message"]]


def test_one_client_holding_thousands_does_not_stop_another(lab: Lab) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    proxy = start_proxy(lab, "--workers", str(WORKERS), "--max-connections-per-client", "100")
    proxy.wait_for(lambda e: e.get("event") == "listening", "every worker", count=WORKERS)
    hog = lab.client.ipv4
    # Another client on the hog's own worker: the limit is the client's, not the worker's.
    other = next(
        ip for i in range(16, 256)
        if worker_for(ip := ipaddress.ip_address(f"198.18.1.{i}"), WORKERS)
        == worker_for(hog, WORKERS)
    )  # fmt: skip
    lab.add_client_address(other)
    server = f"{lab.server.ipv4}:{PEER_PORT}"
    holding = lab.start(
        lab.client,
        [sys.executable, "-m", "tproxy.lab.peers", "hold", server, "--count", "5000",
         "--source", str(hog)],
        stdout=subprocess.PIPE, stdin=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert holding.stdout is not None
        tally = json.loads(holding.stdout.readline())
        assert tally == {"ready": 100}  # its first 100; the other 4,900 were reset
        served = client_json(lab, ["download", server, "--bytes", "1000000",
                                   "--source", str(other)])  # fmt: skip
        assert served["intact"], served
        wait_until(lambda: _refused(proxy, "per_client_connections") == 4900, 10,
                   "4,900 refusals counted")  # fmt: skip
        assert any(f"{hog} " in notice for notice in _notices(proxy)), _notices(proxy)
    finally:
        if holding.stdin is not None:
            holding.stdin.close()
        holding.wait(timeout=30)


# One process connects once from each of 64 addresses of the client's /64, as fast as it can,
# and says how many connections were served, and how long that took.
ROTATE = """
import json, socket, sys, time
server, addresses = sys.argv[1], sys.argv[2:]
start, served = time.monotonic(), 0
for address in addresses:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.bind((address, 0))
    try:
        sock.connect((server, %d))
        sock.sendall(b"ECHO\\nx")
        served += sock.recv(1) == b"x"
    except OSError:
        pass
    finally:
        sock.close()
print(json.dumps({"served": served, "seconds": time.monotonic() - start}))
"""


def test_an_ipv6_client_rotating_addresses_in_its_64_is_one_client(lab: Lab) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    rate = 5
    proxy = start_proxy(lab, "--workers", str(WORKERS), "--new-connections-per-client",
                        f"{rate}/s")  # fmt: skip
    proxy.wait_for(lambda e: e.get("event") == "listening", "every worker", count=WORKERS)
    addresses = [ipaddress.ip_address(f"2001:db8:1::{0x100 + i:x}") for i in range(64)]
    for address in addresses:
        lab.add_client_address(address)
    script = ROTATE % PEER_PORT
    done = lab.run(lab.client, [sys.executable, "-c", script, str(lab.server.ipv6),
                                *map(str, addresses)], timeout_s=120)  # fmt: skip
    result: dict[str, Any] = json.loads(done.stdout)
    # One bucket for the whole /64 (on one worker): its burst and what refilled meanwhile.
    allowed = rate + rate * result["seconds"] + 1
    assert 1 <= result["served"] <= allowed, result
    wait_until(lambda: _refused(proxy, "per_client_rate") >= 64 - allowed, 10, "refusals")
    assert any("2001:db8:1::/64" in notice for notice in _notices(proxy)), _notices(proxy)
    # An IPv4 client meanwhile is its own client.
    served = client_json(lab, ["download", f"{lab.server.ipv4}:{PEER_PORT}", "--bytes", "1000"])
    assert served["intact"], served
