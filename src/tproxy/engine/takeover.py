"""A seamless restart (`tproxy run --takeover`): the new process gets the running one's listening
sockets over the control socket (`engine.control`), serves on them, and then tells the old one
to drain. The pure halves: what the old one sends (`handover`) and what the new one makes of it
(`adopt`), checked against its own configuration.

The sockets are the running ones, not copies bound again: their accept queues, the reuseport
group and its steering program (each client on the same worker index) and their transparency
carry over, and at no moment is the port without a listener. Both processes accept from them
until the old one drains; the connection goes to whichever accepts first.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from typing import Any

from tproxy.core.endpoint import Endpoint
from tproxy.engine.control import ControlError


def handover(
    endpoints: Sequence[Endpoint], per_worker: Sequence[Sequence[socket.socket]],
    metrics: tuple[Endpoint, socket.socket] | None = None,
) -> tuple[dict[str, Any], list[int]]:  # fmt: skip
    """The reply to `takeover`: the endpoints and worker count, and every listening socket's
    descriptor, endpoint by endpoint, worker by worker (`per_worker[w][e]`); then the metrics
    endpoint's (`--metrics-listen`), if it has one."""
    fds = [per_worker[w][e].fileno() for e in range(len(endpoints)) for w in range(len(per_worker))]
    message = {"ok": True, "pid": os.getpid(), "workers": len(per_worker),
               "listen": [str(endpoint) for endpoint in endpoints], "metrics": None}  # fmt: skip
    if metrics is not None:
        message["metrics"] = str(metrics[0])
        fds.append(metrics[1].fileno())
    return message, fds


def split_metrics(message: dict[str, Any], fds: list[int]) -> tuple[str | None, int | None]:
    """Take the metrics endpoint's descriptor (the last) off `fds`, if the reply has one: its
    endpoint as the running proxy names it, and the descriptor."""
    endpoint = message.get("metrics")
    if not isinstance(endpoint, str) or not fds:
        return None, None
    return endpoint, fds.pop()


def adopt_metrics(
    endpoint: str | None, fd: int | None, wanted: Endpoint | None
) -> socket.socket | None:
    """The running proxy's metrics socket if it listens where this one wants to (then the port
    is never without a listener either); else None, and the descriptor is closed (this one binds
    its own, or serves none)."""
    if fd is None:
        return None
    if wanted is None or endpoint != str(wanted):
        os.close(fd)
        return None
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def adopt(
    message: dict[str, Any], fds: list[int], endpoints: Sequence[Endpoint], workers: int
) -> list[list[socket.socket]]:
    """The new process's per-worker listening sockets from the running one's reply. Each
    descriptor is taken (closed on failure).

    Raises:
        ControlError: the running proxy refused, listens elsewhere, has another number of
            workers, or sent something that is not a listening socket of the endpoint's family.
    """
    adopted: list[socket.socket] = []
    try:
        if not message.get("ok"):
            raise ControlError(f"the running tproxy refused: {message.get('error', '?')}")
        listen = [str(endpoint) for endpoint in endpoints]
        if message.get("listen") != listen:
            raise ControlError(
                f"the running tproxy listens on {', '.join(map(str, message.get('listen') or []))}"
                f", this one would on {', '.join(listen)}: --listen cannot change in a takeover"
            )
        if message.get("workers") != workers:
            raise ControlError(
                f"the running tproxy has {message.get('workers')} workers, this one would have "
                f"{workers}: give --workers {message.get('workers')} (each client's worker must "
                "stay the same)"
            )
        if len(fds) != len(endpoints) * workers:
            raise ControlError(f"expected {len(endpoints) * workers} listening sockets, got "
                               f"{len(fds)}")  # fmt: skip
        per_worker: list[list[socket.socket]] = [[] for _ in range(workers)]
        for index, fd in enumerate(fds):
            sock = socket.socket(fileno=fd)
            adopted.append(sock)
            endpoint = endpoints[index // workers]
            if sock.family != endpoint.family or not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                raise ControlError(f"what came for {endpoint} is not a listening socket")
            sock.setblocking(False)
            per_worker[index % workers].append(sock)
    except BaseException as exc:
        for sock in adopted:
            sock.close()
        for fd in fds[len(adopted) :]:
            os.close(fd)
        if isinstance(exc, OSError):  # (not a socket at all)
            raise ControlError(f"what came as a listening socket is not one: {exc}") from None
        raise
    return per_worker
