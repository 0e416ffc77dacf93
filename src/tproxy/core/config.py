"""The proxy's configuration: defaults, a TOML file, command-line overrides; validated, no I/O.

The file (`tproxy run --config FILE`) uses the long option names with underscores:

    mode = "tproxy"
    listen = ["0.0.0.0:1800", "[::]:1800"]
    spoof_source = true
    mark = 2
    connect_timeout = 10
    idle_timeout = 3600
    half_closed_timeout = 60
    max_connections = 5000
    drain_timeout = 30
    log_format = "json"
    relay = "splice"
    loop = "uvloop"

Options given on the command line win over the file; SIGHUP re-reads the file and keeps those
overrides.
"""

from __future__ import annotations

import enum
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tproxy.core.endpoint import Endpoint, EndpointError, parse_endpoint
from tproxy.core.lifecycle import Timeouts

DEFAULT_PROXY_PORT = 1800
# The mark on every upstream socket. It must differ from the divert mark (0x1 by default) so the
# proxy's own packets never match the policy-routing rule that delivers diverted packets locally.
DEFAULT_PROXY_MARK = 0x2
DEFAULT_DIVERT_MARK = 0x1
DEFAULT_CONNECT_TIMEOUT_S = 10.0
# Long-lived quiet connections (SSH, databases) are normal through a router: an hour of silence.
DEFAULT_IDLE_TIMEOUT_S = 3600.0
# One side said FIN and the other went quiet: conntrack gives such flows 60-120 s.
DEFAULT_HALF_CLOSED_TIMEOUT_S = 60.0
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# Descriptors kept out of the session budget: listeners, stdio, the event loop, the reserve.
RESERVED_DESCRIPTORS = 64


class ConfigError(ValueError):
    """An invalid configuration; the message is one sentence for the operator."""


class InterceptMode(enum.Enum):
    """How connections reach the proxy, and so where their original destination comes from.

    TPROXY: the kernel hands the untouched connection to a transparent listener; the original
    destination is the accepted socket's own address, and the proxy may connect upstream from the
    client's address (spoofing). REDIRECT: NAT rewrites the destination to the proxy's port;
    the original destination is asked of conntrack (SO_ORIGINAL_DST), and spoofing is not
    possible (the server's replies to the client's address reach the proxy only through the
    TPROXY rules' socket match and policy routing).
    """

    TPROXY = "tproxy"
    REDIRECT = "redirect"


class RelayKind(enum.Enum):
    """How bytes move: splice (zero-copy, in the kernel) or copy (through Python)."""

    SPLICE = "splice"
    COPY = "copy"


class LoopKind(enum.Enum):
    """The event loop under the engine."""

    UVLOOP = "uvloop"
    ASYNCIO = "asyncio"


class LogFormat(enum.Enum):
    TEXT = "text"
    JSON = "json"


def default_listen() -> list[Endpoint]:
    return [
        parse_endpoint(f"0.0.0.0:{DEFAULT_PROXY_PORT}"),
        parse_endpoint(f"[::]:{DEFAULT_PROXY_PORT}"),
    ]


