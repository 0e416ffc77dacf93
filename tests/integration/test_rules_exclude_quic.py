"""`rules apply --exclude` and `--block-quic` on the real kernel path, in namespaces.

What a user sees: a connection to (or from) an excluded network is routed past the proxy (no
session in its log, the server sees the client's own address, though the proxy runs without
--spoof-source); everything else is still proxied (the server sees the router). With
--block-quic a connected UDP socket sending to a diverted port gets ECONNREFUSED at once, while
other UDP, and UDP to excluded networks, still reaches the server's echo; `rules remove` leaves
nothing of it.
"""

from __future__ import annotations

import ipaddress
import json
import sys
from collections.abc import Iterable

import pytest

from tests.integration.conftest import apply_rules, start_proxy, tproxy_cli
from tests.integration.test_rules_lifecycle import network_state
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import HTTP_PORT, start_nginx
from tproxy.lab.topology import Host, Lab, wait_until

# A second network behind the server (198.18.4.0/24, 2001:db8:4::/64), routed by the router:
# one server, two destinations, one of them excluded.
OTHER_V4, OTHER_V6 = "198.18.4.2", "2001:db8:4::2"
# A second client address, excluded as a plain address (a /32 and a /128).
EXTRA_V4, EXTRA_V6 = "198.18.1.77", "2001:db8:1::77"
QUIC_PORT, OTHER_UDP_PORT = 443, 9999

