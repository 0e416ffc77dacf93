"""The session record: what we know about one intercepted connection and its upstream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def format_sockaddr(sockaddr: tuple[Any, ...]) -> str:
    """`ip:port`, or `[ip]:port` for IPv6, straight from a socket address (no parsing).

    The hot-path twin of `str(Endpoint)`: IPv4-mapped IPv6 addresses print as IPv4 and scope
    ids are dropped, as there.
    """
    host, port = sockaddr[0], sockaddr[1]
    if ":" not in host:
        return f"{host}:{port}"
    if host.startswith("::ffff:") and "." in host:
        return f"{host[7:]}:{port}"
    return f"[{host.split('%', 1)[0]}]:{port}"


@dataclass(slots=True)
class SessionRecord:
    """One session's identity, counters and clock readings (monotonic seconds).

    `client` and `dst` are printed endpoints (`ip:port`, `[ip]:port`), made once when the session
    opens (its first log line needs them anyway). `bytes_up` counts client → upstream bytes
    written to the upstream, `bytes_down` upstream → client bytes written to the client: bytes
    the proxy read but could not deliver are not counted. `last_activity_at` moves whenever a
    byte moves either way; `half_closed_at` is when the first direction finished (one side sent
    FIN), None while both still flow.
    """

    id: int
    client: str
    dst: str
    opened_at: float
    bytes_up: int = 0
    bytes_down: int = 0
    last_activity_at: float = 0.0
    half_closed_at: float | None = None

    def __post_init__(self) -> None:
        if not self.last_activity_at:
            self.last_activity_at = self.opened_at
