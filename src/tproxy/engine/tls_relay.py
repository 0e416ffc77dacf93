"""The TLS relay: an intercepted session's two TLS handshakes, then its plaintext both ways
(issue 13).

Theory of operation
-------------------
A session whose verdict intercepts TLS reaches this relay with both sockets connected and the
client's ClientHello already read (the sniffer held it). The relay is the TLS server toward the
client and the TLS client toward the upstream (`tproxy.tls.legs`: each leg an `SSLObject` over
memory BIOs); it moves ciphertext between the sockets and the legs, and plaintext between the
legs. Three phases:

1. UPSTREAM_HANDSHAKE. Our ClientHello (the client's SNI and ALPN list) goes to the upstream;
   its answers go into the upstream leg until it is established or failed. The client is read
   meanwhile only to notice it leaving: what it sends is held (at most `HELD_LIMIT_BYTES`) for
   its handshake. A failure resets both sides with the leg's reason (`upstream_cert_invalid`,
   `upstream_wants_client_cert`, `upstream_tls_failed`).
2. CLIENT_HANDSHAKE. The upstream's certificate is read (`read_upstream_cert`), a leaf is
   forged for the SNI and the names it carries (`LeafForger.leaf_for`), and the client leg
   starts from a context offering exactly the ALPN the upstream chose; the held ClientHello goes
   in first, then what the client sends. The upstream is not read meanwhile (what it said after
   its handshake waits for the client leg). A failure resets both: `client_tls_failed`, and
   `outcome.rejected` says whether the client refused our certificate
   (`client_rejected_certificate`: for passthrough memory).
3. RELAYING. Each direction (`_Way`) reads its source, gives the ciphertext to the source's leg,
   gives the plaintext that comes out to the plaintext hook (`Recording`, as the capture's
   recorder does for the other relays) and to the sink's leg, and queues the sink leg's
   ciphertext for the sink socket. Whatever the source's leg answers (a TLS 1.3 KeyUpdate, an
   alert) is queued toward the source, on the other direction's queue.

Resumption: the upstream leg offers the session an earlier leg to the same place left
(`tls.resumption`: the same name, address, port, verify flag and ALPN list), and leaves its own
once it has one (TLS 1.2 at once; a TLS 1.3 ticket in the first reads after the handshake); an
upstream handshake that fails forgets it.

Each handshake must end within `handshake_timeout_s`: `handshake_deadline_at` (monotonic) says
until when, for the server's sweep, which calls `handshake_deadline_passed()` after it.

Ends, mapped onto the close matrix of `tproxy.core.lifecycle` (this class is a `Relay`, and
its `pump_ended` carries the matrix out):

==============================  =============================  ================================
the source                      the direction ends             the session
==============================  =============================  ================================
close_notify                    EOF, once our close_notify is  FIN passed on (after our
                                written to the sink            close_notify); the other way on
TCP FIN without close_notify    EOF, with no close_notify      a bare FIN passed on: the sink's
                                written to the sink            TLS sees the truncation its peer
                                (truncated)                    made, no more and no less (many
                                                               peers end so once their own
                                                               framing says they are done)
TCP RST                         SOURCE_RESET                   drain the sink, reset both
a TLS error after the           SOURCE_RESET (the failure is   drain the sink, reset both
handshake (bad record, alert)   in `outcome`)                  (alert 116 certificate_required
                                                               from the upstream: reset both,
                                                               `upstream_wants_client_cert`)
the sink's RST (write fails)    SINK_RESET                     reset both
==============================  =============================  ================================

Memory: a direction reads its source only when its queue toward the sink is written, and only
while the queue toward its source (the other direction's, where the source leg's answers go)
holds at most `ANSWER_LIMIT_BYTES`; one read is at most `COPY_CHUNK_BYTES` of ciphertext. So a
session holds at most about one chunk of plaintext per direction, as the copy relay does.

Addons: a session the addons claimed (`session`) runs each direction's plaintext through their
byte hooks (`engine.addon_chain`, as the addon relay does with bytes): what a hook returns goes
to the sink's leg; an `async def` hook holds only its direction (the source is not read
meanwhile); a clean end of the source's stream (close_notify, or a bare FIN) first runs the eof
hooks, whose bytes go before our close_notify (or the bare FIN). The addons' session is
attached once the upstream's handshake is done (what `session_start` sent goes first, as the
client's leg starts); `send_to_*` encrypts toward that peer (`push`); `close()` (only once
relaying) drains both ways, sends our close_notify and a FIN to both peers and reads and drops
until both have sent their FIN (`addon_close`); `reset()` resets both (`addon_reset`); a hook's
error stops the relay (`on_addon_error`: the session resets with `addon_error`). The memory
bound is the one above: what the hooks send is queued ciphertext like the rest. Unlike the
addon relay, a sink's reset resets both at once (the lifecycle's matrix, no exception).

Plaintext is counted as the session's bytes (`bytes_up` and `bytes_down`: what the client's and
the upstream's applications sent, handed to the other leg), never the TLS records around it.
Everything runs as poller callbacks; nothing here awaits (the relay's drain after a reset does,
as for every relay).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import errno
import ipaddress
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from tproxy.core.endpoint import IPAddress
from tproxy.core.lifecycle import Direction, End
from tproxy.core.reasons import CloseReason
from tproxy.core.session import SessionRecord
from tproxy.engine.addon_chain import AddonChain, chain_of
from tproxy.engine.poller import Poller
from tproxy.engine.pump import COPY_CHUNK_BYTES, Recording, read_to_eof
from tproxy.engine.relay import Relay, Spawn
from tproxy.interception.sockopts import abort_socket, reset_behind_eof
from tproxy.sniffers.facts import TlsHello
from tproxy.tls.ca import load_ca
from tproxy.tls.contexts import LeafContexts, UpstreamContexts, usable_alpn
from tproxy.tls.forge import LeafForger, read_upstream_cert
from tproxy.tls.legs import (
    ClientLeg,
    TLSFailure,
    TLSInfo,
    TLSLeg,
    UpstreamLeg,
    bounded,
    client_rejected_certificate,
    open_client_leg,
    open_upstream_leg,
    verify_name,
)
from tproxy.tls.names import NameRejected, UpstreamCertFacts
from tproxy.tls.resumption import ResumeKey

if TYPE_CHECKING:
    from collections.abc import Coroutine

    from tproxy.addons.loader import Addon, Hook
    from tproxy.engine.addon_session import AddonSession

    OnAddonError = Callable[[Hook, BaseException], None]

HELD_LIMIT_BYTES: Final = 64 * 1024
"""What the client may send while the upstream handshakes (the rest of its ClientHello, early
data) and is held for its own handshake; past this the client is not read until then."""

ANSWER_LIMIT_BYTES: Final = 256 * 1024
"""A direction stops reading while more than this waits to be written back to its own source
(the source leg's answers: a peer sending KeyUpdate requests without reading)."""

_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})
_REASONS = {reason.value: reason for reason in CloseReason}


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Interception:
    """What every intercepted session of a worker shares: made once per worker from the
    configuration (`--ca`, `--upstream-ca`, `--keylog`, `--tls-handshake-timeout`).

    Args:
        forger: forges (and caches) the leaves, signed by the CA.
        leaves: the contexts presenting them to clients (`LeafContexts(forger.leaf_key_pem)`).
        upstreams: the contexts toward upstreams.
        handshake_timeout_s: how long each of the two handshakes may take.
        clock: the wall clock leaves are forged at (tests set it).
    """

    forger: LeafForger
    leaves: LeafContexts
    upstreams: UpstreamContexts
    handshake_timeout_s: float
    clock: Callable[[], datetime] = field(default=_utc_now)


