"""Interception beyond the routed default: bridge mode, the box's own traffic, REDIRECT.

Each test runs the real kernel path in its own namespaces (see conftest): the bridge variant of
the lab puts client and server in one subnet with a Linux bridge between them.
"""

from __future__ import annotations

import sys

import pytest

from tests.integration.conftest import (
    apply_rules,
    client_json,
    curl,
    start_proxy,
    tproxy_cli,
)
from tests.integration.test_rules_lifecycle import network_state
from tproxy.lab.services import HTTP_PORT, PEER_PORT, start_nginx, start_peer_server
from tproxy.lab.topology import Lab

MIB = 1024 * 1024


@pytest.fixture
def served_bridge_lab(bridge_lab: Lab) -> Lab:
    start_nginx(bridge_lab, bridge_lab.server, HTTP_PORT)
    start_peer_server(bridge_lab, bridge_lab.server, PEER_PORT)
    return bridge_lab


def _bridge_sysctls(lab: Lab) -> list[str]:
    names = ["net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables"]
    return lab.run(lab.router, ["sysctl", "-n", *names]).stdout.decode().split()


@pytest.mark.parametrize("family", [4, 6])
def test_bridge_mode_proxies_both_ways_with_real_addresses(
    served_bridge_lab: Lab, family: int
) -> None:
    lab = served_bridge_lab
    before = _bridge_sysctls(lab)
    pristine = network_state(lab)
    apply_rules(lab, "--ports", f"{HTTP_PORT},{PEER_PORT}", "--bridge", lab.BRIDGE)
    assert _bridge_sysctls(lab) == ["0", "0"]
    proxy = start_proxy(lab, "--spoof-source")

    code, body = curl(lab, f"http://{lab.server.endpoint(HTTP_PORT, family)}/")
    assert code == 200
    client_ip = lab.client.ipv4 if family == 4 else lab.client.ipv6
    assert body.strip().endswith(f"saw you as {client_ip}")

    peer = str(lab.server.endpoint(PEER_PORT, family))
    up = client_json(lab, ["upload", peer, "--bytes", str(64 * MIB), "--seed", "21"])
    assert up["intact"], up
    assert up["server"]["peer"].rsplit(":", 1)[0].strip("[]") == str(client_ip)
    down = client_json(lab, ["download", peer, "--bytes", str(64 * MIB), "--seed", "22"])
    assert down["intact"], down
    closes = proxy.wait_for(lambda e: e.get("event") == "session_close", "3 closes", count=3)
    assert [e["dst"] for e in closes] == [
        str(lab.server.endpoint(port, family)) for port in (HTTP_PORT, PEER_PORT, PEER_PORT)
    ]
    assert all(e["reason"] == "closed" for e in closes)

    # Remove: plain bridging again. The proxy still runs, and sees nothing any more.
    removed = tproxy_cli(lab, lab.router, "rules", "remove")
    assert "deleted nftables table bridge tproxy_rules" in removed
    assert _bridge_sysctls(lab) == before == ["1", "1"]
    assert network_state(lab) == pristine, "remove left something behind"
    code, body = curl(lab, f"http://{lab.server.endpoint(HTTP_PORT, family)}/")
    assert code == 200 and body.strip().endswith(f"saw you as {client_ip}")
    assert len(proxy.named("session_open")) == 3


def test_bridge_mode_is_refused_cleanly_on_a_bad_bridge(bridge_lab: Lab) -> None:
    lab = bridge_lab
    pristine = lab.run(lab.router, ["nft", "list", "ruleset"]).stdout
    cases = {
        "no-such-br": "there is no interface 'no-such-br'",
        "to-client": "'to-client' is not a Linux bridge",
    }
    for name, message in cases.items():
        err = tproxy_run_error(lab, "rules", "apply", "--ports", "80", "--bridge", name)
        assert message in err
    lab.run(lab.router, ["ip", "addr", "flush", "dev", lab.BRIDGE])
    assert "has no IPv4 address" in tproxy_run_error(
        lab, "rules", "apply", "--ports", "80", "--bridge", lab.BRIDGE
    )
    assert lab.run(lab.router, ["nft", "list", "ruleset"]).stdout == pristine, "half-applied"


def tproxy_run_error(lab: Lab, *args: str) -> str:
    """Run `tproxy ARGS` in the router, expecting a one-line error and status 1."""
    result = lab.run(lab.router, [sys.executable, "-m", "tproxy", *args], check=False)
    assert result.returncode == 1, result
    err = result.stderr.decode()
    assert len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("family", [4, 6])
