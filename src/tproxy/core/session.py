"""The session record: what we know about one intercepted connection and its upstream."""

from __future__ import annotations

from dataclasses import dataclass

from tproxy.core.endpoint import Endpoint


@dataclass(slots=True)
class SessionRecord:
    """One session's identity, counters and clock readings (monotonic seconds).

    `bytes_up` counts client → upstream bytes written to the upstream, `bytes_down` upstream →
    client bytes written to the client: bytes the proxy read but could not deliver are not counted.
    `last_activity_at` moves whenever a byte moves either way; `half_closed_at` is when the first
    direction finished (one side sent FIN), None while both still flow.
    """

    id: int
    client: Endpoint
    dst: Endpoint
    opened_at: float
    bytes_up: int = 0
    bytes_down: int = 0
    last_activity_at: float = 0.0
    half_closed_at: float | None = None

    def __post_init__(self) -> None:
        if not self.last_activity_at:
            self.last_activity_at = self.opened_at
