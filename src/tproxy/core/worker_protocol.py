"""The supervisor-worker protocol: its messages, their codec, and the supervisor's bookkeeping.

Each worker has one SOCK_SEQPACKET socketpair with the supervisor: one datagram is one message,
a small JSON object with a `type`. This module holds no I/O: it turns messages into bytes and
back, and keeps the state the supervisor derives from them (which worker is silent, which
listing is complete), with the clock passed in as an argument.

Messages:

* `Heartbeat` (worker -> supervisor, every `HEARTBEAT_INTERVAL_S`): the worker's counters. It
  also proves the worker's event loop turns: a worker silent for `STALL_AFTER_S` is reported.
* `Request` (supervisor -> worker): a command by name with arguments and an id.
* `Reply` (worker -> supervisor): the id, and a result object or an error.
* `Learned` (both ways): TLS passthrough entries, each (key, reason, seconds left). A worker
  sends each entry its memory remembers; the supervisor merges it into its own copy and passes
  it on to every other worker, and sends a worker it starts its whole copy, `LEARNED_BATCH`
  entries a message (`tls.passthrough`). Seconds left, not a deadline: monotonic clocks are
  per process.

`decode` accepts only well-formed messages and raises `MessageError` on anything else: a reader
never crashes on bytes it did not expect (a fuzz test feeds it random bytes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

HEARTBEAT_INTERVAL_S = 1.0
# A worker that sent nothing for this long is reported as stalled (three missed heartbeats).
STALL_AFTER_S = 3.0
# How long the supervisor waits for every worker's reply to a request.
REPLY_TIMEOUT_S = 2.0
# How long `tproxy reload` waits for the workers to have reloaded, at least: a policy's host
# names are resolved on a reload, and a DNS server that does not answer takes its timeouts (the
# workers get twice what the supervisor's own reload took, if that is longer).
RELOAD_TIMEOUT_S = 20.0
Reloaded = tuple[bool, list[str]]
"""A reload's outcome (the supervisor's, or a worker's): whether it applied the files, and the
notices that say what happened."""
# What the reader accepts. What can be *sent* is smaller: SO_SNDBUF, which the kernel caps at
# twice net.core.wmem_max (about 416 KiB by default). The largest message, a listing of 1,000
# sessions, stays under 160 KiB; a message too large to send is logged by the sender.
MAX_MESSAGE_BYTES = 1 << 20
# A `learned` message carries at most this many entries: a snapshot of a full passthrough memory
# (10,000 entries) goes as 40 messages of some 25 KiB (100 KiB with 300-character keys).
LEARNED_BATCH = 256
# A passthrough key is a name as sniffed (cut at 255 characters), a destination, or a client
# address and either: far shorter than this. A reason is a word.
MAX_KEY_CHARS = 1024
MAX_REASON_CHARS = 64
# A channel too full to take a message drops it; the drops are reported at most this often.
DROPS_REPORT_EVERY_S = 10.0


class MessageError(ValueError):
    """Bytes that are not a well-formed message."""


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A worker's counters, sent every second from its event loop.

    `active` live sessions, `opened` sessions since the worker started, `bytes_up` and
    `bytes_down` every byte its sessions moved since it started (closed ones, counted at the
    session's one teardown, and live ones so far). `metrics`: the worker's other counters
    (`observability.counters.Counters.snapshot`, checked where they are read), None when it
    keeps none.
    """

    worker: int
    pid: int
    active: int
    opened: int
    bytes_up: int
    bytes_down: int
    metrics: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Request:
    """A command for a worker; the reply carries the same `id`."""

    id: int
    command: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Reply:
    """A worker's answer to request `id`: `result` if `error` is empty."""

    id: int
    worker: int
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""


LearnedEntry = tuple[str, str, float]
"""A passthrough entry on the wire: key, reason, seconds left (`PassthroughMemory.snapshot`)."""


@dataclass(frozen=True, slots=True)
class Learned:
    """TLS passthrough entries: remembered by the worker that sends them, or (from the
    supervisor) by another worker; each to be `merge`d for the seconds it has left."""

    entries: tuple[LearnedEntry, ...]


def learned_batches(entries: Sequence[LearnedEntry]) -> list[Learned]:
    """`entries` as messages of at most `LEARNED_BATCH` entries each (none for none)."""
    return [
        Learned(tuple(entries[i : i + LEARNED_BATCH]))
        for i in range(0, len(entries), LEARNED_BATCH)
    ]