def test_local_mode_proxies_this_box_without_looping(served_lab: Lab, family: int) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", f"{HTTP_PORT},{PEER_PORT}", "--local")
    proxy = start_proxy(lab, "--spoof-source")
    router_ip = "198.18.2.1" if family == 4 else "2001:db8:2::1"
    for _ in range(3):
        code, body = curl(lab, f"http://{lab.server.endpoint(HTTP_PORT, family)}/", lab.router)
        assert code == 200
        assert body.strip().endswith(f"saw you as {router_ip}")
    peer = str(lab.server.endpoint(PEER_PORT, family))
    up = client_json(lab, ["upload", peer, "--bytes", str(8 * MIB)], host=lab.router)
    assert up["intact"], up
    closes = proxy.wait_for(lambda e: e.get("event") == "session_close", "4 closes", count=4)
    # One session per request: the proxy's own upstream connections (marked) are not
    # intercepted again, or each request would show up twice (or forever).
    assert len(proxy.named("session_open")) == 4
    assert all(str(e["client"]).strip("[]").startswith(router_ip) for e in closes)
    assert all(e["reason"] == "closed" for e in closes)
    # Forwarded traffic is still intercepted as before.
    code, _ = curl(lab, f"http://{lab.server.endpoint(HTTP_PORT, family)}/")
    assert code == 200
    proxy.wait_for(lambda e: e.get("event") == "session_close", "5 closes", count=5)


def test_local_mode_leaves_this_box_own_services_alone(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(PEER_PORT), "--local")
    proxy = start_proxy(lab)
    start_peer_server(lab, lab.router, PEER_PORT)  # a service on the proxy box itself
    up = client_json(lab, ["upload", f"127.0.0.1:{PEER_PORT}", "--bytes", "1000"],
                     host=lab.router)  # fmt: skip
    assert up["intact"], up
    assert proxy.named("session_open") == []


@pytest.mark.parametrize("family", [4, 6])
def test_redirect_mode_finds_the_original_destination(served_lab: Lab, family: int) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", f"{HTTP_PORT},{PEER_PORT}", "--mode", "redirect", "--local")
    proxy = start_proxy(lab, "--mode", "redirect")
    code, body = curl(lab, f"http://{lab.server.endpoint(HTTP_PORT, family)}/")
    assert code == 200
    router_server_side = "198.18.2.1" if family == 4 else "2001:db8:2::1"
    assert body.strip().endswith(f"saw you as {router_server_side}")  # no spoofing here
    peer = str(lab.server.endpoint(PEER_PORT, family))
    up = client_json(lab, ["upload", peer, "--bytes", str(16 * MIB), "--seed", "31"])
    down = client_json(lab, ["download", peer, "--bytes", str(16 * MIB), "--seed", "32"])
    assert up["intact"] and down["intact"], (up, down)
    # The box's own connections too (redirect in the output hook), without a loop.
    code, _ = curl(lab, f"http://{lab.server.endpoint(HTTP_PORT, family)}/", lab.router)
    assert code == 200
    closes = proxy.wait_for(lambda e: e.get("event") == "session_close", "4 closes", count=4)
    assert [e["dst"] for e in closes] == [
        str(lab.server.endpoint(port, family))
        for port in (HTTP_PORT, PEER_PORT, PEER_PORT, HTTP_PORT)
    ]
    assert all(e["reason"] == "closed" for e in closes)
    assert len(proxy.named("session_open")) == 4
    assert "policy routing: none of ours" in tproxy_cli(lab, lab.router, "rules", "show")


def test_redirect_mode_refuses_to_pretend_it_can_spoof(lab: Lab) -> None:
    err = tproxy_run_error(lab, "run", "--mode", "redirect", "--spoof-source")
    assert "not available in redirect mode" in err


def test_a_connection_straight_to_the_redirect_port_is_reset(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(HTTP_PORT), "--mode", "redirect")
    proxy = start_proxy(lab, "--mode", "redirect")
    code, _ = curl(lab, f"http://{lab.router.endpoint(1800)}/")
    assert code == 0  # reset, not relayed to itself
    closes = proxy.wait_for(lambda e: e.get("event") == "session_close", "the close")
    assert closes[0]["reason"] == "loop_refused"