def interception_for(
    ca_dir: str, upstream_ca: str | None, handshake_timeout_s: float, *,
    keylog: str | None = None, running: Interception | None = None,
) -> Interception:  # fmt: skip
    """A worker's interception, made when it starts (the CA loaded, one leaf key) or, on a
    reload (`running`), with the running forger and leaf contexts kept (the CA changes only on
    a restart) and the upstream contexts made again only when `--upstream-ca` changed.

    Args:
        keylog: where both legs' contexts append their secrets (`open_keylog`'s
            `/proc/self/fd/N`); None: no key log. Ignored on a reload: the running one's is
            kept (`--keylog` changes only on restart).

    Raises:
        CAError: the CA cannot be used (checked at start-up already: a CA edited since).
    """
    if running is not None:
        upstreams = running.upstreams
        if upstreams.cafile != upstream_ca:
            upstreams = UpstreamContexts(upstream_ca, keylog=upstreams.keylog)
        return dataclasses.replace(running, upstreams=upstreams,
                                   handshake_timeout_s=handshake_timeout_s)  # fmt: skip
    forger = LeafForger(load_ca(ca_dir))
    return Interception(forger, LeafContexts(forger.leaf_key_pem, keylog=keylog),
                        UpstreamContexts(upstream_ca, keylog=keylog),
                        handshake_timeout_s)  # fmt: skip


