"""Steering: one listening socket per worker, and each client address always to the same worker.

Theory of operation. Every listener endpoint gets one socket per worker, all with SO_REUSEPORT,
created by the supervisor *before* it forks and listened on in worker order: the kernel keeps a
reuseport group's sockets in an array in the order they joined it (at listen()), and a classic
BPF program attached to the group (SO_ATTACH_REUSEPORT_CBPF) returns an index into that array.
Ours hashes the client's source address, so all connections of one client reach one worker and
per-client state (the per-client limits) can live in that worker alone. An IPv6 client is its
/64 prefix: a host rotating through privacy addresses stays on one worker.

In theory a reuseport program sees the packet from its payload on; in practice `SKF_NET_OFF`
makes loads relative to the network header, which is where the addresses are, both when TCP
looks a listener up for an ordinary SYN (`skb->data` at the TCP header) and when nft's `tproxy`
expression does its own listener lookup in prerouting (`skb->data` at the IP header): both pass
the payload offset to `inet_lookup_listener`, which runs the group's program
(`reuseport_select_sock`). The integration test checks the kernel agrees with `worker_for`, the
same hash in Python, on IPv4 and IPv6. An index past the group's end falls back to the kernel's
own hash; ours is always in range.

The array must not change while the proxy runs: a closed socket's slot is refilled with the
last socket, which would move clients between workers. So the supervisor keeps every socket of
the group open until it stops, and a restarted worker inherits its own socket back from it; each
worker closes the other workers' sockets after the fork. While a worker is dead or stalled, its
clients' new connections wait in its socket's backlog (the price of steering: the shared socket
lets another worker pick them up).

A second tproxy on the same port must still be refused, yet SO_REUSEPORT would let another
process of the same user join our group silently. So `open_steered_listeners` first binds a
probe socket *without* SO_REUSEPORT: it fails with EADDRINUSE when anything listens there
already, and the probe is closed before the group is made. (Two instances started within the
same millisecond could both pass the probe; that race is accepted.)
"""

from __future__ import annotations

import ctypes
import socket
import struct
from collections.abc import Sequence

from tproxy.core.endpoint import Endpoint, IPAddress
from tproxy.interception.sockopts import SocketSetupError, open_listener

# <asm-generic/socket.h>
SO_ATTACH_REUSEPORT_CBPF = 51
# <linux/filter.h>: loads at this offset and above are relative to the network header.
SKF_NET_OFF = -0x100000
# <linux/bpf_common.h> opcodes used below.
BPF_LD_W_ABS = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_ALU_XOR_X = 0x04 | 0xA0 | 0x08  # BPF_ALU | BPF_XOR | BPF_X
BPF_ALU_MUL_K = 0x04 | 0x20 | 0x00  # BPF_ALU | BPF_MUL | BPF_K
BPF_ALU_RSH_K = 0x04 | 0x70 | 0x00  # BPF_ALU | BPF_RSH | BPF_K
BPF_ALU_MOD_K = 0x04 | 0x90 | 0x00  # BPF_ALU | BPF_MOD | BPF_K
BPF_MISC_TAX = 0x07 | 0x00  # BPF_MISC | BPF_TAX
BPF_RET_A = 0x06 | 0x10  # BPF_RET | BPF_A

# Fibonacci hashing: consecutive addresses (a subnet of clients) spread over the workers.
_GOLDEN = 0x9E3779B1
_SHIFT = 16
# Where the source address sits in the IP header, as 32-bit words: IPv4's one; IPv6's first two,
# its /64 prefix, so that the addresses a host rotates through (privacy addresses) are one client.
_SOURCE_WORDS = {socket.AF_INET: (12,), socket.AF_INET6: (8, 12)}

Instruction = tuple[int, int, int, int]  # struct sock_filter: code, jt, jf, k


def render_steering_program(family: socket.AddressFamily, workers: int) -> list[Instruction]:
    """The classic BPF program that maps a client's source address to a worker index.

    A = the source address (IPv6: the two words of its /64 prefix XORed),
    A = (A * golden) >> 16, A %= workers.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    words = _SOURCE_WORDS[family]
    program: list[Instruction] = [(BPF_LD_W_ABS, 0, 0, (SKF_NET_OFF + words[0]) & 0xFFFFFFFF)]
    for offset in words[1:]:
        program += [
            (BPF_MISC_TAX, 0, 0, 0),
            (BPF_LD_W_ABS, 0, 0, (SKF_NET_OFF + offset) & 0xFFFFFFFF),
            (BPF_ALU_XOR_X, 0, 0, 0),
        ]
    program += [
        (BPF_ALU_MUL_K, 0, 0, _GOLDEN),
        (BPF_ALU_RSH_K, 0, 0, _SHIFT),
        (BPF_ALU_MOD_K, 0, 0, workers),
        (BPF_RET_A, 0, 0, 0),
    ]
    return program


def worker_for(client: IPAddress, workers: int) -> int:
    """Which worker (1 to `workers`) the steering program sends `client` to: the program's
    arithmetic in Python, for tests, listings and the operator."""
    packed = client.packed[:8]  # IPv6: the /64 prefix
    value = 0
    for i in range(0, len(packed), 4):
        value ^= int.from_bytes(packed[i : i + 4], "big")
    value = ((value * _GOLDEN) & 0xFFFFFFFF) >> _SHIFT
    return value % workers + 1


def _attach(sock: socket.socket, program: Sequence[Instruction]) -> None:
    code = b"".join(struct.pack("HBBI", *insn) for insn in program)
    buffer = ctypes.create_string_buffer(code, len(code))
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def _probe_free(endpoint: Endpoint, transparent: bool) -> None:
    """Fail the way `open_listener` does if anything already listens on `endpoint`."""
    probe = open_listener(endpoint, transparent=transparent, backlog=1)
    probe.close()


def open_steered_listeners(
    endpoints: Sequence[Endpoint], workers: int, *, transparent: bool = True
) -> list[list[socket.socket]]:
    """Per worker (index 0 is worker 1), its own listening socket for each endpoint, in a
    reuseport group per endpoint that steers each client address to one worker.

    Raises:
        SocketSetupError: an endpoint is in use (also by another tproxy), not local, or not
            permitted; nothing stays open then.
    """
    opened: list[socket.socket] = []
    per_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
    try:
        for endpoint in endpoints:
            _probe_free(endpoint, transparent)
            group = []
            for index in range(workers):
                sock = open_listener(endpoint, transparent=transparent, reuseport=True)
                opened.append(sock)
                group.append(sock)
                per_worker[index].append(sock)
            try:
                _attach(group[0], render_steering_program(endpoint.family, workers))
            except OSError as exc:
                raise SocketSetupError(
                    f"cannot steer connections on {endpoint} to workers: {exc.strerror}"
                ) from None
    except BaseException:
        for sock in opened:
            sock.close()
        raise
    return per_worker
