"""Passthrough memory: which names (or destinations) an intercepting rule passes through for a
while, because interception failed there in a way that will not change; pure, the clock is an
argument.

Two failures make a name unfit for interception, and each would repeat on every connection:

* the client refused our certificate (`client_rejected`: a pinned app, a client without our CA;
  `tls.legs.client_rejected_certificate` says when), remembered only where the rule asked for
  it (`passthrough_on_client_reject`): without it, a refusing client is a fact to log;
* the upstream asked for a client certificate (`upstream_wants_client_cert`), which tproxy can
  never present: remembered always, since intercepting it can only fail.

An intercepting rule then relays that name's next sessions untouched (spliced, the client sees
the real certificate), for `ttl_s` (an hour by default: long enough that a pinned app does not
fail every connection, short enough that installing the CA on the client, or the upstream
dropping its client-certificate request, is noticed the same hour), like mitmproxy's
tls_passthrough example and sslsplit's `-P`. The key is the SNI when the client sent one (the
name the forged certificate was for), the destination `ip:port` otherwise (`passthrough_key`).

Bounded: at most `capacity` entries, the least recently *remembered* dropped first (an entry
looked up stays where it is: a lookup does not extend its life either).

Shared by every worker: each worker has its own memory, and what one remembers reaches the others
through the supervisor (`engine.worker_channel` sets `on_remember`, which `remember` calls and
`merge` does not, so an entry passed on is never passed back; the supervisor keeps a copy of its
own for a worker started later: `core.worker_protocol.Learned`). Entries travel with the time
they have left, not a deadline: each process's monotonic clock is its own.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tproxy.tls.legs import TLSFailure, client_rejected_certificate

DEFAULT_TTL_S = 3600.0
DEFAULT_CAPACITY = 10_000
"""About 100 bytes per entry: 1 MiB per worker, and as much in the supervisor, when full."""


class PassthroughReason(enum.StrEnum):
    """Why a name is passed through."""

    CLIENT_REJECTED = "client_rejected"
    UPSTREAM_WANTS_CLIENT_CERT = "upstream_wants_client_cert"


@dataclass(frozen=True, slots=True)
class Remembered:
    """One entry: why, and until when (monotonic seconds)."""

    reason: PassthroughReason
    until: float


def passthrough_key(sni: str | None, dst_ip: str, dst_port: int) -> str:
    """What a session is remembered by: its SNI as sniffed (lower case already), else its
    destination as `ip:port` (`[ip]:port` for IPv6; an IPv4-mapped address as IPv4)."""
    if sni:
        return sni
    try:
        ip = ipaddress.ip_address(dst_ip)
    except ValueError:
        return f"{dst_ip}:{dst_port}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address):
        return f"[{ip}]:{dst_port}"
    return f"{ip}:{dst_port}"


def reason_to_remember(
    failure: TLSFailure | None, failed_side: str | None, *, on_client_reject: bool
) -> PassthroughReason | None:
    """What an intercepted session's end teaches (`TLSOutcome.failure` and `failed_side`),
    under its rule's `passthrough_on_client_reject` (`on_client_reject`); None: nothing."""
    if failure is None:
        return None
    if failure.reason == "upstream_wants_client_cert":
        return PassthroughReason.UPSTREAM_WANTS_CLIENT_CERT
    if (
        on_client_reject
        and failed_side == "client"
        and client_rejected_certificate(failure) is not None
    ):
        return PassthroughReason.CLIENT_REJECTED
    return None


Learner = Callable[[str, PassthroughReason, float], None]
"""Told of each key this process `remember`s: (key, reason, seconds left)."""


class PassthroughMemory:
    """Keys passed through until their time is up: at most `capacity`, each for `ttl_s`.

    Args:
        ttl_s: how long a key is remembered after its last failure.
        capacity: how many keys are kept (the oldest remembered are dropped first).
        on_remember: called by `remember` (not by `merge`) with the key, the reason and
            `ttl_s`, once the key is remembered: how the other workers hear of it. It must not
            raise (what it raises reaches `remember`'s caller).
    """

    def __init__(
        self,
        ttl_s: float = DEFAULT_TTL_S,
        capacity: int = DEFAULT_CAPACITY,
        on_remember: Learner | None = None,
    ) -> None:
        if ttl_s <= 0 or capacity <= 0:
            raise ValueError("ttl_s and capacity must be positive")
        self.ttl_s = ttl_s
        self.capacity = capacity
        self.on_remember = on_remember
        self._entries: OrderedDict[str, Remembered] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, key: str, reason: PassthroughReason, now: float) -> None:
        """Pass `key` through until `now + ttl_s` (a key remembered again starts over), and
        tell `on_remember`."""
        self._entries.pop(key, None)
        self._entries[key] = Remembered(reason, now + self.ttl_s)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        if self.on_remember is not None:
            self.on_remember(key, reason, self.ttl_s)

    def lookup(self, key: str, now: float) -> PassthroughReason | None:
        """Why `key` is passed through at `now`, or None (an expired entry is forgotten)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.until:
            del self._entries[key]
            return None
        return entry.reason

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def expire(self, now: float) -> int:
        """Forget the entries whose time is up at the front; how many. For a periodic sweep:
        entries are in the order remembered and live `ttl_s`, so the expired ones are at the
        front (a merged one with less time left may wait behind a live one: `lookup` still
        refuses it, and it is bounded by `capacity` like any other)."""
        gone = 0
        entries = self._entries
        while entries:
            key, entry = next(iter(entries.items()))
            if now < entry.until:
                break
            del entries[key]
            gone += 1
        return gone

    def snapshot(self, now: float) -> list[tuple[str, str, float]]:
        """The live entries as (key, reason, seconds left), oldest first: what another process
        `merge`s (the supervisor's copy, for a worker that starts after they were learned)."""
        return [
            (key, entry.reason.value, entry.until - now)
            for key, entry in self._entries.items()
            if entry.until > now
        ]

    def merge(self, key: str, reason: str, left_s: float, now: float) -> None:
        """Take an entry learned elsewhere (another worker): remembered for what was left of
        its time (at most `ttl_s`), without telling `on_remember`. An unknown reason is
        ignored (a newer worker's)."""
        try:
            known = PassthroughReason(reason)
        except ValueError:
            return
        if left_s <= 0:
            return
        current = self._entries.get(key)
        until = now + min(left_s, self.ttl_s)
        if current is not None and current.until >= until:
            return
        self._entries.pop(key, None)
        self._entries[key] = Remembered(known, until)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
