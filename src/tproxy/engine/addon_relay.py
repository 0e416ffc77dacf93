"""The addon relay: a claimed session's bytes, each chunk passed through the byte hooks of the
addons that claimed it before it is written on (issue 12).

Theory of operation
-------------------
A session an addon claimed (`session.claim()` in its `session_start`) is relayed by this relay
instead of the splice or copy one; every other session never meets it. Each direction is an
`AddonPump`: it reads a chunk (at most 64 KiB, whatever one read returns) from its source and
gives it to its chain -- the claiming addons' `client_data` (up) or `server_data` (down), in the
order the addons were given, each getting the previous one's output -- and queues what the last
one returns for its sink. A hook that returns b"" holds the chunk back; the next ones then see
nothing. When the source sends its FIN, each claiming addon's `client_eof` / `server_eof` is
called in order, and what it returns goes through the *later* addons' data hooks and is queued;
only once that queue is written does the pump report its EOF, so the relay passes the FIN on
after it (`tproxy.core.lifecycle`, as for the other relays: the close matrix is theirs too).

`session.send_to_client(data)` and `session.send_to_upstream(data)` queue raw bytes on the pump
toward that side (`push`); `session.close()` stops reading both sides, writes what is queued,
sends a FIN both ways and then reads (and drops) until both peers have sent theirs, so a peer
still sending sees no reset (`addon_close`); `session.reset()` resets both at once
(`addon_reset`).

Memory: a direction reads its next chunk only once what it queued is written (as the copy relay
does), so a slow reader stops the reading side; and only while the other direction's queue --
which the hooks' `send_to_*` may fill -- is under `INJECTED_LIMIT_BYTES`.

Hooks: each direction's chain is an `AddonChain` (`engine.addon_chain`: plain hooks run inside
the poller's callback, a direction with an `async def` hook runs each chunk in a task and reads
nothing more until it is done). Anything a hook raises, or a return that is not bytes, ends the
session (`on_addon_error`: `addon_error`, the session reset); never the process.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Final

from tproxy.core.lifecycle import Direction, DirectionEnded, End
from tproxy.core.reasons import CloseReason
from tproxy.core.session import SessionRecord
from tproxy.engine.addon_chain import AddonChain, Step, chain_of
from tproxy.engine.addon_session import AddonSession
from tproxy.engine.poller import Poller
from tproxy.engine.pump import COPY_CHUNK_BYTES, Recording, read_to_eof
from tproxy.engine.relay import Relay, Spawn
from tproxy.interception.sockopts import abort_socket, reset_behind_eof
from tproxy.sniffers.passive import FirstBytes

if TYPE_CHECKING:
    from tproxy.addons.loader import Addon, Hook

INJECTED_LIMIT_BYTES: Final = 256 * 1024
"""A direction stops reading while the other direction has more than this queued (what its
hooks sent with `send_to_*` toward a peer that does not read)."""

_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})

OnAddonError = Callable[["Hook", BaseException], None]


class AddonPump:
    """One direction of a claimed session: source → the claiming addons' hooks → sink.

    Its state, besides its queue: reading / writing (its poller registrations), busy (an async
    chain holds a chunk), waiting for room (the other direction holds over
    `INJECTED_LIMIT_BYTES`), its source's FIN read, and -- after the addon's `close()` --
    drained (everything it had is written) and lingering (dropping what the source still
    sends); ended once it has reported its end (or lingered to its source's FIN), stopped once
    the relay is over.
    """

    __slots__ = (
        "_chain", "_direction", "_dst", "_eof_read", "_lingering", "_queue", "_queued",
        "_reading", "_record", "_recording", "_relay", "_src", "_tap", "_waiting_for_room",
        "_writing", "drained", "ended", "stopped",
    )  # fmt: skip

    def __init__(
        self,
        relay: AddonRelay,
        source: socket.socket,
        sink: socket.socket,
        direction: Direction,
        steps: tuple[Step, ...],
        *,
        tap: FirstBytes | None,
        recording: Recording | None,
    ) -> None:
        self._relay = relay
        self._record = relay.record
        self._src = source.fileno()
        self._dst = sink.fileno()
        self._direction = direction
        self._chain = AddonChain(relay, relay.session, steps, self._enqueue, self._chain_done)
        self._tap = tap
        self._recording = recording
        self._queue: collections.deque[bytes | memoryview] = collections.deque()
        self._queued = 0  # bytes in the queue
        self._reading = False
        self._writing = False
        self._waiting_for_room = False
        self._eof_read = False
        self._lingering = False
        self.ended = False
        self.stopped = False
        self.drained = False

    @property
    def queued(self) -> int:
        return self._queued

    # --- what the relay and the addon's session call --------------------------------------------

    def queue_first(self, sent: list[bytes]) -> None:
        """What `session_start` sent this way: written before anything else."""
        for data in sent:
            self._enqueue(data)

    def start(self, pending: bytes) -> None:
        """Begin: take the source's poller registration over (a session that waited for its
        first bytes leaves its own), then `pending` (read before the relay existed) is the first
        chunk."""
        self._arm_reader()
        if pending:
            self._run(pending)
        self.settle()

    def push(self, data: bytes) -> None:
        """Queue `data` for the sink, after what is queued (an addon's `send_to_*`); written
        when the sink is writable."""
        if self._relay.over:
            raise RuntimeError("the session has ended")
        if self.stopped:  # its sink has reset: what is sent to it is lost, as it would be
            return
        if self.ended:
            side = "upstream" if self._direction is Direction.UP else "client"
            raise RuntimeError(f"the {side} has been sent its FIN: nothing more can go to it")
        self._enqueue(data)
        self.drained = False  # (after close(): the FINs wait for this too)
        self._arm_writer()

    def stop(self) -> None:
        """Stop moving bytes; afterwards the pump touches neither socket and calls nobody."""
        self.stopped = True
        self._disarm_reader()
        self._disarm_writer()
        self._chain.stop()
        self._queue.clear()
        self._queued = 0

    def linger(self) -> None:
        """After the addon's close() sent the FINs: read and drop until the source's FIN."""
        if self.stopped:
            return
        self._disarm_writer()
        if self._eof_read:
            self.ended = True
            self._relay.lingered()
            return
        self._lingering = True
        self._arm_reader()

    def settle(self) -> None:
        """Write what is queued; then wait for what comes next: the sink, the async chain,
        the end (EOF passed on once everything is written), the addon's close(), room in the
        other direction, or the source."""
        if self.stopped or self.ended or self._lingering:
            return
        if self._queue and not self._flush():
            return
        self._disarm_writer()
        other = self._relay.other(self)
        if other._waiting_for_room:  # its wait was for this queue
            other._waiting_for_room = False
            other.settle()
            if self.stopped:
                return
        if self._chain.busy:
            self._disarm_reader()
        elif self._eof_read:
            self._finish(End.EOF)
        elif self._relay.closing:
            self._disarm_reader()
            self.drained = True
            self._relay.pump_drained()
        elif other.queued > INJECTED_LIMIT_BYTES:
            self._disarm_reader()
            self._waiting_for_room = True
        else:
            self._arm_reader()

    # --- the poller's callbacks -----------------------------------------------------------------

    def on_readable(self) -> None:
        try:
            if self._lingering:
                self._drop()
                return
            while self._reading and not self.stopped:
                try:
                    data = os.read(self._src, COPY_CHUNK_BYTES)
                except BlockingIOError:
                    return
                except OSError as exc:
                    if exc.errno in _GONE:
                        self._finish(End.SOURCE_RESET)
                        return
                    raise
                self._record.last_activity_at = time.monotonic()
                if not data and self._relay.reset_behind_eof(self):
                    self._finish(End.SOURCE_RESET)  # not a FIN: no eof hook for it
                    return
                if not data:
                    self._eof_read = True
                    self._run(None)
                    self.settle()
                    return
                if self._tap is not None and not self._tap.passed(
                    self._direction is Direction.UP, data
                ):
                    self._tap = None
                self._run(data)
                self.settle()
                if len(data) < COPY_CHUNK_BYTES:
                    return  # the socket was empty a moment ago: the poller calls again
        except Exception as exc:  # reported to the session, never raised into the event loop
            self._relay.pump_failed(exc)

    def on_writable(self) -> None:
        try:
            self.settle()
        except Exception as exc:
            self._relay.pump_failed(exc)

    # --- the chain ------------------------------------------------------------------------------

    def _run(self, data: bytes | None) -> None:
        """Pass `data` (None: the source's FIN) through the chain; an async one holds the
        direction (reads nothing) until it is done (`_chain_done`)."""
        self._chain.run(data)
        if self._chain.busy:
            self._disarm_reader()

    def _chain_done(self) -> None:
        self.settle()

    # --- moving bytes ---------------------------------------------------------------------------

    def _enqueue(self, data: bytes) -> None:
        if data:
            self._queue.append(data)
            self._queued += len(data)

    def _flush(self) -> bool:
        """Write the queue to the sink; False if the sink pushed back (or the pump ended)."""
        queue = self._queue
        try:
            while queue:
                chunk = queue[0]
                n = os.write(self._dst, chunk)
                self._count(chunk, n)
                if n < len(chunk):
                    queue[0] = memoryview(chunk)[n:]
                    self._push_back()
                    return False
                queue.popleft()
        except BlockingIOError:
            self._push_back()
            return False
        except OSError as exc:
            if exc.errno in _GONE:
                self._finish(End.SINK_RESET)
                return False
            raise
        return True

    def _push_back(self) -> None:
        """The sink is full: read nothing more until it has taken the queue."""
        self._disarm_reader()
        self._arm_writer()

    def _count(self, chunk: bytes | memoryview, n: int) -> None:
        self._queued -= n
        record = self._record
        if self._direction is Direction.UP:
            record.bytes_up += n
        else:
            record.bytes_down += n
        record.last_activity_at = time.monotonic()
        if self._recording is not None and not self._recording.relayed(
            self._direction is Direction.UP, chunk[:n]
        ):
            self._recording = None

    def _drop(self) -> None:
        """Lingering: read and drop what the source still sends, until its FIN (or reset)."""
        if read_to_eof(self._src):
            self._disarm_reader()
            self._lingering = False
            self._eof_read = self.ended = True
            self._relay.lingered()

    def _finish(self, end: End) -> None:
        self._disarm_reader()
        self._disarm_writer()
        self.ended = True
        self._relay.pump_ended(self._direction, end)

    def _arm_reader(self) -> None:
        if not self._reading:
            self._relay.poller.add_reader(self._src, self)
            self._reading = True

    def _disarm_reader(self) -> None:
        if self._reading:
            self._relay.poller.remove_reader(self._src)
            self._reading = False

    def _arm_writer(self) -> None:
        if not self._writing:
            self._relay.poller.add_writer(self._dst, self)
            self._writing = True

    def _disarm_writer(self) -> None:
        if self._writing:
            self._relay.poller.remove_writer(self._dst)
            self._writing = False


class AddonRelay(Relay):
    """Relays a claimed session `client` ⇄ `upstream` through its addons' byte hooks (the module
    docstring); ends as `Relay` does (`on_end`, `on_error`, `stop()`), and also by the addon:
    `on_addon_error(hook, exc)` when a hook failed, `on_end` with `addon_close` or
    `addon_reset`. Call `start()` once the owner holds it: the first hooks may run then.

    `pending_up` and `pending_down` are bytes read before the relay started (the sniffed first
    bytes; an upstream proxy's first tunnelled bytes): the chains' first chunks. What the addons
    sent with `send_to_*` in `session_start` goes first, as it is.

    One cell differs from the lifecycle's matrix: a sink that resets while the other direction
    is still moving (the upstream resets while the client uploads) does not abort both at once.
    That direction stops; the other one goes on until it meets the same reset from its source,
    so what it had read -- possibly still in an async hook -- reaches its sink first, and then
    the reset does (the lifecycle's `SOURCE_RESET` cell).
    """

    __slots__ = ("_gone", "_on_addon_error", "_pending", "closing", "over", "session")

    up: AddonPump
    down: AddonPump

    def __init__(
        self,
        poller: Poller,
        client: socket.socket,
        upstream: socket.socket,
        record: SessionRecord,
        *,
        session: AddonSession,
        addons: tuple[Addon, ...],
        on_end: Callable[[CloseReason], None],
        on_error: Callable[[BaseException], None],
        on_addon_error: OnAddonError,
        spawn: Spawn,
        tap: FirstBytes | None = None,
        pending_up: bytes = b"",
        pending_down: bytes = b"",
        recording: Recording | None = None,
    ) -> None:
        self._setup(poller, client, upstream, record, on_end=on_end, on_error=on_error,
                    spawn=spawn, recording=recording)  # fmt: skip
        record.relay = "addon"
        self.session = session
        self._on_addon_error = on_addon_error
        self._pending = (pending_up, pending_down)
        self.closing = False  # the addon called close(): drain, FIN both ways, linger
        # Over: ended, ending, or past the close's FINs -- hooks' results are dropped, sending
        # raises.
        self.over = False
        self._gone: DirectionEnded | None = None  # a sink's reset, passed on by the other way
        claimers = session.claimers
        self.up = AddonPump(self, client, upstream, Direction.UP,
                            chain_of(addons, claimers, up=True), tap=tap,
                            recording=recording)  # fmt: skip
        self.down = AddonPump(self, upstream, client, Direction.DOWN,
                              chain_of(addons, claimers, up=False), tap=tap,
                              recording=recording)  # fmt: skip

    @property
    def poller(self) -> Poller:
        return self._poller

    @property
    def record(self) -> SessionRecord:
        return self._record

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self._spawn(coro)

    @property
    def tls_outcome(self) -> None:
        """Not intercepted: the addons see the bytes as they cross."""
        return None

    def other(self, pump: AddonPump) -> AddonPump:
        return self.down if pump is self.up else self.up

    def reset_behind_eof(self, pump: AddonPump) -> bool:
        """Whether the end `pump` just read from its source is a reset, not a FIN: the other
        direction already met that reset writing to it (which leaves the read a plain EOF), or
        the reset came behind the FIN."""
        source = self._client if pump is self.up else self._upstream
        return self._gone is not None or (source is not self._shut and reset_behind_eof(source))

    def start(self) -> None:
        """Hand the addons' session over to this relay and start both directions: what
        `session_start` sent first, then the pending bytes through the chains."""
        to_upstream, to_client = self.session.attach(self)
        self.up.queue_first(to_upstream)
        self.down.queue_first(to_client)
        pending_up, pending_down = self._pending
        self._pending = (b"", b"")
        self.up.start(pending_up)
        if not self._done:
            self.down.start(pending_down)

    def stop(self) -> None:
        self.over = True
        self.session.detach()
        super().stop()

    def pump_ended(self, direction: Direction, end: End) -> None:
        if self._done:
            return
        pump = self.up if direction is Direction.UP else self.down
        ended = DirectionEnded(direction, end)
        gone = self._gone
        if gone is not None and end is not End.SOURCE_RESET:
            self._after_gone(gone, direction, end)
            return
        if end is End.SINK_RESET and not self.closing and not self.other(pump).ended:
            self._gone = ended
            pump.stop()
            # The other way goes on, bounded as a half-closed session is; it may have waited
            # for room in this direction's queue, now dropped.
            self._record.half_closed_at = time.monotonic()
            other = self.other(pump)
            if other._waiting_for_room:
                other._waiting_for_room = False
                other.settle()
            return
        super().pump_ended(direction, end)
        if self._done:
            self.over = True
            self.session.detach()
        elif self.closing and end is End.EOF:
            self.pump_drained()  # that direction is done: its FIN went on

    def _after_gone(self, gone: DirectionEnded, direction: Direction, end: End) -> None:
        """After a sink's reset, the other way ended without meeting it: by its FIN (its sink
        has everything: wait until it acknowledged it, then reset both) or by its own sink's
        reset (both peers are gone: reset both now)."""
        self.up.stop()
        self.down.stop()
        self._done = self.over = True
        self.session.detach()
        if self._recording is not None:
            self._record_end(gone.direction, gone.end)
        if end is End.EOF:
            sink = self._upstream if direction is Direction.UP else self._client
            self._drain = self._spawn(self._drain_then_abort(sink, [gone]))
        else:
            self._abort_and_end([gone])

    def hook_failed(self, hook: Hook, exc: BaseException) -> None:
        """A hook raised or returned nonsense: stop, and let the owner reset the session."""
        if self._done:
            return
        self.stop()
        self._on_addon_error(hook, exc)

    # --- the addon's close() and reset() --------------------------------------------------------

    def addon_reset(self) -> None:
        """The addon's `session.reset()`: both sides reset at once, what is queued dropped."""
        if self._done:
            return
        self.stop()
        if self._recording is not None:
            self._recording.ended(from_client=False, reset=True)
        for sock in (self._client, self._upstream):
            if sock.fileno() >= 0:
                self._poller.forget(sock.fileno())
            abort_socket(sock)
        self._on_end(CloseReason.ADDON_RESET)

    def addon_close(self) -> None:
        """The addon's `session.close()`: read no more; once everything read is through the
        chains and written (`pump_drained`), FIN both ways."""
        if self._done or self.closing or self._gone is not None:
            return  # (after a sink's reset the session ends with that reset, not a FIN)
        self.closing = True
        self._record.half_closed_at = time.monotonic()  # the linger is bounded as a half-close
        # Settled on the next round of the loop: the hook that called close() may still be
        # returning bytes to queue. A chunk still in an async chain is waited for (bounded by
        # the hooks' timeout): its pump settles when the chain is done.
        asyncio.get_running_loop().call_soon(self._settle_both)

    def _settle_both(self) -> None:
        try:
            for pump in (self.up, self.down):
                if not self._done:
                    pump.settle()
        except Exception as exc:
            self.pump_failed(exc)

    def pump_drained(self) -> None:
        """After close(): once both directions have written everything they read, FIN both
        ways and linger until both peers have sent theirs."""
        pumps = (self.up, self.down)
        if self._done or self.over or not all(p.ended or p.drained for p in pumps):
            return
        self.over = True
        for sock, from_client in ((self._upstream, True), (self._client, False)):
            if sock is not self._shut:
                self._shutdown_write(sock)
                if self._recording is not None:
                    self._recording.ended(from_client=from_client, reset=False)
        for pump in pumps:
            if not self._done:
                pump.linger()

    def lingered(self) -> None:
        if not self._done and self.up.ended and self.down.ended:
            self._done = True
            self.session.detach()
            self._on_end(CloseReason.ADDON_CLOSE)