def max_connections_for(nofile_limit: int) -> int:
    """The most sessions `nofile_limit` descriptors can carry: two each, after the reserve."""
    return max(1, (nofile_limit - RESERVED_DESCRIPTORS) // 2)


@dataclass(frozen=True)
class ProxyConfig:
    """What `tproxy run` does.

    Args:
        mode: TPROXY (the default) or REDIRECT; fixed at start (a reload cannot change it).
        listen: the listening endpoints (transparent in TPROXY mode).
        spoof_source: bind each upstream socket to the client's own IP (the server sees the client).
        mark: the firewall mark on upstream sockets (SO_MARK), so the rules can exempt them.
        connect_timeout_s: how long an upstream connect may take before the client is reset.
        idle_timeout_s: a session with no byte either way for this long is cut (both reset).
        half_closed_timeout_s: a session with one direction finished and no byte for this long
            is cut.
        max_connections: live sessions at most; None means derived from the open-file limit.
        drain_timeout_s: on SIGTERM/SIGINT, how long live sessions may take to finish.
        log_format: text for humans, JSON (one object per line) for machines.
        relay: splice (zero-copy, the default) or copy (through Python).
        loop: uvloop (the default) or asyncio's own loop.
    """

    mode: InterceptMode = InterceptMode.TPROXY
    listen: list[Endpoint] = field(default_factory=default_listen)
    spoof_source: bool = False
    mark: int = DEFAULT_PROXY_MARK
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    half_closed_timeout_s: float = DEFAULT_HALF_CLOSED_TIMEOUT_S
    max_connections: int | None = None
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    log_format: LogFormat = LogFormat.TEXT
    relay: RelayKind = RelayKind.SPLICE
    loop: LoopKind = LoopKind.UVLOOP

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(self.idle_timeout_s, self.half_closed_timeout_s)


# File keys and the ProxyConfig field each one sets.
_FILE_KEYS = {
    "mode": "mode",
    "listen": "listen",
    "spoof_source": "spoof_source",
    "mark": "mark",
    "connect_timeout": "connect_timeout_s",
    "idle_timeout": "idle_timeout_s",
    "half_closed_timeout": "half_closed_timeout_s",
    "max_connections": "max_connections",
    "drain_timeout": "drain_timeout_s",
    "log_format": "log_format",
    "relay": "relay",
    "loop": "loop",
}
_SECONDS = {"connect_timeout_s", "idle_timeout_s", "half_closed_timeout_s", "drain_timeout_s"}


def _check_value(name: str, value: Any) -> Any:
    """Validate one file value for field `name`; return it converted."""
    if name == "listen":
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise ConfigError('listen must be a non-empty list of "HOST:PORT" strings')
        try:
            return [parse_endpoint(v) for v in value]
        except EndpointError as exc:
            raise ConfigError(f"listen: {exc}") from None
    if name == "spoof_source":
        if not isinstance(value, bool):
            raise ConfigError("spoof_source must be true or false")
        return value
    if name in ("mark", "max_connections"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be a whole number")
        if name == "mark" and not 1 <= value <= 0xFFFFFFFF:
            raise ConfigError("mark must be from 1 to 0xffffffff")
        if name == "max_connections" and value < 1:
            raise ConfigError("max_connections must be at least 1")
        return value
    if name in _SECONDS:
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ConfigError(f"{name.removesuffix('_s')} must be a number of seconds above 0")
        return float(value)
    if name == "log_format":
        try:
            return LogFormat(value)
        except ValueError:
            raise ConfigError('log_format must be "text" or "json"') from None
    if name == "mode":
        try:
            return InterceptMode(value)
        except ValueError:
            raise ConfigError('mode must be "tproxy" or "redirect"') from None
    if name == "relay":
        try:
            return RelayKind(value)
        except ValueError:
            raise ConfigError('relay must be "splice" or "copy"') from None
    if name == "loop":
        try:
            return LoopKind(value)
        except ValueError:
            raise ConfigError('loop must be "uvloop" or "asyncio"') from None
    raise AssertionError(name)


def parse_config_file(text: str) -> dict[str, Any]:
    """ProxyConfig field values from the TOML text of a config file.

    Raises:
        ConfigError: not TOML, an unknown key, or a value of the wrong kind.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None
    values: dict[str, Any] = {}
    for key, value in raw.items():
        name = _FILE_KEYS.get(key)
        if name is None:
            known = ", ".join(sorted(_FILE_KEYS))
            raise ConfigError(f"unknown setting {key!r} (known: {known})")
        values[name] = _check_value(name, value)
    return values


def build_config(file_values: Mapping[str, Any], overrides: Mapping[str, Any]) -> ProxyConfig:
    """Defaults, then the file's values, then the command line's; unknown names are a bug."""
    names = {f.name for f in fields(ProxyConfig)}
    merged = {**file_values, **overrides}
    unknown = set(merged) - names
    if unknown:
        raise AssertionError(f"not ProxyConfig fields: {sorted(unknown)}")
    config = replace(ProxyConfig(), **merged)
    if config.mode is InterceptMode.REDIRECT and config.spoof_source:
        raise ConfigError(
            "--spoof-source (spoof_source) is not available in redirect mode: the server's "
            "replies to the client's address come back to the proxy only with the TPROXY rules "
            "(socket match and policy routing); use --mode tproxy to spoof"
        )
    return config