Message = Heartbeat | Request | Reply | Learned

_INT_FIELDS: dict[str, tuple[str, ...]] = {
    "heartbeat": ("worker", "pid", "active", "opened", "bytes_up", "bytes_down"),
    "request": ("id",),
    "reply": ("id", "worker"),
    "learned": (),
}


def encode(message: Message) -> bytes:
    """One datagram for `message`."""
    if isinstance(message, Heartbeat):
        body: dict[str, Any] = {
            "type": "heartbeat",
            "worker": message.worker,
            "pid": message.pid,
            "active": message.active,
            "opened": message.opened,
            "bytes_up": message.bytes_up,
            "bytes_down": message.bytes_down,
        }
        if message.metrics is not None:
            body["metrics"] = message.metrics
    elif isinstance(message, Request):
        body = {"type": "request", "id": message.id, "command": message.command,
                "args": message.args}  # fmt: skip
    elif isinstance(message, Learned):
        body = {"type": "learned", "entries": [list(entry) for entry in message.entries]}
    else:
        body = {"type": "reply", "id": message.id, "worker": message.worker,
                "result": message.result, "error": message.error}  # fmt: skip
    return json.dumps(body, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    """The message in one datagram.

    Raises:
        MessageError: not JSON, not an object, an unknown type, or a field missing or of the
            wrong type.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message of {len(data)} bytes is over the limit")
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise MessageError(f"not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise MessageError("not a JSON object")
    kind = body.get("type")
    if not isinstance(kind, str) or kind not in _INT_FIELDS:
        raise MessageError(f"unknown message type {kind!r}")
    for name in _INT_FIELDS[kind]:
        value = body.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise MessageError(f"{kind}: {name} must be a non-negative integer")
    if kind == "heartbeat":
        metrics = body.get("metrics")
        if metrics is not None and not isinstance(metrics, dict):
            raise MessageError("heartbeat: metrics must be an object")
        return Heartbeat(
            body["worker"], body["pid"], body["active"], body["opened"], body["bytes_up"],
            body["bytes_down"], metrics,
        )  # fmt: skip
    if kind == "request":
        command, args = body.get("command"), body.get("args", {})
        if not isinstance(command, str) or not isinstance(args, dict):
            raise MessageError("request: command must be a string and args an object")
        return Request(body["id"], command, args)
    if kind == "learned":
        return Learned(_learned_entries(body.get("entries")))
    result, error = body.get("result", {}), body.get("error", "")
    if not isinstance(result, dict) or not isinstance(error, str):
        raise MessageError("reply: result must be an object and error a string")
    return Reply(body["id"], body["worker"], result, error)


def _learned_entries(entries: Any) -> tuple[LearnedEntry, ...]:
    if not isinstance(entries, list) or len(entries) > LEARNED_BATCH:
        raise MessageError(f"learned: entries must be a list of at most {LEARNED_BATCH}")
    parsed = []
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 3:
            raise MessageError("learned: each entry must be [key, reason, seconds left]")
        key, reason, left_s = entry
        if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
            raise MessageError(f"learned: a key must be a string of 1 to {MAX_KEY_CHARS}")
        if not isinstance(reason, str) or len(reason) > MAX_REASON_CHARS:
            raise MessageError(f"learned: a reason must be a string of at most {MAX_REASON_CHARS}")
        if (
            not isinstance(left_s, int | float)
            or isinstance(left_s, bool)
            or not math.isfinite(left_s)  # json reads Infinity and NaN
            or left_s < 0
        ):
            raise MessageError("learned: seconds left must be a non-negative number")
        parsed.append((key, reason, left_s))
    return tuple(parsed)


class Drops:
    """Messages a full channel could not take: counted, and reported at most once every
    `every_s` (a flood makes one notice a while, not one a message).

    `add(count)` for each drop, `due(now)` on a timer: how many to report now (0: nothing).
    """

    def __init__(self, every_s: float = DROPS_REPORT_EVERY_S) -> None:
        self._every_s = every_s
        self._unreported = 0
        self._next_report_at = -math.inf
        self.total = 0

    def add(self, count: int = 1) -> None:
        self._unreported += count
        self.total += count

    def due(self, now: float) -> int:
        if not self._unreported or now < self._next_report_at:
            return 0
        count, self._unreported = self._unreported, 0
        self._next_report_at = now + self._every_s
        return count


# --- the supervisor's bookkeeping ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stalled:
    """Worker `worker` has sent nothing for `silent_s` seconds."""

    worker: int
    silent_s: float


@dataclass(frozen=True, slots=True)
class Recovered:
    """Worker `worker`, reported stalled, was heard from again after `silent_s` seconds."""

    worker: int
    silent_s: float


class Watchdog:
    """Notices workers whose heartbeats stop, and their recovery; each is reported once.

    `heard(worker, now)` on every message from a worker, `check(now)` on every tick of the
    supervisor's loop; `forget(worker)` when it dies (a restarted worker starts afresh).
    """

    def __init__(self, stall_after_s: float = STALL_AFTER_S) -> None:
        self._stall_after_s = stall_after_s
        self._last_heard_at: dict[int, float] = {}
        self._stalled: set[int] = set()
        self.latest: dict[int, Heartbeat] = {}

    def started(self, worker: int, now: float) -> None:
        """A worker was started: it has until `now + stall_after_s` to be heard from."""
        self._last_heard_at[worker] = now
        self._stalled.discard(worker)
        self.latest.pop(worker, None)

    def heard(
        self, worker: int, now: float, heartbeat: Heartbeat | None = None
    ) -> Recovered | None:
        """A message from `worker` arrived; its recovery if it was reported stalled."""
        last = self._last_heard_at.get(worker, now)
        self._last_heard_at[worker] = now
        if heartbeat is not None:
            self.latest[worker] = heartbeat
        if worker in self._stalled:
            self._stalled.discard(worker)
            return Recovered(worker, now - last)
        return None

    def answering(self, now: float, workers: int) -> bool:
        """Whether `workers` workers are running and every one was heard from within the stall
        limit (a dead one is forgotten; a stopped or stuck one falls silent)."""
        heard = self._last_heard_at
        return len(heard) >= workers and all(
            now - last < self._stall_after_s for last in heard.values()
        )

    def check(self, now: float) -> list[Stalled]:
        """Workers silent for too long that were not reported yet."""
        found = []
        for worker, last in self._last_heard_at.items():
            if worker not in self._stalled and now - last >= self._stall_after_s:
                self._stalled.add(worker)
                found.append(Stalled(worker, now - last))
        return found

    def forget(self, worker: int) -> None:
        self._last_heard_at.pop(worker, None)
        self._stalled.discard(worker)
        self.latest.pop(worker, None)

    def is_stalled(self, worker: int) -> bool:
        return worker in self._stalled


class Gathering:
    """The replies to one request sent to several workers: complete when every worker asked has
    answered, or at `deadline_at` with the silent ones named as missing."""

    def __init__(self, request: Request, workers: set[int], deadline_at: float) -> None:
        self.request = request
        self.deadline_at = deadline_at
        self._waiting = set(workers)
        self._died: set[int] = set()  # died while asked
        self._unreachable: set[int] = set()  # the request could not be sent
        self.replies: dict[int, Reply] = {}

    def add(self, reply: Reply) -> None:
        """A reply arrived; one for another request, or from a worker not asked, is ignored."""
        if reply.id == self.request.id and reply.worker in self._waiting:
            self._waiting.discard(reply.worker)
            self.replies[reply.worker] = reply

    def lost(self, worker: int) -> None:
        """`worker` died: it will not answer (it is reported missing)."""
        if worker in self._waiting:
            self._waiting.discard(worker)
            self._died.add(worker)

    def unreachable(self, worker: int) -> None:
        """The request could not be sent to `worker` (its channel is full: it is stalled, or
        dying): it will not answer."""
        if worker in self._waiting:
            self._waiting.discard(worker)
            self._unreachable.add(worker)

    def done(self, now: float) -> bool:
        return not self._waiting or now >= self.deadline_at

    @property
    def missing(self) -> list[int]:
        """Workers asked that have not answered (at the end: that never will)."""
        return sorted(self._waiting | self._died | self._unreachable)

    @property
    def died(self) -> list[int]:
        """Workers that died before answering."""
        return sorted(self._died)

    @property
    def silent(self) -> list[int]:
        """Workers alive that have not answered (not in time, or never asked: unreachable)."""
        return sorted(self._waiting | self._unreachable)
