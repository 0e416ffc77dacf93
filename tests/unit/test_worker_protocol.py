"""The supervisor-worker protocol: the codec round-trips, never crashes on junk, and the
supervisor's bookkeeping (watchdog, gathering replies) decides right with a given clock."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.core.worker_protocol import (
    LEARNED_BATCH,
    Drops,
    Gathering,
    Heartbeat,
    Learned,
    MessageError,
    Recovered,
    Reply,
    Request,
    Stalled,
    Watchdog,
    decode,
    encode,
    learned_batches,
)

counts = st.integers(min_value=0, max_value=2**53)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=10,
)  # fmt: skip
heartbeats = st.builds(Heartbeat, counts, counts, counts, counts, counts, counts)
requests = st.builds(Request, counts, st.text(max_size=20),
                     st.dictionaries(st.text(max_size=8), json_values, max_size=4))  # fmt: skip
replies = st.builds(Reply, counts, counts,
                    st.dictionaries(st.text(max_size=8), json_values, max_size=4),
                    st.text(max_size=20))  # fmt: skip
learned_entries = st.tuples(
    st.text(min_size=1, max_size=300), st.text(max_size=30),
    st.floats(min_value=0, max_value=1e9, allow_nan=False, allow_infinity=False),
)  # fmt: skip
learned = st.builds(Learned, st.lists(learned_entries, max_size=5).map(tuple))


@given(heartbeats | requests | replies | learned)
def test_every_message_round_trips(message: Heartbeat | Request | Reply | Learned) -> None:
    assert decode(encode(message)) == message


def test_a_learned_entry_round_trips_with_its_seconds_left_exact() -> None:
    message = Learned((("pinned.example.test", "upstream_wants_client_cert", 3599.9871),
                       ("198.18.1.2 app.example.test", "client_rejected", 12)))  # fmt: skip
    data = encode(message)
    assert json.loads(data) == {"type": "learned", "entries": [
        ["pinned.example.test", "upstream_wants_client_cert", 3599.9871],
        ["198.18.1.2 app.example.test", "client_rejected", 12],
    ]}  # fmt: skip
    assert decode(data) == message


def test_a_snapshot_goes_in_batches_each_small_enough_to_send() -> None:
    entries = [(f"{i:0>250}.example.test", "client_rejected", 3600.0) for i in range(10_000)]
    batches = learned_batches(entries)
    assert [len(b.entries) for b in batches[:-1]] == [LEARNED_BATCH] * (len(batches) - 1)
    assert [e for b in batches for e in b.entries] == entries
    assert max(len(encode(b)) for b in batches) < 100_000  # a channel takes ~400 KiB at once
    assert learned_batches([]) == []


@given(st.binary(max_size=300))
def test_random_bytes_never_crash_the_reader(data: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode(data)


FIELDS = ["type", "id", "worker", "pid", "active", "opened", "bytes_up", "bytes_down",
          "command", "args", "result", "error", "entries"]  # fmt: skip
KINDS = st.sampled_from(["heartbeat", "request", "reply", "learned"])


@given(st.dictionaries(st.sampled_from(FIELDS), json_values | KINDS))
def test_random_objects_decode_or_are_refused(body: dict[str, object]) -> None:
    try:
        message = decode(json.dumps(body).encode())
    except MessageError:
        return
    assert decode(encode(message)) == message


@pytest.mark.parametrize(
    "data",
    [b"", b"[]", b'{"type":"heartbeat"}', b'{"type":"reply","id":-1,"worker":1}',
     b'{"type":"request","id":true,"command":"x"}', b'{"type":"nope"}', b"\xff\xfe",
     b"[" * 100_000, b'{"type":"learned"}', b'{"type":"learned","entries":[["a","b"]]}',
     b'{"type":"learned","entries":[["","client_rejected",1]]}',
     b'{"type":"learned","entries":[["a","client_rejected",-1]]}',
     b'{"type":"learned","entries":[["a","client_rejected",Infinity]]}',
     b'{"type":"learned","entries":[["a","client_rejected",NaN]]}',
     b'{"type":"learned","entries":[["a","client_rejected",true]]}',
     b'{"type":"learned","entries":[["a",7,1]]}',
     b'{"type":"learned","entries":[["' + b"a" * 1025 + b'","client_rejected",1]]}',
     b'{"type":"learned","entries":' + b"[" + b",".join([b'["a","b",1]'] * 257) + b"]}"],
)  # fmt: skip
def test_malformed_messages_are_refused(data: bytes) -> None:
    with pytest.raises(MessageError):
        decode(data)


def test_a_silent_worker_is_reported_once_and_its_recovery_too() -> None:
    dog = Watchdog(stall_after_s=3)
    dog.started(1, now=0)
    dog.started(2, now=0)
    assert dog.check(now=2) == []
    beat = Heartbeat(1, 100, 0, 0, 0, 0)
    assert dog.heard(1, now=2.5, heartbeat=beat) is None
    assert dog.check(now=3.2) == [Stalled(2, 3.2)]
    assert dog.check(now=5) == []  # reported once
    assert dog.is_stalled(2)
    assert dog.heard(2, now=10) == Recovered(2, 10)
    assert not dog.is_stalled(2)
    assert dog.latest == {1: beat}
    dog.forget(1)
    assert dog.check(now=100) == [Stalled(2, 90)]


def test_a_restarted_worker_starts_afresh() -> None:
    dog = Watchdog(stall_after_s=3)
    dog.started(1, now=0)
    assert dog.check(now=5) == [Stalled(1, 5)]
    dog.started(1, now=6)
    assert not dog.is_stalled(1)
    assert dog.check(now=8) == []


def test_a_gathering_completes_when_every_worker_answered() -> None:
    request = Request(7, "sessions")
    gathering = Gathering(request, {1, 2}, deadline_at=10)
    gathering.add(Reply(6, 1, {"active": 1}))  # another request's: ignored
    gathering.add(Reply(7, 3, {"active": 1}))  # not asked: ignored
    gathering.add(Reply(7, 1, {"active": 2}))
    assert not gathering.done(now=1)
    gathering.add(Reply(7, 2, {"active": 0}))
    assert gathering.done(now=1)
    assert gathering.missing == []
    assert {w: r.result["active"] for w, r in gathering.replies.items()} == {1: 2, 2: 0}


def test_a_gathering_names_the_silent_and_the_dead_at_its_deadline() -> None:
    gathering = Gathering(Request(1, "sessions"), {1, 2, 3}, deadline_at=10)
    gathering.add(Reply(1, 1))
    gathering.lost(2)
    assert not gathering.done(now=9)
    assert gathering.done(now=10)
    assert gathering.missing == [2, 3]


def test_drops_are_reported_at_most_once_a_while() -> None:
    drops = Drops(every_s=10)
    assert drops.due(now=0) == 0
    drops.add()
    drops.add(3)
    assert drops.due(now=1) == 4  # the first at once
    drops.add()
    assert drops.due(now=5) == 0  # then not before 10 s have passed
    drops.add(2)
    assert drops.due(now=11) == 3
    assert drops.due(now=30) == 0 and drops.total == 7
