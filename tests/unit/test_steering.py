"""The steering program: its shape, and the Python twin of its arithmetic.

That the kernel runs the program as `worker_for` predicts, on the TPROXY path, is shown by
tests/integration/test_workers.py (and measured by bench/steering.py)."""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter

import pytest

from tproxy.engine.steering import (
    BPF_ALU_MOD_K,
    BPF_LD_W_ABS,
    BPF_RET_A,
    SKF_NET_OFF,
    render_steering_program,
    worker_for,
)


def test_ipv4_program_loads_the_source_address_from_the_network_header() -> None:
    program = render_steering_program(socket.AF_INET, 4)
    assert program[0] == (BPF_LD_W_ABS, 0, 0, (SKF_NET_OFF + 12) & 0xFFFFFFFF)
    assert program[-2] == (BPF_ALU_MOD_K, 0, 0, 4)
    assert program[-1] == (BPF_RET_A, 0, 0, 0)


def test_ipv6_program_folds_the_two_words_of_the_source_addresss_64_prefix() -> None:
    program = render_steering_program(socket.AF_INET6, 2)
    loads = [k - (SKF_NET_OFF & 0xFFFFFFFF) for code, _, _, k in program if code == BPF_LD_W_ABS]
    assert loads == [8, 12]


def test_every_address_of_an_ipv6_64_goes_to_one_worker() -> None:
    """A host rotating through privacy addresses inside its /64 is one client."""
    workers = {
        worker_for(ipaddress.ip_address(f"2001:db8:1:0:{i:x}:{i * 7:x}::{i:x}"), 4)
        for i in range(256)
    }
    assert len(workers) == 1


def test_no_workers_is_refused() -> None:
    with pytest.raises(ValueError):
        render_steering_program(socket.AF_INET, 0)


@pytest.mark.parametrize("workers", [2, 3, 4, 8])
def test_a_subnet_of_clients_spreads_over_every_worker(workers: int) -> None:
    net = ipaddress.ip_network("198.18.1.0/24")
    counts = Counter(worker_for(ip, workers) for ip in net)
    assert set(counts) == set(range(1, workers + 1))
    assert max(counts.values()) <= 1.5 * 256 / workers
    counts6 = Counter(  # a /56 of /64s (the clients of a site)
        worker_for(ipaddress.ip_address(f"2001:db8:1:{i:x}::2"), workers) for i in range(256)
    )
    assert set(counts6) == set(range(1, workers + 1))


def test_one_worker_takes_everyone() -> None:
    assert worker_for(ipaddress.ip_address("198.18.1.2"), 1) == 1
