"""An awaitable face on the engine's `Relay`, for tests: relay two connected sockets to the end."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any

from tproxy.addons.loader import Addon
from tproxy.core.reasons import CloseReason
from tproxy.core.session import SessionRecord
from tproxy.engine.addon_relay import AddonRelay
from tproxy.engine.addon_session import AddonSession
from tproxy.engine.pipes import PipePool
from tproxy.engine.poller import Poller
from tproxy.engine.pump import SPLICE_AFTER_BYTES, Recording
from tproxy.engine.relay import Relay
from tproxy.sniffers.passive import FirstBytes


async def relay(
    client: socket.socket,
    upstream: socket.socket,
    record: SessionRecord,
    pool: PipePool | None,
    splice_after: int = SPLICE_AFTER_BYTES,
    *,
    tap: FirstBytes | None = None,
    recording: Recording | None = None,
    addons: tuple[Addon, ...] | None = None,
) -> CloseReason:
    """Relay to the end, close both sockets as a session does, return the close reason.

    `pool` None copies; a pool splices after each direction's first `splice_after` bytes; a
    `tap` sees the first bytes as they pass, as a session's sniffer does; a `recording` sees
    every byte written and every end, as a captured session's recorder does. With `addons`,
    the addon relay, every one of them claiming the session (a hook's error is raised).
    """
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[CloseReason] = loop.create_future()
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    poller = Poller(loop)
    the_relay: Relay
    if addons is None:
        the_relay = Relay(poller, client, upstream, record, pool=pool,
                          on_end=finished.set_result, on_error=finished.set_exception,
                          spawn=spawn, splice_after=splice_after, tap=tap,
                          recording=recording)  # fmt: skip
    else:
        session = AddonSession(record, None, "allow")
        session.claimers = [addon.name for addon in addons]
        the_relay = AddonRelay(poller, client, upstream, record, session=session, addons=addons,
                               on_end=finished.set_result, on_error=finished.set_exception,
                               on_addon_error=lambda _, exc: finished.set_exception(exc),
                               spawn=spawn, tap=tap, recording=recording)  # fmt: skip
        the_relay.start()
    try:
        return await finished
    finally:
        if not finished.done():
            the_relay.stop()
        poller.close()
        client.close()  # the last FIN, after a clean end (a reset has closed them already)
        upstream.close()


async def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two connected, non-blocking TCP sockets on loopback: real resets are real resets."""
    loop = asyncio.get_running_loop()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        a = socket.socket()
        a.setblocking(False)
        await loop.sock_connect(a, listener.getsockname())
        b, _ = await loop.sock_accept(listener)
        b.setblocking(False)
        return a, b


async def read_until_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything `sock` receives, and how it ended: "eof" or "reset"."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    try:
        while chunk := await loop.sock_recv(sock, 1 << 16):
            data += chunk
    except ConnectionResetError:
        return bytes(data), "reset"
    return bytes(data), "eof"
