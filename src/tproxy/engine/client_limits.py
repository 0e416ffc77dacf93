"""Per-client limits (`--max-connections-per-client`, `--new-connections-per-client`): one client
must not take every slot of the proxy, nor open connections faster than it may. Pure: the clock
is an argument; the server asks `admit` at accept and the session calls `release` at its close.

A client is an IPv4 address, or an IPv6 /64 (`client_key`): a host rotating through its privacy
addresses stays one client. Each client is served by one worker (`engine.steering` hashes the
same: the IPv4 address, the IPv6 /64), so the counts a worker keeps are the client's whole
counts: the limits are exact across workers without sharing anything.

* **Live sessions**: a client with `max_live` sessions open gets its next connection reset.
* **New connections**: a token bucket per client, `rate` tokens a second, holding at most one
  second's worth (at least one token): a burst of `rate` connections, then `rate` a second.

Bounded under a flood of spoofed or rotating addresses: a client is kept while it has live
sessions (those are bounded by `--max-connections`) and, idle, only among the `capacity` most
recently seen; forgetting an idle client refills its bucket, which is all a flood can win. The
clients with live sessions are kept apart from the idle ones, so forgetting costs one step
however many clients are busy, and a new client is never forgotten before it is counted.
"""

from __future__ import annotations

import math
import socket
from collections import OrderedDict
from typing import Final

DEFAULT_CAPACITY: Final = 65536
"""Idle clients remembered (their buckets), per worker: about 100 bytes each."""

PER_CLIENT_LIVE: Final = "per_client_connections"
PER_CLIENT_RATE: Final = "per_client_rate"


def client_key(ip: str) -> str:
    """What a client is counted by: its IPv4 address (also when it comes IPv4-mapped on an IPv6
    socket), or its IPv6 /64 as `2001:db8:1:2::/64`. `ip` is as `accept()` gives it."""
    if ":" not in ip:
        return ip
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    packed = socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


class _Client:
    __slots__ = ("at", "live", "tokens")

    def __init__(self, tokens: float, at: float) -> None:
        self.live = 0
        self.tokens = tokens
        self.at = at


class ClientLimits:
    """The limits of one worker's clients.

    Args:
        max_live: live sessions per client at most (None: no limit).
        rate: new connections per second per client (None: no limit).
        capacity: idle clients remembered at most.
    """

    __slots__ = ("_busy", "_idle", "capacity", "max_live", "rate")

    def __init__(
        self, max_live: int | None, rate: float | None, capacity: int = DEFAULT_CAPACITY
    ) -> None:
        self.max_live = max_live
        self.rate = rate
        self.capacity = capacity
        # Clients with live sessions (never forgotten), and the idle ones, least recently seen
        # first (at most `capacity`).
        self._busy: dict[str, _Client] = {}
        self._idle: OrderedDict[str, _Client] = OrderedDict()

    def __len__(self) -> int:
        return len(self._busy) + len(self._idle)

    @property
    def burst(self) -> float:
        return 0.0 if self.rate is None else max(1.0, self.rate)

    def configure(self, max_live: int | None, rate: float | None) -> None:
        """New limits (a reload): the counts and buckets are kept."""
        self.max_live, self.rate = max_live, rate

    def admit(self, key: str, now: float) -> str | None:
        """A new connection from client `key`: None when it may go on (then it counts as live
        until `release`), else the limit it is over (`PER_CLIENT_LIVE`, `PER_CLIENT_RATE`)."""
        client = self._busy.get(key)
        if client is None:
            # Idle (taken out: it goes back as the most recently seen) or new, with a full
            # bucket whatever the rate.
            client = self._idle.pop(key, None) or _Client(math.inf, now)
        over = self._over(client, now)
        if over is None:
            client.live += 1
            self._busy[key] = client
        elif not client.live:
            self._idle[key] = client
            self._bound()
        return over

    def _over(self, client: _Client, now: float) -> str | None:
        if self.max_live is not None and client.live >= self.max_live:
            return PER_CLIENT_LIVE
        if self.rate is not None:
            tokens = min(self.burst, client.tokens + (now - client.at) * self.rate)
            client.at = now
            if tokens < 1.0:
                client.tokens = tokens
                return PER_CLIENT_RATE
            client.tokens = tokens - 1.0
        return None

    def release(self, key: str) -> None:
        """A session `admit` let in has ended."""
        client = self._busy.get(key)
        if client is None:
            return
        client.live -= 1
        if not client.live:
            del self._busy[key]
            self._idle[key] = client
            self._bound()

    def live(self, key: str) -> int:
        client = self._busy.get(key)
        return 0 if client is None else client.live

    def _bound(self) -> None:
        """Forget the least recently seen idle clients past `capacity`."""
        idle = self._idle
        while len(idle) > self.capacity:
            idle.popitem(last=False)


def limits_for(
    max_live: int | None, rate: float | None, running: ClientLimits | None = None
) -> ClientLimits | None:
    """A worker's limits for its configuration: None without any; a reload keeps the running
    object (its counts and buckets) with the new limits."""
    if max_live is None and rate is None:
        return None
    if running is None:
        return ClientLimits(max_live, rate)
    running.configure(max_live, rate)
    return running


def refusal_detail(reason: str, limits: ClientLimits) -> str:
    """The `connections_refused` event's detail for a per-client refusal."""
    if reason == PER_CLIENT_LIVE:
        return f"a client's live sessions ({limits.max_live}) reached"
    return f"a client's new connections ({limits.rate:g}/s) exceeded"


def busiest(counts: dict[str, int], shown: int = 5) -> str:
    """`198.18.1.2 4800, 2001:db8:1::/64 12 (and 3 more clients)`: the clients refused most."""
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{key} {count}" for key, count in ranked[:shown])
    if len(ranked) > shown:
        text += f" (and {len(ranked) - shown} more clients)"
    return text
