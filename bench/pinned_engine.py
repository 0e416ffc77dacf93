"""The pinned A/B's proxy: `tproxy run` itself, whose original destination is one fixed address.

`python -m bench.pinned_engine HOST:PORT RUN-ARGS...` runs `tproxy run RUN-ARGS...` through the
CLI's own code (configuration, policy and addon loading, `ProxyServer`, uvloop), with one change:
every accepted connection's original destination is HOST:PORT. The client then connects to the
proxy's listening port directly, inside a network namespace with loopback only, and nothing
(nftables, TPROXY, routing) has to divert it.

The change is a subclass of `ProxyServer` that replaces its sessions' destination lookup (the
`SessionContext.destination` the server sets from `--mode`), put in the CLI's place for this
process only.
"""

from __future__ import annotations

import socket
import sys
from typing import Any
from unittest import mock

from tproxy.cli import main as cli
from tproxy.engine.server import ProxyServer


def parse_hostport(text: str) -> tuple[str, int]:
    """`("127.0.0.1", 80)` from `127.0.0.1:80`.

    Raises:
        ValueError: no port, or not a number.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"not HOST:PORT: {text!r}")
    return host, int(port)


def fixed_server(destination: tuple[str, int]) -> type[ProxyServer]:
    """A `ProxyServer` whose every session's original destination is `destination`."""

    def lookup(_sock: socket.socket) -> tuple[Any, ...]:
        return destination

    class FixedDestinationServer(ProxyServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._ctx.destination = lookup

    return FixedDestinationServer


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m bench.pinned_engine HOST:PORT RUN-ARGS...", file=sys.stderr)
        return 2
    server = fixed_server(parse_hostport(argv[0]))
    with mock.patch.object(cli, "ProxyServer", server):
        return cli.main(["run", *argv[1:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