class TLSPhase(enum.Enum):
    UPSTREAM_HANDSHAKE = "upstream_handshake"
    CLIENT_HANDSHAKE = "client_handshake"
    RELAYING = "relaying"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class TLSOutcome:
    """What the session's close event says of its TLS.

    Args:
        client: what the client leg negotiated (None: its handshake never completed).
        upstream: what the upstream leg negotiated, with the upstream's certificate.
        failure: why a leg failed (during a handshake: the close reason is its `reason`; after
            them: the session ended as that side's reset, but for `upstream_wants_client_cert`,
            which is the close reason wherever it comes), None when none did.
        failed_side: "client" or "upstream" when `failure` is set.
        rejected: why the client is taken to have refused our certificate
            (`client_rejected_certificate`), None when it did not.
        upstream_verify: the upstream's certificate was to be verified (`upstream_verify`).
        dropped_names: names of the upstream's certificate the forged leaf left out, and why.
    """

    client: TLSInfo | None
    upstream: TLSInfo | None
    failure: TLSFailure | None
    failed_side: str | None
    rejected: str | None
    upstream_verify: bool
    dropped_names: tuple[str, ...] = ()

    @property
    def intercepted(self) -> bool:
        """Both handshakes completed: the session was decrypted."""
        return self.client is not None and self.upstream is not None


class _Way:
    """One direction: its source (read, through the source's leg) and its queue of ciphertext
    for the sink. The poller calls it for its source's readability and its sink's writability;
    the relay decides everything."""

    __slots__ = (
        "chain", "direction", "dst", "ended", "ending", "eof_ran", "eof_wanted", "lingering",
        "queue", "queued", "reading", "relay", "src", "stopped", "writing",
    )  # fmt: skip

    def __init__(
        self, relay: TLSRelay, source: socket.socket, sink: socket.socket, direction: Direction
    ) -> None:
        self.relay = relay
        self.src = source.fileno()
        self.dst = sink.fileno()
        self.direction = direction
        self.queue: collections.deque[bytes | memoryview] = collections.deque()
        self.queued = 0
        self.reading = False
        self.writing = False
        self.ending: End | None = None  # how it ends, once its queue is written
        self.ended = False  # reported to the relay
        self.stopped = False
        # A claimed session's: the addons' hooks for this way's plaintext (`engine.addon_chain`).
        self.chain: AddonChain | None = None
        # The source's stream ended cleanly and waits for the eof hooks: whether the sink is
        # then sent our close_notify (None: no such wait); `eof_ran`: the eof hooks have run.
        self.eof_wanted: bool | None = None
        self.eof_ran = False
        self.lingering = False  # after the addon's close(): read and drop until the FIN

    def enqueue(self, data: bytes) -> None:
        if data and not self.ended and not self.stopped:
            self.queue.append(data)
            self.queued += len(data)

    def push(self, data: bytes) -> None:
        """An addon's `send_to_upstream` (up) or `send_to_client` (down)."""
        self.relay.push(self, data)

    def emit(self, plaintext: bytes) -> None:
        """What the chain's hooks returned: on to the sink's TLS."""
        self.relay.pass_on(self, plaintext)

    def chain_done(self) -> None:
        """The chain's task ended: carry on (its end, if it was the eof hooks)."""
        self.relay.chain_done(self)

    def on_readable(self) -> None:
        try:
            self.relay.source_readable(self)
        except Exception as exc:  # reported to the session, never raised into the event loop
            self.relay.pump_failed(exc)

    def on_writable(self) -> None:
        try:
            self.relay.settle()
        except Exception as exc:
            self.relay.pump_failed(exc)

    def arm_reader(self, wanted: bool) -> None:
        if wanted and not self.reading:
            self.relay.poller.add_reader(self.src, self)
            self.reading = True
        elif not wanted and self.reading:
            self.relay.poller.remove_reader(self.src)
            self.reading = False

    def arm_writer(self, wanted: bool) -> None:
        if wanted and not self.writing:
            self.relay.poller.add_writer(self.dst, self)
            self.writing = True
        elif not wanted and self.writing:
            self.relay.poller.remove_writer(self.dst)
            self.writing = False

    def stop(self) -> None:
        """Stop moving bytes; afterwards the way touches neither socket and calls nobody."""
        self.stopped = True
        if self.chain is not None:
            self.chain.stop()
        self.arm_reader(False)
        self.arm_writer(False)
        self.queue.clear()
        self.queued = 0


