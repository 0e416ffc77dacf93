"""The session record: what we know about one intercepted connection and its upstream."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tproxy.engine.tls_relay import TLSOutcome
    from tproxy.sniffers.classify import Sniffed


@dataclass(slots=True)
class SessionRecord:
    """One session's identity, counters and clock readings (monotonic seconds).

    `id` comes from `tproxy.core.session_id` (unique across workers and restarts). `client` and
    `dst` are printed endpoints (`ip:port`, `[ip]:port`), made once when the session opens (its
    first log line needs them anyway). `bytes_up` counts client → upstream bytes written to the
    upstream, `bytes_down` upstream → client bytes written to the client: bytes the proxy read
    but could not deliver are not counted (an intercepted session counts plaintext, what the
    applications sent, not the TLS records). `spliced_bytes` is the part of both that moved by
    splice (never through Python); `relay` is how the session was relayed ("splice", "copy",
    "capture", "addon" or "tls"; None until the relay starts). `sniffed` is what its first
    bytes said it is (None when nothing was sniffed: refused or failed before relaying, without
    waiting for its first bytes). `action` is what the policy decided (`allow` without a
    policy), `rule` the rule that decided (None: the default, or no policy), `upstream` the
    endpoint connected when it is not `dst` (a `redirect` target, a `via` proxy).
    `last_activity_at` moves whenever a byte moves either way; `half_closed_at` is when the
    first direction finished (one side sent FIN), None while both still flow. `addons` are the
    addons that claimed the session (its relay is then "addon"), None when none did.
    """

    id: str
    client: str
    dst: str
    opened_at: float
    bytes_up: int = 0
    bytes_down: int = 0
    spliced_bytes: int = 0
    relay: str | None = None
    sniffed: Sniffed | None = None
    action: str = "allow"
    rule: str | None = None
    upstream: str | None = None
    last_activity_at: float = 0.0
    half_closed_at: float | None = None
    addons: list[str] | None = None
    tls: TLSOutcome | None = None
    passthrough: str | None = None

    def __post_init__(self) -> None:
        if not self.last_activity_at:
            self.last_activity_at = self.opened_at
