"""The session record: what we know about one intercepted connection and its upstream."""

from __future__ import annotations

from dataclasses import dataclass

from tproxy.core.endpoint import Endpoint


@dataclass(slots=True)
class SessionRecord:
    """One session's identity and counters; the engine updates the counters as bytes move.

    `bytes_up` counts client → upstream bytes written to the upstream, `bytes_down` upstream →
    client bytes written to the client: bytes the proxy read but could not deliver are not counted.
    """

    id: int
    client: Endpoint
    dst: Endpoint
    opened_at: float
    bytes_up: int = 0
    bytes_down: int = 0