class TLSRelay(Relay):
    """Relays an intercepted session `client` ⇄ `upstream` (the module docstring): both
    handshakes, then plaintext both ways. Ends as `Relay` does (`on_end(reason)` once, with
    both sockets left open after a clean close and reset otherwise; `on_error(exc)`; `stop()`
    from outside), with a leg's reason when a handshake failed. Call `start()` once the owner
    holds it; `outcome` says what happened to the TLS.

    Args:
        hello: the client's ClientHello as sniffed (its SNI and ALPN are offered upstream).
        held: the client's bytes read while sniffing: the ClientHello (and whatever followed).
        destination: the original destination's IP (verified, and forged for, without SNI).
        interception: the worker's forger and contexts.
        upstream_verify: verify the upstream's certificate (the verdict's `upstream_verify`).
        recording: shown the plaintext each way as it is handed to the other leg, and the ends
            (a captured session; the hook point for anything that wants the plaintext).
        pending_down: bytes of the upstream's read before the relay (a `via` proxy's answer
            came with them): the upstream's first ciphertext.
        session: the addons' session, when addons claimed it: their byte hooks then see the
            plaintext (`record.relay` is "addon"), and they may send, close and reset
            (`push`, `addon_close`, `addon_reset`); attached once the upstream's handshake is
            done.
        addons: the session's addons (their claiming ones' hooks are the chains).
        on_addon_error: called when a hook failed (the relay has stopped; the owner resets).
    """

    __slots__ = (
        "_closed", "_early_down", "_failed_side", "_failure", "_held", "_hello",
        "_interception", "_leaf_dropped", "_on_addon_error", "_pending_down", "_plaintext",
        "_resume_key", "_resume_tries", "_verify", "client_leg", "closing", "destination",
        "handshake_deadline_at", "phase", "session", "upstream_leg",
    )  # fmt: skip

    up: _Way
    down: _Way

    def __init__(
        self,
        poller: Poller,
        client: socket.socket,
        upstream: socket.socket,
        record: SessionRecord,
        *,
        hello: TlsHello,
        held: bytes,
        destination: IPAddress | str,
        interception: Interception,
        upstream_verify: bool,
        on_end: Callable[[CloseReason], None],
        on_error: Callable[[BaseException], None],
        spawn: Spawn,
        recording: Recording | None = None,
        pending_down: bytes = b"",
        session: AddonSession | None = None,
        addons: tuple[Addon, ...] = (),
        on_addon_error: OnAddonError | None = None,
    ) -> None:
        self._setup(poller, client, upstream, record, on_end=on_end, on_error=on_error,
                    spawn=spawn, recording=recording)  # fmt: skip
        record.relay = "tls" if session is None else "addon"
        self.session = session
        self._on_addon_error = on_addon_error
        self.closing = False  # the addon called close(): drain, close_notify and FIN, linger
        # Where the upstream leg's session is kept for the next leg to the same place (None:
        # kept already, or nothing to keep), and how many more reads may bring its ticket.
        self._resume_key: ResumeKey | None = None
        self._resume_tries = 0
        self._closed = False  # past the close's close_notify: nothing more can be sent
        self._hello = hello
        self._held = held
        self._interception = interception
        self._verify = upstream_verify
        self._plaintext = recording  # None once it says it has stopped
        self._early_down: list[bytes] = []  # the upstream's plaintext before the client leg
        self._pending_down = pending_down
        self._failure: TLSFailure | None = None
        self._failed_side: str | None = None
        self._leaf_dropped: tuple[str, ...] = ()
        self.destination = destination
        self.phase = TLSPhase.UPSTREAM_HANDSHAKE
        self.handshake_deadline_at: float | None = None
        self.client_leg: ClientLeg | None = None
        self.upstream_leg: UpstreamLeg | None = None
        self.up = _Way(self, client, upstream, Direction.UP)
        self.down = _Way(self, upstream, client, Direction.DOWN)
        if session is not None:
            for way in (self.up, self.down):
                steps = chain_of(addons, session.claimers, up=way is self.up)
                way.chain = AddonChain(self, session, steps, way.emit, way.chain_done)

    @property
    def poller(self) -> Poller:
        return self._poller

    @property
    def over(self) -> bool:
        """Ended, or past the addon's close: hooks' results are dropped, sending raises."""
        return self._done or self._closed

    @property
    def tls_outcome(self) -> TLSOutcome:
        """What the addons' `session.tls` is made from while the session relays."""
        return self.outcome

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        return self._spawn(coro)

    # --- what the owner calls -------------------------------------------------------------------

    def start(self) -> None:
        """Send our ClientHello to the upstream. Takes the client's poller registration over (a
        session that sniffed leaves its own). May end the session at once (`on_end`)."""
        upstreams = self._interception.upstreams
        alpn = usable_alpn(self._hello.alpn)
        context = upstreams.get(self._verify, alpn)
        key = self._resume_key = _resume_key(self._hello.sni, self.destination,
                                             self._record.dst, self._verify, alpn)  # fmt: skip
        session = None if key is None else upstreams.sessions.get(key)
        leg = open_upstream_leg(context, self._hello.sni, self.destination,
                                established_context=upstreams.established,
                                session=session)  # fmt: skip
        self.up.arm_reader(True)  # the session's registration, if any, is ours now
        if isinstance(leg, TLSFailure):
            self._handshake_failed(leg, "upstream")
            return
        self.upstream_leg = leg
        self.handshake_deadline_at = time.monotonic() + self._interception.handshake_timeout_s
        self.up.enqueue(leg.data_to_send())
        self.settle()
        pending, self._pending_down = self._pending_down, b""
        if pending and not self._done:  # the upstream's first bytes, read by a `via` handshake
            self._received(self.down, pending)
            self.settle()

    def handshake_deadline_passed(self) -> None:
        """`handshake_deadline_at` has passed: a handshake still going on fails (the side it
        waits for: `upstream_tls_failed` or `client_tls_failed`, not a rejection)."""
        if self._done or self.phase not in (TLSPhase.UPSTREAM_HANDSHAKE,
                                            TLSPhase.CLIENT_HANDSHAKE):  # fmt: skip
            return
        side = "upstream" if self.phase is TLSPhase.UPSTREAM_HANDSHAKE else "client"
        timeout_s = self._interception.handshake_timeout_s
        detail = f"the {side} did not complete the TLS handshake within {timeout_s:g} s"
        self._handshake_failed(TLSFailure(f"{side}_tls_failed", detail), side)

    @property
    def outcome(self) -> TLSOutcome:
        failure = self._failure
        rejected = None
        if failure is not None and self._failed_side == "client":
            rejected = client_rejected_certificate(failure)
        return TLSOutcome(
            client=None if self.client_leg is None else self.client_leg.info,
            upstream=None if self.upstream_leg is None else self.upstream_leg.info,
            failure=failure,
            failed_side=self._failed_side,
            rejected=rejected,
            upstream_verify=self._verify,
            dropped_names=self._leaf_dropped,
        )

    def stop(self) -> None:
        self.phase = TLSPhase.ENDED
        self.handshake_deadline_at = None
        super().stop()

    # --- what the claiming addons call ----------------------------------------------------------

    def push(self, way: _Way, data: bytes) -> None:
        """An addon's `send_to_*` toward the way's sink: encrypted after what is queued."""
        if self.over:
            raise RuntimeError("the session has ended")
        if way.stopped:  # its sink has reset: what is sent to it is lost, as it would be
            return
        sink_leg = self._sink_leg(way)
        if way.ending is not None or sink_leg is None or not sink_leg.can_send:
            side = "upstream" if way is self.up else "client"
            raise RuntimeError(f"the {side}'s TLS has been closed: nothing more can go to it")
        self.pass_on(way, data)
        if way.queue:
            way.arm_writer(True)

    def hook_failed(self, hook: Hook, exc: BaseException) -> None:
        """A hook raised or returned nonsense: stop, and let the owner reset the session."""
        if self._done:
            return
        self.stop()
        assert self._on_addon_error is not None
        self._on_addon_error(hook, exc)

    def addon_reset(self) -> None:
        """The addon's `session.reset()`: both sides reset at once, what is queued dropped."""
        if not self._done:
            self._abort_both(CloseReason.ADDON_RESET, from_client=False)

    def addon_close(self) -> None:
        """The addon's `session.close()`: read no more; once everything read is through the
        chains and written, our close_notify and a FIN both ways, then read and drop until
        both peers have sent their FIN (`addon_close`)."""
        if self._done or self.closing:
            return
        if self.phase is not TLSPhase.RELAYING:
            raise RuntimeError("close(): the client's TLS handshake is not done yet; reset() "
                               "ends the session")  # fmt: skip
        self.closing = True
        self._record.half_closed_at = time.monotonic()  # the linger is bounded as a half-close
        # Settled on the next round of the loop: the hook that called close() may still be
        # returning bytes to send.
        asyncio.get_running_loop().call_soon(self._settle_safely)

    def chain_done(self, way: _Way) -> None:
        """A way's chain finished a task: the source's end it waited with, then settle."""
        if way.eof_wanted is not None:
            self._run_eof(way)
        if not self._done:
            self.settle()

    def _settle_safely(self) -> None:
        try:
            if not self._done:
                self.settle()
        except Exception as exc:
            self.pump_failed(exc)

    # --- reading --------------------------------------------------------------------------------

    def _source_leg(self, way: _Way) -> TLSLeg | None:
        return self.client_leg if way is self.up else self.upstream_leg

    def _sink_leg(self, way: _Way) -> TLSLeg | None:
        return self.upstream_leg if way is self.up else self.client_leg

    def _other(self, way: _Way) -> _Way:
        return self.down if way is self.up else self.up

    def _socket(self, fd: int) -> socket.socket:
        return self._client if fd == self._client.fileno() else self._upstream

    def source_readable(self, way: _Way) -> None:
        """Read the source until it is empty, a read is short, or the way must wait."""
        if way.lingering:
            self._linger(way)
            return
        while way.reading and not self._done:
            try:
                data = os.read(way.src, COPY_CHUNK_BYTES)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in _GONE:
                    raise
                self._source_ended(way, reset=True)
                self.settle()
                return
            self._record.last_activity_at = time.monotonic()
            if not data:
                source = self._socket(way.src)
                self._source_ended(way, reset=source is not self._shut and reset_behind_eof(source))
                self.settle()
                return
            self._received(way, data)
            self.settle()
            if len(data) < COPY_CHUNK_BYTES:
                return  # the socket was empty a moment ago: the poller calls again

    def _received(self, way: _Way, data: bytes) -> None:
        leg = self._source_leg(way)
        if leg is None:  # the client, while the upstream handshakes: held for its own
            self._held += data
            return
        plaintext = leg.receive(data)
        self._after_receive(way, leg, plaintext)

    def _source_ended(self, way: _Way, *, reset: bool) -> None:
        """The source sent its FIN (`reset` False) or reset."""
        leg = self._source_leg(way)
        if leg is None:  # the client left while the upstream handshaked: not a rejection
            how = "reset" if reset else "closed"
            self._handshake_failed(TLSFailure(
                "client_tls_failed",
                f"the client {how} the connection before its handshake began",
                peer_eof=True,
            ), "client")  # fmt: skip
            return
        if not leg.handshake_done:
            leg.receive_eof()  # fails it: the peer left during the handshake
            self._after_receive(way, leg, b"")
            return
        plaintext = leg.receive_eof()
        if plaintext:
            self._deliver(way, plaintext)
        if reset:
            # Not the end of the source's stream: no eof hook (as the addon relay). Reported as
            # its end once the queue is written; `pump_ended` finds the reset behind it.
            if way.ending is None:
                way.ending = End.EOF
            return
        # A FIN without close_notify: the sink gets a bare FIN, the same truncation.
        self._source_done(way, notify=False)

    def _after_receive(self, way: _Way, leg: TLSLeg, plaintext: bytes) -> None:
        """After the source's leg took bytes (or its EOF): its answer back to the source, the
        handshake's progress, the plaintext on, the source's close_notify or failure."""
        self._other(way).enqueue(leg.data_to_send())
        if self._resume_key is not None and leg is self.upstream_leg and leg.handshake_done:
            self._keep_session(leg)
        failure = leg.failure
        if failure is not None and (failure.in_handshake or self.phase is not TLSPhase.RELAYING):
            self._handshake_failed(failure, leg.side)
            return
        if self.phase is TLSPhase.UPSTREAM_HANDSHAKE and leg.handshake_done:
            if plaintext:  # an upstream that speaks first (a banner), in its last flight
                self._early_down.append(plaintext)
                plaintext = b""
            self._start_client_leg()
            return
        if (
            self.phase is TLSPhase.CLIENT_HANDSHAKE
            and leg is self.client_leg
            and leg.handshake_done
        ):
            self.phase = TLSPhase.RELAYING
            self.handshake_deadline_at = None
            if plaintext:
                self._deliver(way, plaintext)
                if self._done:  # a hook reset the session (or failed)
                    return
            # The upstream's close_notify may have come with its last flight.
            for each in (self.up, self.down):
                self._source_closed(each)
            return
        if plaintext:
            self._deliver(way, plaintext)
        if failure is not None:  # after the handshakes: the peer broke the stream
            self._failure, self._failed_side = failure, leg.side
            if failure.reason == CloseReason.UPSTREAM_WANTS_CLIENT_CERT:
                self._handshake_failed(failure, leg.side)  # its own reason, for passthrough
            elif way.ending is None:
                way.ending = End.SOURCE_RESET  # as a reset
            return
        if self.phase is TLSPhase.RELAYING:
            self._source_closed(way)

    def _source_closed(self, way: _Way) -> None:
        """If the source's peer has closed its TLS: close_notify ends the way as EOF, once our
        own close_notify is written to the sink; without it (truncated), as a bare FIN."""
        leg = self._source_leg(way)
        if leg is None or not leg.peer_closed:
            return
        # Truncated: no close_notify of ours, the sink sees what the source did.
        self._source_done(way, notify=not leg.truncated)

    def _source_done(self, way: _Way, *, notify: bool) -> None:
        """The source's stream ended cleanly: after the claiming addons' eof hooks (if any),
        the way ends as EOF -- its FIN passed on once its queue is written -- after our
        close_notify to the sink when `notify`."""
        if way.ending is not None or way.eof_wanted is not None:
            return
        if way.chain is None:
            self._end_way(way, notify)
            return
        way.eof_wanted = notify
        self._run_eof(way)

    def _run_eof(self, way: _Way) -> None:
        """The eof hooks, once the chain is free; then the way's end."""
        chain = way.chain
        assert chain is not None and way.eof_wanted is not None
        if chain.busy:
            return  # a chunk is still in it: `chain_done` comes back here
        if not way.eof_ran:
            way.eof_ran = True
            chain.run(None)
            if chain.busy or self._done:
                return
        notify, way.eof_wanted = way.eof_wanted, None
        self._end_way(way, notify)

    def _end_way(self, way: _Way, notify: bool) -> None:
        way.ending = End.EOF  # then the FIN (`Relay.pump_ended`)
        sink_leg = self._sink_leg(way)
        if notify and sink_leg is not None:
            sink_leg.close()
            way.enqueue(sink_leg.data_to_send())

    def _deliver(self, way: _Way, plaintext: bytes) -> None:
        """Plaintext from the source's leg: through the addons' chain when claimed, on."""
        if way.chain is None:
            self.pass_on(way, plaintext)
        else:
            way.chain.run(plaintext)  # its output comes back through `pass_on`

    def pass_on(self, way: _Way, plaintext: bytes) -> None:
        """Plaintext for the sink: to the recording, then to the sink's leg."""
        sink_leg = self._sink_leg(way)
        if sink_leg is None or not sink_leg.can_send:
            return  # (the sink leg failed or closed: the way is ending already)
        up = way is self.up
        if self._plaintext is not None and not self._plaintext.relayed(up, plaintext):
            self._plaintext = None
        sink_leg.send(plaintext)
        way.enqueue(sink_leg.data_to_send())
        record = self._record
        if up:
            record.bytes_up += len(plaintext)
        else:
            record.bytes_down += len(plaintext)

    # --- the handshakes -------------------------------------------------------------------------

    def _start_client_leg(self) -> None:
        """The upstream's handshake is done: forge the leaf, start the client's handshake from
        the held ClientHello."""
        upstream_leg, interception = self.upstream_leg, self._interception
        assert upstream_leg is not None and upstream_leg.info is not None
        info = upstream_leg.info
        facts: UpstreamCertFacts | None = None
        if info.peer_cert_der is not None:
            read = read_upstream_cert(info.peer_cert_der)
            if isinstance(read, NameRejected):
                self._handshake_failed(
                    TLSFailure("upstream_cert_invalid", bounded(read.reason)), "upstream"
                )
                return
            facts = read
        leaf = interception.forger.leaf_for(
            self._hello.sni, facts, interception.clock(), _ip_or_none(self.destination)
        )
        if isinstance(leaf, NameRejected):
            self._handshake_failed(
                TLSFailure("upstream_cert_invalid", bounded(f"no leaf to forge: {leaf.reason}")),
                "upstream",
            )
            return
        self._leaf_dropped = leaf.names.dropped
        context = interception.leaves.get(leaf, info.alpn)
        leg = self.client_leg = open_client_leg(
            context, established_context=interception.leaves.established
        )
        self.phase = TLSPhase.CLIENT_HANDSHAKE
        self.handshake_deadline_at = time.monotonic() + interception.handshake_timeout_s
        if self.session is not None:  # what session_start sent goes first
            to_upstream, to_client = self.session.attach(self)
            for data in to_upstream:
                self.pass_on(self.up, data)
            for data in to_client:
                self.pass_on(self.down, data)
        early, self._early_down = b"".join(self._early_down), []
        if early:  # kept by the leg until its handshake is done
            self._deliver(self.down, early)
        held, self._held = self._held, b""
        self._after_receive(self.up, leg, leg.receive(held))

    def _keep_session(self, leg: UpstreamLeg) -> None:
        """Keep the upstream's session for the next leg to the same place, once it has one (a
        TLS 1.3 ticket comes after the handshake: looked for in the next few reads). Not when
        the leg resumed the stored one: it goes on serving (fetching a session from `ssl`
        costs about 0.1 ms, a copy of it with its certificates), until the server declines
        it."""
        if leg.info is not None and leg.info.resumed:
            self._resume_key = None
            return
        session = leg.session_to_resume()
        key = self._resume_key
        assert key is not None
        if session is not None:
            self._interception.upstreams.sessions.put(key, session)
        elif self._resume_tries < _RESUME_TRIES:
            self._resume_tries += 1
            return
        self._resume_key = None

    def _handshake_failed(self, failure: TLSFailure, side: str) -> None:
        """A handshake failed (or timed out): reset both sides, end with the leg's reason."""
        if self._done:
            return
        if side == "upstream" and self._resume_key is not None:  # (a session that fails goes)
            self._interception.upstreams.sessions.forget(self._resume_key)
            self._resume_key = None
        self._failure, self._failed_side = failure, side
        self._abort_both(_REASONS[failure.reason], from_client=side == "client")

    def _abort_both(self, reason: CloseReason, *, from_client: bool) -> None:
        self.stop()
        if self._recording is not None:
            self._recording.ended(from_client=from_client, reset=True)
        for sock in (self._client, self._upstream):
            if sock.fileno() >= 0:
                self._poller.forget(sock.fileno())
            abort_socket(sock)
        self._on_end(reason)

    # --- writing, and what the ways may do next -------------------------------------------------

    def settle(self) -> None:
        """Write what is queued; report a way's end once its queue is written; then arm each
        way's source as `_may_read` says."""
        for way in (self.up, self.down):
            if self._done:
                return
            if way.queue and not self._flush(way):
                continue
            way.arm_writer(False)
            if way.ending is not None and not way.ended:
                way.ended = True
                way.arm_reader(False)
                self.pump_ended(way.direction, way.ending)
        if self.closing and not self._done:
            self._close_step()
        for way in (self.up, self.down):
            if self._done:
                return
            way.arm_reader(self._may_read(way))

    def _may_read(self, way: _Way) -> bool:
        if way.lingering:
            return True
        if way.ending is not None or way.ended or way.stopped or self.closing:
            return False
        phase = self.phase
        if phase is TLSPhase.RELAYING:
            chain = way.chain
            if chain is not None and (chain.busy or way.eof_wanted is not None):
                return False
            return not way.queue and self._other(way).queued <= ANSWER_LIMIT_BYTES
        if phase is TLSPhase.UPSTREAM_HANDSHAKE:
            return way is self.down or len(self._held) < HELD_LIMIT_BYTES
        if phase is TLSPhase.CLIENT_HANDSHAKE:
            return way is self.up  # the upstream waits: what it sends now would pile up
        return False

    def _close_step(self) -> None:
        """After the addon's close(), from `settle`: once both ways are drained (nothing in a
        chain, nothing queued), our close_notify to both peers; once that is written, a FIN
        both ways and the linger; once both peers' FINs are read, the end (`addon_close`)."""
        ways = [way for way in (self.up, self.down) if not way.ended]
        if any(way.queue or (way.chain is not None and way.chain.busy) for way in ways):
            return
        if not self._closed:
            self._closed = True
            for way in ways:  # both close_notify made before either is written
                sink_leg = self._sink_leg(way)
                if sink_leg is not None:
                    sink_leg.close()
                    way.enqueue(sink_leg.data_to_send())
            for way in ways:
                if way.queue:
                    self._flush(way)  # a sink that is full: settled again once it is writable
                if self._done:
                    return
        if any(way.queue for way in ways) or any(way.lingering for way in ways):
            return
        for way in ways:
            sink = self._upstream if way is self.up else self._client
            if sink is not self._shut:
                self._shutdown_write(sink)
                if self._recording is not None:
                    self._recording.ended(from_client=way is self.up, reset=False)
            way.lingering = True
        self._lingered()

    def _linger(self, way: _Way) -> None:
        """Read and drop what the source still sends, until its FIN (or reset)."""
        if read_to_eof(way.src):
            way.lingering = False
            way.ended = True
            way.arm_reader(False)
            self._lingered()

    def _lingered(self) -> None:
        if not self._done and self.up.ended and self.down.ended:
            self._done = True
            self._on_end(CloseReason.ADDON_CLOSE)

    def _flush(self, way: _Way) -> bool:
        """Write the way's queue to its sink; False if the sink pushed back (or is gone)."""
        queue = way.queue
        try:
            while queue:
                chunk = queue[0]
                n = os.write(way.dst, chunk)
                way.queued -= n
                self._record.last_activity_at = time.monotonic()
                if n < len(chunk):
                    queue[0] = memoryview(chunk)[n:]
                    way.arm_writer(True)
                    return False
                queue.popleft()
        except BlockingIOError:
            way.arm_writer(True)
            return False
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
            self._sink_gone(way)
            return False
        return True

    def _sink_gone(self, way: _Way) -> None:
        """Writing to the way's sink failed: its peer reset (or vanished)."""
        way.queue.clear()
        way.queued = 0
        sink_leg = self._sink_leg(way)
        if sink_leg is not None and not sink_leg.handshake_done:
            sink_leg.receive_eof()  # fails its handshake (`peer_eof`)
            self._after_receive(self._other(way), sink_leg, b"")
            return
        if self.phase is not TLSPhase.RELAYING:  # the client, before its handshake began
            self._source_ended(self._other(way), reset=True)
            return
        way.ended = True
        way.arm_reader(False)
        way.arm_writer(False)
        self.pump_ended(way.direction, End.SINK_RESET)


_RESUME_TRIES: Final = 4
"""Reads of the upstream after its handshake in which a TLS 1.3 ticket is looked for."""


def _resume_key(
    sni: str | None, destination: IPAddress | str, dst: str, verify: bool, alpn: tuple[str, ...]
) -> ResumeKey | None:
    """What the upstream's session is kept by (`tls.resumption`); None when nothing is (a name
    that cannot be sent, an endpoint without a port)."""
    name = verify_name(sni, destination)
    _, _, port = dst.rpartition(":")
    if isinstance(name, TLSFailure) or not port.isdigit():
        return None
    return (name, str(destination), int(port), verify, alpn)


def _ip_or_none(destination: IPAddress | str) -> IPAddress | None:
    """The destination as the forger's name of last resort (an IPv4-mapped address as IPv4)."""
    try:
        ip = ipaddress.ip_address(destination)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
