"""Per-client limits (pure): live sessions per client, a token bucket of new connections per
client, a client being an IPv4 address or an IPv6 /64, memory bounded under a flood of
addresses, a reload keeping the counts; and the notice's list of the busiest clients."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.engine.client_limits import (
    PER_CLIENT_LIVE,
    PER_CLIENT_RATE,
    ClientLimits,
    busiest,
    client_key,
    limits_for,
)


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("198.18.1.2", "198.18.1.2"),
        ("::ffff:198.18.1.2", "198.18.1.2"),
        ("2001:db8:1::2", "2001:db8:1::/64"),
        ("2001:db8:1:0:a1b2:c3d4:e5f6:789", "2001:db8:1::/64"),
        ("2001:db8:1:7::2", "2001:db8:1:7::/64"),
        ("fe80::1%eth0", "fe80::/64"),
    ],
)
def test_a_client_is_an_ipv4_address_or_an_ipv6_64(ip: str, key: str) -> None:
    assert client_key(ip) == key


def test_live_sessions_per_client_are_limited_and_released() -> None:
    limits = ClientLimits(max_live=2, rate=None)
    assert limits.admit("a", 0.0) is None
    assert limits.admit("a", 0.0) is None
    assert limits.admit("a", 0.0) == PER_CLIENT_LIVE
    assert limits.admit("b", 0.0) is None  # another client is not affected
    limits.release("a")
    assert limits.admit("a", 0.0) is None
    assert limits.live("a") == 2


def test_new_connections_follow_a_token_bucket_of_one_seconds_worth() -> None:
    limits = ClientLimits(max_live=None, rate=5.0)
    admitted = [limits.admit("a", 0.0) is None for _ in range(8)]
    assert admitted == [True] * 5 + [False] * 3  # the burst: one second's worth
    assert limits.admit("a", 0.1) == PER_CLIENT_RATE  # half a token since
    assert limits.admit("a", 0.2) is None  # one token by now
    # Ten seconds idle: the bucket is full again, not fuller.
    assert [limits.admit("a", 10.0) is None for _ in range(6)] == [True] * 5 + [False]


def test_a_slow_rate_still_lets_one_connection_through() -> None:
    limits = ClientLimits(max_live=None, rate=0.5)  # one every two seconds
    assert limits.admit("a", 0.0) is None
    assert limits.admit("a", 1.0) == PER_CLIENT_RATE
    assert limits.admit("a", 2.5) is None


@given(st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=200))
def test_never_more_than_the_burst_plus_the_rate_over_the_time(gaps: list[float]) -> None:
    limits = ClientLimits(max_live=None, rate=3.0)
    now, admitted = 0.0, 0
    for gap in gaps:
        now += gap
        admitted += limits.admit("a", now) is None
    assert admitted <= 3 + 3.0 * now + 1e-9


def test_a_flood_of_addresses_keeps_memory_bounded_and_live_clients_counted() -> None:
    limits = ClientLimits(max_live=1, rate=None, capacity=1000)
    for i in range(50):  # clients with a live session: never forgotten
        assert limits.admit(f"live{i}", 0.0) is None
    for i in range(100_000):  # a flood of one-off clients, each gone at once
        key = f"flood{i}"
        limits.admit(key, 0.0)
        limits.release(key)
    assert len(limits) <= 1000 + 50  # the idle ones remembered, and the busy ones
    assert all(limits.admit(f"live{i}", 1.0) == PER_CLIENT_LIVE for i in range(50))


def test_a_reload_keeps_the_counts_with_the_new_limits() -> None:
    running = limits_for(1, None)
    assert running is not None and running.admit("a", 0.0) is None
    reloaded = limits_for(3, 10.0, running)
    assert reloaded is running and running.live("a") == 1
    assert running.admit("a", 0.0) is None and running.admit("a", 0.0) is None
    assert running.admit("a", 0.0) == PER_CLIENT_LIVE
    assert limits_for(None, None, running) is None


def test_a_release_without_an_admit_changes_nothing() -> None:
    limits = ClientLimits(max_live=1, rate=None)
    limits.release("a")  # (a session from before the limits were turned on by a reload)
    assert limits.admit("a", 0.0) is None
    assert limits.admit("a", 0.0) == PER_CLIENT_LIVE


def test_the_busiest_clients_come_first_and_the_rest_are_counted() -> None:
    counts = {f"198.18.1.{i}": i for i in range(1, 9)}
    counts["2001:db8:1::/64"] = 100
    assert busiest(counts) == (
        "2001:db8:1::/64 100, 198.18.1.8 8, 198.18.1.7 7, 198.18.1.6 6, 198.18.1.5 5 "
        "(and 4 more clients)"
    )


def test_past_capacity_with_every_remembered_client_busy_a_new_client_is_still_counted() -> None:
    limits = ClientLimits(max_live=1, rate=None, capacity=4)
    for i in range(4):  # as many clients with a live session as idle ones are remembered
        assert limits.admit(f"busy{i}", 0.0) is None
    assert limits.admit("new", 0.0) is None
    assert limits.live("new") == 1  # counted: not forgotten the moment it came
    assert limits.admit("new", 0.0) == PER_CLIENT_LIVE
    limits.release("new")
    assert limits.admit("new", 0.0) is None
