"""The proxy's configuration model (what `tproxy run` was asked to do), validated, no I/O."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tproxy.core.endpoint import Endpoint, parse_endpoint

DEFAULT_PROXY_PORT = 1800
# The mark on every upstream socket. It must differ from the divert mark (0x1 by default) so the
# proxy's own packets never match the policy-routing rule that delivers diverted packets locally.
DEFAULT_PROXY_MARK = 0x2
DEFAULT_DIVERT_MARK = 0x1
DEFAULT_CONNECT_TIMEOUT_S = 10.0


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


def default_listen() -> list[Endpoint]:
    return [
        parse_endpoint(f"0.0.0.0:{DEFAULT_PROXY_PORT}"),
        parse_endpoint(f"[::]:{DEFAULT_PROXY_PORT}"),
    ]


@dataclass(frozen=True)
class ProxyConfig:
    """What `tproxy run` does.

    Args:
        listen: the transparent listening endpoints.
        spoof_source: bind each upstream socket to the client's own IP (the server sees the client).
        mark: the firewall mark on upstream sockets (SO_MARK), so the rules can exempt them.
        connect_timeout_s: how long an upstream connect may take before the client is reset.
        log_format: text for humans, JSON (one object per line) for machines.
    """

    listen: list[Endpoint] = field(default_factory=default_listen)
    spoof_source: bool = False
    mark: int = DEFAULT_PROXY_MARK
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    log_format: LogFormat = LogFormat.TEXT
