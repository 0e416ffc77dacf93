"""Resuming our TLS sessions with upstreams, as browsers do: the second intercepted connection to
a server costs it (and us) no certificate, no signature and, with TLS 1.2, no key exchange.

An upstream leg that completed its handshake leaves its session here (a TLS 1.2 session id or
ticket at once; a TLS 1.3 ticket once the server has sent one, right after the handshake); the
next leg to the same place offers it. The key is everything the session was made under: the
name verified (the SNI, or the destination's IP without one), the destination's address and
port, whether the certificate was verified, and the ALPN list offered -- so a session is only
ever offered to the server that made it, for the name it was verified for, on a context
configured the same way (`UpstreamContexts` keeps one context per verify flag and ALPN list, and
`ssl` refuses a session made on another context). What resumption skips, the certificate
check, was done when the session was made; a server that declines the session does a full
handshake, verified as always, and a leg that fails with a session forgets it.

Bounded: `capacity` sessions, the least recently stored dropped first, each dropped once
expired by its own lifetime (`time` + `timeout`, the server's ticket lifetime for TLS 1.3).
No I/O; the clock is an argument. Made again with the contexts (a new `--upstream-ca`
forgets every session).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final, Generic, Protocol, TypeVar

DEFAULT_CAPACITY: Final = 4096
"""A session is about 2 KiB with the server's certificate: at most 8 MiB per worker."""

ResumeKey = tuple[str, str, int, bool, tuple[str, ...]]
"""(name verified, destination IP, destination port, verified, ALPN offered)."""


class Session(Protocol):
    """What is read of an `ssl.SSLSession`."""

    @property
    def time(self) -> int: ...

    @property
    def timeout(self) -> int: ...


S = TypeVar("S", bound=Session)


class UpstreamSessions(Generic[S]):
    """The sessions to resume, by `ResumeKey` (see the module docstring)."""

    __slots__ = ("_clock", "_sessions", "capacity", "offered", "stored")

    def __init__(
        self, capacity: int = DEFAULT_CAPACITY, clock: Callable[[], float] = time.time
    ) -> None:
        self.capacity = capacity
        self._clock = clock
        self._sessions: OrderedDict[ResumeKey, S] = OrderedDict()
        self.offered = 0  # sessions handed out (statistics for the benchmark and tests)
        self.stored = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, key: ResumeKey) -> S | None:
        """The session to offer for `key`, if one is stored and not expired."""
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.time + session.timeout <= self._clock():
            del self._sessions[key]
            return None
        self.offered += 1
        return session

    def put(self, key: ResumeKey, session: S) -> None:
        sessions = self._sessions
        sessions[key] = session
        sessions.move_to_end(key)
        self.stored += 1
        while len(sessions) > self.capacity:
            sessions.popitem(last=False)

    def forget(self, key: ResumeKey) -> None:
        self._sessions.pop(key, None)
