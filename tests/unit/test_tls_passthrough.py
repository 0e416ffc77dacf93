"""Passthrough memory (issue 13): what is remembered, for how long, how many, by which key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.tls.legs import TLSFailure
from tproxy.tls.passthrough import (
    DEFAULT_TTL_S,
    PassthroughMemory,
    PassthroughReason,
    passthrough_key,
    reason_to_remember,
)

REJECTED = PassthroughReason.CLIENT_REJECTED
CLIENT_CERT = PassthroughReason.UPSTREAM_WANTS_CLIENT_CERT


def test_a_name_is_passed_through_for_the_ttl_then_forgotten() -> None:
    memory = PassthroughMemory()
    memory.remember("pinned.example", REJECTED, now=100.0)
    assert memory.lookup("pinned.example", 100.0 + DEFAULT_TTL_S - 0.001) is REJECTED
    assert memory.lookup("other.example", 101.0) is None
    assert memory.lookup("pinned.example", 100.0 + DEFAULT_TTL_S) is None
    assert len(memory) == 0  # an expired entry looked up is gone


def test_remembering_again_starts_the_time_over_and_takes_the_new_reason() -> None:
    memory = PassthroughMemory(ttl_s=10)
    memory.remember("a.example", REJECTED, now=0)
    memory.remember("a.example", CLIENT_CERT, now=8)
    assert memory.lookup("a.example", 15) is CLIENT_CERT
    assert len(memory) == 1


def test_the_oldest_remembered_are_dropped_past_the_capacity() -> None:
    memory = PassthroughMemory(ttl_s=100, capacity=2)
    for at, name in enumerate(["a", "b", "c"]):
        memory.remember(name, REJECTED, now=at)
    assert [memory.lookup(n, 5) for n in "abc"] == [None, REJECTED, REJECTED]


def test_expire_forgets_the_entries_whose_time_is_up() -> None:
    memory = PassthroughMemory(ttl_s=10)
    memory.remember("a", REJECTED, now=0)
    memory.remember("b", REJECTED, now=5)
    assert memory.expire(now=12) == 1
    assert len(memory) == 1 and memory.lookup("b", 12) is REJECTED


def test_what_another_worker_learned_merges_for_what_was_left_of_its_time() -> None:
    memory, other = PassthroughMemory(ttl_s=10), PassthroughMemory(ttl_s=10)
    other.remember("a", CLIENT_CERT, now=0)
    for key, reason, left_s in other.snapshot(now=4):
        memory.merge(key, reason, left_s, now=1000)
    assert memory.lookup("a", 1005.9) is CLIENT_CERT
    assert memory.lookup("a", 1006) is None
    memory.merge("b", "a reason from a newer worker", 5, now=0)
    memory.merge("c", "client_rejected", 0, now=0)
    assert len(memory) == 0


def test_the_listener_hears_what_is_remembered_not_what_is_merged() -> None:
    heard: list[tuple[str, PassthroughReason, float]] = []
    memory = PassthroughMemory(ttl_s=10, on_remember=lambda *entry: heard.append(entry))
    memory.remember("a", CLIENT_CERT, now=3)
    memory.merge("b", "client_rejected", 5, now=3)  # learned elsewhere: not passed back
    memory.merge("a", "upstream_wants_client_cert", 9, now=4)
    assert heard == [("a", CLIENT_CERT, 10)]
    assert memory.lookup("b", 7.9) is REJECTED


def test_merged_entries_are_bounded_like_remembered_ones() -> None:
    memory = PassthroughMemory(ttl_s=10, capacity=3)
    for i in range(100):
        memory.merge(f"k{i}", "client_rejected", 1000, now=0)  # no more than ttl_s either
    assert len(memory) == 3
    assert [key for key, _, _ in memory.snapshot(now=0)] == ["k97", "k98", "k99"]
    assert memory.lookup("k99", 9.9) is REJECTED and memory.lookup("k98", 10) is None


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        PassthroughMemory(ttl_s=0)
    with pytest.raises(ValueError, match="positive"):
        PassthroughMemory(capacity=0)


@pytest.mark.parametrize(
    ("sni", "ip", "port", "key"),
    [
        ("www.example", "192.0.2.1", 443, "www.example"),
        (None, "192.0.2.1", 443, "192.0.2.1:443"),
        ("", "2001:db8::1", 8443, "[2001:db8::1]:8443"),
        (None, "::ffff:192.0.2.1", 443, "192.0.2.1:443"),
        (None, "not an ip", 1, "not an ip:1"),
    ],
)
def test_the_key_is_the_sni_or_the_destination(
    sni: str | None, ip: str, port: int, key: str
) -> None:
    assert passthrough_key(sni, ip, port) == key


UNKNOWN_CA = TLSFailure("client_tls_failed", "tlsv1 alert unknown ca", alert="unknown_ca")
TIMED_OUT = TLSFailure("client_tls_failed", "the client did not complete the TLS handshake")
WANTS_CERT = TLSFailure("upstream_wants_client_cert", "the upstream asks for a certificate")
BAD_CERT = TLSFailure("upstream_cert_invalid", "self-signed certificate")


@pytest.mark.parametrize(
    ("failure", "side", "on_client_reject", "expected"),
    [
        (UNKNOWN_CA, "client", True, REJECTED),
        (UNKNOWN_CA, "client", False, None),  # the rule did not ask for it
        (TIMED_OUT, "client", True, None),  # slow is not a refusal
        (WANTS_CERT, "upstream", False, CLIENT_CERT),  # always: interception can only fail
        (BAD_CERT, "upstream", True, None),  # a bad upstream is not passed through
        (None, None, True, None),
    ],
)
def test_what_an_intercepted_sessions_end_teaches(
    failure: TLSFailure | None,
    side: str | None,
    on_client_reject: bool,
    expected: PassthroughReason | None,
) -> None:
    assert reason_to_remember(failure, side, on_client_reject=on_client_reject) is expected


@given(
    st.lists(st.tuples(st.sampled_from("abcdefgh"), st.floats(0, 50), st.booleans()), max_size=60),
    st.integers(1, 5),
)
def test_never_more_than_the_capacity_and_never_past_the_ttl(
    steps: list[tuple[str, float, bool]], capacity: int
) -> None:
    memory = PassthroughMemory(ttl_s=10, capacity=capacity)
    remembered_at: dict[str, float] = {}
    now = 0.0
    for key, later, remember in steps:
        now += later / 10
        if remember:
            memory.remember(key, REJECTED, now)
            remembered_at[key] = now
        elif memory.lookup(key, now) is not None:
            assert now - remembered_at[key] < 10
        assert len(memory) <= capacity
