"""Many clients from one namespace: wrk's connections and the idle sessions come from 64
addresses.

tproxy steers each client address to one worker (`tproxy.engine.steering`), so a load generator
with a single address would exercise a single tproxy worker while HAProxy used every thread (and
10,000 idle sessions from one address would not fit in one worker's share of the descriptor
limit): the benchmark gives the client namespace 64 more addresses and source-NATs each new
connection to the web server's ports (HTTP and HTTPS) and the peer server's to the next of them
(`numgen inc`), in every mode alike (plain routing too), so each mode sees many clients, as a
router does.
"""

from __future__ import annotations

import ipaddress

from tproxy.lab.services import HTTP_PORT, PEER_PORT, TLS_PORT
from tproxy.lab.topology import Lab

CLIENTS = 64


def client_addresses(family: int) -> list[str]:
    if family == 4:
        return [f"198.18.1.{64 + i}" for i in range(CLIENTS)]
    return [f"2001:db8:1::{0x100 + i:x}" for i in range(CLIENTS)]


def add_clients(lab: Lab) -> None:
    """64 more addresses on the client, known to the router without neighbour discovery."""
    for family in (4, 6):
        for addr in client_addresses(family):
            lab.add_client_address(ipaddress.ip_address(addr))
    lab.sysctl(lab.client, "net.netfilter.nf_conntrack_tcp_timeout_time_wait", "1")


def snat(lab: Lab, on: bool) -> None:
    """Source-NAT every new connection of the client to the web server (HTTP, HTTPS) or the peer
    server to the next of the 64 addresses."""
    lab.run(lab.client, ["nft", "delete table inet bench_snat"], check=False)
    if not on:
        return
    v4 = ", ".join(f"{i} : {a}" for i, a in enumerate(client_addresses(4)))
    v6 = ", ".join(f"{i} : {a}" for i, a in enumerate(client_addresses(6)))
    ports = f"{HTTP_PORT}, {TLS_PORT}, {PEER_PORT}"
    script = f"""table inet bench_snat {{
  chain post {{
    type nat hook postrouting priority 100;
    tcp dport {{ {ports} }} meta nfproto ipv4 snat ip to numgen inc mod {CLIENTS} map {{ {v4} }}
    tcp dport {{ {ports} }} meta nfproto ipv6 snat ip6 to numgen inc mod {CLIENTS} map {{ {v6} }}
  }}
}}
"""
    lab.run(lab.client, ["nft", "-f", "-"], stdin=script.encode())