UDP_ECHO = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for target in sys.argv[1:]:  # bound to each address: a reply must come from where it went
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, int(port)))
    sel.register(s, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        data, peer = key.fileobj.recvfrom(2048)
        key.fileobj.sendto(b"echo " + data, peer)
"""

UDP_PROBE = """
import json, socket, sys
results = []
for target in sys.argv[1:]:
    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.connect((host, int(port)))
        try:
            s.send(b"quic?")
        except PermissionError:  # dropped in this box's own output hook
            results.append("eperm")
            continue
        try:
            results.append("echo" if s.recv(2048) == b"echo quic?" else "garbled")
        except ConnectionRefusedError:
            results.append("refused")
        except TimeoutError:
            results.append("timeout")
print(json.dumps(results))
"""


def add_server_network(lab: Lab) -> None:
    """OTHER_V4 / OTHER_V6 on the server, routed to it by the router."""
    lab.run(lab.server, ["ip", "addr", "add", f"{OTHER_V4}/24", "dev", "eth0"])
    lab.run(lab.server, ["ip", "-6", "addr", "add", f"{OTHER_V6}/64", "dev", "eth0", "nodad"])
    lab.run(lab.router, ["ip", "route", "add", "198.18.4.0/24", "via", str(lab.server.ipv4)])
    lab.run(lab.router, ["ip", "-6", "route", "add", "2001:db8:4::/64", "via",
                         str(lab.server.ipv6)])  # fmt: skip


def fetch(lab: Lab, address: str, source: str | None = None) -> str:
    """GET http://ADDRESS/ from the client (from `source`); return who the server saw."""
    host = f"[{address}]" if ":" in address else address
    argv = ["curl", "-sS", "--max-time", "10", f"http://{host}:{HTTP_PORT}/"]
    if source is not None:
        argv[1:1] = ["--interface", source]
    body = lab.run(lab.client, argv).stdout.decode()
    assert body.startswith("hello from the server; it saw you as "), body
    return body.rsplit(" ", 1)[1].strip()


def start_udp_echo(lab: Lab, host: Host, targets: Iterable[str]) -> None:
    """A UDP echo in `host` on each IP:PORT of `targets`."""
    wanted = list(targets)
    lab.start(host, [sys.executable, "-c", UDP_ECHO, *wanted])

    def listening() -> bool:
        out = lab.run(host, ["ss", "-Hlun"]).stdout.decode()
        return all(f"{target} " in out for target in wanted)

    wait_until(listening, 10, "the UDP echo to listen")


def udp_probe(lab: Lab, *targets: str, host: Host | None = None) -> list[str]:
    """Send one datagram from a connected UDP socket in the client (or `host`) to each
    IP:PORT."""
    result = lab.run(host or lab.client, [sys.executable, "-c", UDP_PROBE, *targets])
    verdicts: list[str] = json.loads(result.stdout)
    return verdicts


def endpoints(address: str) -> str:
    """ADDRESS:80 as the proxy's log writes an endpoint."""
    return f"[{address}]:{HTTP_PORT}" if ":" in address else f"{address}:{HTTP_PORT}"


def sessions_to(proxy: ProxyProcess, address: str) -> list[str]:
    return [e["dst"] for e in proxy.named("session_open") if e["dst"] == endpoints(address)]


def test_excluded_networks_are_routed_past_the_proxy(lab: Lab) -> None:
    add_server_network(lab)
    lab.add_client_address(ipaddress.ip_address(EXTRA_V4))
    lab.add_client_address(ipaddress.ip_address(EXTRA_V6))
    start_nginx(lab, lab.server)
    apply_rules(lab, "--ports", "80", "--exclude", "198.18.2.0/24", "--exclude", "2001:db8:2::/64",
                "--exclude", EXTRA_V4, "--exclude", EXTRA_V6)  # fmt: skip
    # Without --spoof-source: a proxied connection reaches the server from the router.
    proxy = start_proxy(lab, default_workers=True)
    for family, client, router, extra, other in (
        (4, str(lab.client.ipv4), "198.18.2.1", EXTRA_V4, OTHER_V4),
        (6, str(lab.client.ipv6), "2001:db8:2::1", EXTRA_V6, OTHER_V6),
    ):
        server = str(lab.server.ipv4 if family == 4 else lab.server.ipv6)
        # (IPv6 would pick the newest address as the source: name it each time.)
        assert fetch(lab, server, client) == client, f"IPv{family}: to an excluded network"
        assert fetch(lab, other, extra) == extra, f"IPv{family}: from an excluded address"
        assert fetch(lab, other, client) == router, f"IPv{family}: not excluded, so proxied"
        closed = endpoints(other)
        proxy.wait_for(
            lambda e: e.get("event") == "session_close" and e["dst"] == closed,  # noqa: B023
            f"the IPv{family} session's close",
        )
        assert sessions_to(proxy, server) == []
        assert len(sessions_to(proxy, other)) == 1  # not the one from the excluded address


def test_block_quic_rejects_udp_to_the_diverted_ports_only(lab: Lab) -> None:
    add_server_network(lab)
    targets = [f"{lab.server.ipv4}:{QUIC_PORT}", f"[{lab.server.ipv6}]:{QUIC_PORT}",
               f"{lab.server.ipv4}:{OTHER_UDP_PORT}", f"[{lab.server.ipv6}]:{OTHER_UDP_PORT}",
               f"{OTHER_V4}:{QUIC_PORT}", f"[{OTHER_V6}]:{QUIC_PORT}"]  # fmt: skip
    start_udp_echo(lab, lab.server, targets)
    assert udp_probe(lab, *targets) == ["echo"] * 6  # the echo answers on every port
    pristine = network_state(lab)

    apply_rules(lab, "--ports", "80,443", "--block-quic", "--exclude", "198.18.4.0/24",
                "--exclude", "2001:db8:4::/64")  # fmt: skip
    start_proxy(lab)  # the block works with the proxy up (and down: it is nftables alone)
    assert udp_probe(lab, *targets) == [
        "refused",
        "refused",  # QUIC to a diverted port: ICMP port unreachable, at once
        "echo",
        "echo",  # other UDP passes
        "echo",
        "echo",  # and the excluded network is not blocked either
    ]
    shown = tproxy_cli(lab, lab.router, "rules", "show")
    assert "excluded from diversion: 198.18.4.0/24, 2001:db8:4::/64" in shown
    assert "QUIC: blocked: UDP to 80, 443 is rejected" in shown

    tproxy_cli(lab, lab.router, "rules", "remove")
    assert "tproxy_rules" not in lab.run(lab.router, ["nft", "list", "ruleset"]).stdout.decode()
    assert network_state(lab) == pristine
    assert udp_probe(lab, *targets) == ["echo"] * 6


def test_block_quic_with_local_covers_this_box_too(lab: Lab) -> None:
    targets = [f"{lab.server.ipv4}:{QUIC_PORT}", f"[{lab.server.ipv6}]:{QUIC_PORT}",
               f"{lab.server.ipv4}:{OTHER_UDP_PORT}"]  # fmt: skip
    start_udp_echo(lab, lab.server, targets)
    apply_rules(lab, "--ports", "443", "--block-quic")
    assert udp_probe(lab, *targets, host=lab.router) == ["echo"] * 3  # forwarded traffic only
    apply_rules(lab, "--ports", "443", "--block-quic", "--local")
    # This box's own programs: the output hook's reject drops the datagram, so send() itself
    # fails with EPERM, as immediately as ECONNREFUSED.
    assert udp_probe(lab, *targets, host=lab.router) == ["eperm", "eperm", "echo"]
    assert udp_probe(lab, *targets) == ["refused", "refused", "echo"]


def test_block_quic_on_a_bridge(bridge_lab: Lab) -> None:
    lab = bridge_lab
    targets = [f"{lab.server.ipv4}:{QUIC_PORT}", f"[{lab.server.ipv6}]:{QUIC_PORT}",
               f"{lab.server.ipv4}:{OTHER_UDP_PORT}",
               f"[{lab.server.ipv6}]:{OTHER_UDP_PORT}"]  # fmt: skip
    start_udp_echo(lab, lab.server, targets)
    apply_rules(lab, "--ports", "443", "--bridge", lab.BRIDGE, "--block-quic")
    assert udp_probe(lab, *targets) == ["refused", "refused", "echo", "echo"]
    # Excluding the server: its UDP is not even lifted off the bridge.
    apply_rules(lab, "--ports", "443", "--bridge", lab.BRIDGE, "--block-quic",
                "--exclude", str(lab.server.ipv4), "--exclude", str(lab.server.ipv6))  # fmt: skip
    assert udp_probe(lab, *targets) == ["echo"] * 4
    tproxy_cli(lab, lab.router, "rules", "remove")
    assert lab.run(lab.router, ["nft", "list", "ruleset"]).stdout.decode().strip() == ""


def test_excluding_on_a_bridge_leaves_the_server_bridged(bridge_lab: Lab) -> None:
    lab = bridge_lab
    second_v4, second_v6 = "198.18.3.4", "2001:db8:3::4"
    lab.run(lab.server, ["ip", "addr", "add", f"{second_v4}/24", "dev", "eth0"])
    lab.run(lab.server, ["ip", "-6", "addr", "add", f"{second_v6}/64", "dev", "eth0", "nodad"])
    start_nginx(lab, lab.server)
    apply_rules(lab, "--ports", "80", "--bridge", lab.BRIDGE, "--exclude", str(lab.server.ipv4),
                "--exclude", str(lab.server.ipv6))  # fmt: skip
    proxy = start_proxy(lab)
    for client, bridge, server, second in (
        (lab.client.ipv4, lab.router.ipv4, lab.server.ipv4, second_v4),
        (lab.client.ipv6, lab.router.ipv6, lab.server.ipv6, second_v6),
    ):
        assert fetch(lab, str(server)) == str(client)
        assert fetch(lab, second) == str(bridge)
        assert sessions_to(proxy, str(server)) == []


@pytest.mark.parametrize(
    "args",
    [["--exclude", "198.18.2.1/24"], ["--exclude", "2001:db8:2::1/64"],
     ["--exclude", "198.18.2.0/33"], ["--exclude", "server"],
     ["--exclude", "198.18.2.0/24", "--exclude", "nope", "--block-quic"]],
)  # fmt: skip
def test_a_bad_exclusion_is_one_line_status_2_and_applies_nothing(
    lab: Lab, args: list[str]
) -> None:
    before = network_state(lab)
    argv = [sys.executable, "-m", "tproxy", "rules", "apply", "--ports", "443", *args]
    result = lab.run(lab.router, argv, check=False)
    assert result.returncode == 2
    err = result.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "--exclude" in err and "invalid network" in err, err
    if "/24" in args[1] and args[1] != "198.18.2.0/24":
        assert "did you mean 198.18.2.0/24 (the network)" in err
    assert network_state(lab) == before
