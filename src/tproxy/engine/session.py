"""The session: one accepted client connection, from original destination to close event.

A session is callbacks on the event loop, not a task. Its life is a few phases (`Phase`), in
this order, each entered at most once (docs/life-of-a-connection.md draws them):

    NEW ─start()─▶ [SNIFFING] ─▶ [ADDONS] ─▶ CONNECTING ─▶ [HANDSHAKING] ─▶ RELAYING ─ended─▶ CLOSED
     │                 │            │            │               │                            ▲
     └─refused, reset──┴─reset──────┴─addon_err──┴─failed────────┴─refused, failed────────────┘

`Session(...)` only records the accepted socket; `start()` reads the original destination,
writes `session_open`, applies the loop guard and asks the policy (`policy.matcher`, when there
is one) for a verdict. When a rule that might match needs sniffed facts, the session is
SNIFFING: it reads the client's first bytes (reads, not MSG_PEEK: the poller is level-triggered,
and a half-arrived ClientHello left in the socket would keep it readable and spin) until a
sniffer decides, 16 KiB are held, the client ends, or the sniff timeout passes (`silent`); then
the policy decides with the facts. The verdict is carried out: `reset` resets the client;
`allow`, `redirect` and `via` start the non-blocking connect (to the original destination, the
rule's `to`, the upstream proxy), CONNECTING until the socket is writable; `via` then talks to
the proxy, HANDSHAKING (`tproxy.upstream`). The relay starts with the bytes held so far sent on
first. Without a policy, or when one decides from addresses alone, nothing waits: the connect
starts at once and the first bytes are sniffed as they pass (`sniffers.passive`).

Addons (`config.addons`, taken when the session starts): `sniff = True` makes it SNIFFING as a
rule would; once the policy has decided (not `reset`), each addon's `session_start` runs, and the
first verdict replaces the policy's (`_decided`); an `async def` one makes the session ADDONS
while a task awaits it (`engine.addon_session`). `close()` calls `session_end`. Without addons
none of this runs.

Deadlines: CONNECTING and HANDSHAKING share `connect_deadline_at` (connect timeout), enforced
by the server's sweep through `sweep(now)`, as are the relay's idle and half-closed timeouts;
SNIFFING's deadline is the context's `sniff_deadlines` queue (one timer for all). Every way out
-- the relay ending, a refusal, a verdict, a failed connect or handshake, a timeout, a cut from
outside (`close`), an unexpected error (`fail`) -- goes through `close()`, the one teardown:
stop what runs, close or reset both sockets, write `session_close`.

Whatever goes wrong inside one session is caught at this boundary: logged with its id, both
sides reset, only this session ended.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import errno
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from tproxy.addons.api import reset as addon_reset
from tproxy.addons.loader import Hook
from tproxy.capture.files import capture_name, open_capture
from tproxy.capture.pcapng import TcpConversation
from tproxy.capture.recorder import Recorder
from tproxy.core.config import ProxyConfig, RelayKind
from tproxy.core.endpoint import format_sockaddr, parse_endpoint
from tproxy.core.lifecycle import expired_reason
from tproxy.core.reasons import CloseReason
from tproxy.core.session import SessionRecord
from tproxy.core.session_id import SessionIds
from tproxy.engine.addon_relay import AddonRelay
from tproxy.engine.addon_session import (
    ADDON_HOOK_TIMEOUT_S,
    ADDON_SNIFF_TIMEOUT_S,
    AddonRun,
    AddonSession,
    cancelling,
    engine_verdict,
    has_hooks,
    hook_error,
)
from tproxy.engine.client_limits import ClientLimits
from tproxy.engine.deadlines import DeadlineQueue
from tproxy.engine.pipes import PipePool
from tproxy.engine.poller import Poller
from tproxy.engine.relay import Relay
from tproxy.engine.tls_relay import Interception, TLSRelay
from tproxy.interception.original_dst import Destination
from tproxy.interception.self_connect import SelfConnectGuard
from tproxy.interception.sockopts import abort_socket, open_upstream_socket
from tproxy.observability.counters import Counters
from tproxy.observability.eventlog import EventLog
from tproxy.observability.events import (
    Notice,
    SessionClosed,
    SessionFailed,
    SessionOpened,
    UpstreamConnected,
    UpstreamFailed,
    tls_fields,
)
from tproxy.policy.decide import SniffedFacts, Verdict
from tproxy.policy.matcher import Matcher, Waiting, remote_name
from tproxy.policy.model import Action
from tproxy.sniffers.classify import Sniffed, SniffedFields
from tproxy.sniffers.facts import MAX_SNIFF_BYTES, HttpRequest, TlsHello
from tproxy.sniffers.passive import FirstBytes
from tproxy.sniffers.printable import to_printable
from tproxy.tls.passthrough import (
    PassthroughMemory,
    PassthroughReason,
    passthrough_key,
    reason_to_remember,
)
from tproxy.upstream.handshake import (
    Established,
    ProxyHandshake,
    Refused,
    Send,
    handshake_for,
)

# How a failed upstream connect is named in the close reason.
_CONNECT_FAILURE_REASONS = {
    errno.ECONNREFUSED: CloseReason.UPSTREAM_REFUSED,
    errno.EHOSTUNREACH: CloseReason.UPSTREAM_UNREACHABLE,
    errno.ENETUNREACH: CloseReason.UPSTREAM_UNREACHABLE,
    errno.ETIMEDOUT: CloseReason.UPSTREAM_TIMEOUT,
    errno.EMFILE: CloseReason.OUT_OF_DESCRIPTORS,
    errno.ENFILE: CloseReason.OUT_OF_DESCRIPTORS,
}
# The sniffing fields of a session nothing was sniffed of (refused or failed before relaying).
_NOT_SNIFFED: SniffedFields = (None, None, None, None, None, None, None)
# What an addon's hook may raise that ends its session, not the process: anything. A
# `sys.exit()`, a KeyboardInterrupt or a CancelledError raised by a hook would otherwise leave the
# event loop or end a task silently; only the session's own task being cancelled (its close) is
# let through, in `_start_hooks_async`.
_HOOK_ERRORS = (BaseException,)
# A session without a policy but with addons: allowed unless an addon says otherwise.
_ALLOW = Verdict(Action.ALLOW)
# A `via` session's proxy: every failure to reach it or talk to it, but running out of
# descriptors, is the proxy's.
_PROXY_FAILURE_REASONS = {
    errno.EMFILE: CloseReason.OUT_OF_DESCRIPTORS,
    errno.ENFILE: CloseReason.OUT_OF_DESCRIPTORS,
}
_GONE = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT})
# Most bytes read from an upstream proxy's answer at once (a SOCKS5 reply is 10-22 bytes, an
# HTTP one a few hundred; the handshake bounds what it keeps).
_HANDSHAKE_READ_BYTES = 4096


def _final(addon_verdict: Verdict | None, policy_verdict: Verdict) -> Verdict:
    """The verdict carried out: the first addon's, keeping the policy rule's `capture` and `tls`
    (an addon that allows a session the policy captures or intercepts does not stop that);
    else the policy's."""
    if addon_verdict is None:
        return policy_verdict
    if policy_verdict.capture and not addon_verdict.capture:
        addon_verdict = dataclasses.replace(addon_verdict, capture=True)
    if policy_verdict.tls is not None and addon_verdict.tls is None:
        addon_verdict = dataclasses.replace(
            addon_verdict, tls=policy_verdict.tls, upstream_verify=policy_verdict.upstream_verify,
            passthrough_on_client_reject=policy_verdict.passthrough_on_client_reject,
        )  # fmt: skip
    return addon_verdict


class Phase(enum.Enum):
    """Where a session is in its life; each phase is entered at most once, in this order."""

    NEW = "new"  # accepted; start() not called yet
    SNIFFING = "sniffing"  # reading the client's first bytes for the policy (sniff deadline)
    ADDONS = "addons"  # waiting for an addon's `async def session_start` (ADDON_HOOK_TIMEOUT_S)
    CONNECTING = "connecting"  # the upstream connect is in flight (until connect_deadline_at)
    HANDSHAKING = "handshaking"  # talking to a `via` rule's upstream proxy (same deadline)
    RELAYING = "relaying"  # both sockets belong to the relay (idle and half-closed timeouts)
    CLOSED = "closed"  # sockets closed or reset, `session_close` written


@dataclass
class SessionContext:
    """What every session of one proxy process shares: configuration, log, ids, live sessions.

    `config` is replaced on reload; a session reads it when it starts.
    """

    config: ProxyConfig
    log: EventLog
    guard: SelfConnectGuard
    spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]]
    ids: SessionIds
    # The accepted socket's original destination: getsockname() for TPROXY, conntrack for
    # REDIRECT (`interception.original_dst`).
    destination: Destination = socket.socket.getsockname
    poller: Poller = field(init=False)  # set when the server starts serving
    # Sessions SNIFFING, in order of their deadline (set when the server starts serving).
    sniff_deadlines: DeadlineQueue[Session] = field(init=False)
    pipes: PipePool = field(default_factory=PipePool)
    sessions: set[Session] = field(default_factory=set)
    # Addons' `async def session_end` hooks still running: stopping waits for them (a while).
    ending_hooks: set[asyncio.Task[None]] = field(default_factory=set)
    # TLS interception (`--ca`): the worker's forger and contexts; None without a CA.
    interception: Interception | None = None
    # The names (or destinations) intercepted sessions pass through for a while: a client that
    # rejected our certificate, an upstream that wants a client certificate. Shared with every
    # worker through the supervisor (`engine.worker_channel`), which keeps this object's
    # listener: it must stay the same object for the worker's life.
    passthrough: PassthroughMemory = field(default_factory=PassthroughMemory)
    # The per-client limits (`--max-connections-per-client`, `--new-connections-per-client`):
    # None without them.
    client_limits: ClientLimits | None = None
    # Counters since this process started (the supervisor's heartbeats carry them), and the
    # metrics' counters (`observability.counters`) when a supervisor sums them.
    metrics: Counters | None = None
    opened: int = 0
    closed_bytes_up: int = 0
    closed_bytes_down: int = 0

    @property
    def active(self) -> int:
        return len(self.sessions)


class _Deciding:
    """What a session holds between accept and its relay when it waits for the policy's facts
    or talks to an upstream proxy (sessions that do neither never make one)."""

    __slots__ = (
        "dst_addr", "handshake", "held", "leftover", "matcher", "sniff_wait", "waiting",
    )  # fmt: skip

    def __init__(self, matcher: Matcher | None, dst_addr: tuple[Any, ...]) -> None:
        # The policy this session started with decides it (reloads too); None: no policy (the
        # session has addons).
        self.matcher = matcher
        self.dst_addr = dst_addr
        # Where the policy's walk resumes once sniffed; or, when only an addon's `sniff = True`
        # made the session wait, the verdict the policy already gave.
        self.waiting: Waiting | Verdict | None = None
        # The client's bytes read while sniffing, to send on first: the first read as it came,
        # a bytearray once more come.
        self.held: bytes | bytearray = b""
        self.sniff_wait: int | None = None  # this session's ticket in the deadline queue
        self.handshake: ProxyHandshake | None = None  # the upstream proxy's, for `via`
        self.leftover = b""  # tunnelled bytes that came with the proxy's answer


def _claimed(run: AddonRun | None) -> AddonSession | None:
    """The addons' session, if some addon claimed it."""
    if run is None or run.session is None or not run.session.claimers:
        return None
    return run.session


class _Intercepting:
    """What a session to be intercepted (`tls = "intercept"`) holds until its relay starts."""

    __slots__ = ("client_key", "destination", "hello", "key", "on_client_reject",
                 "upstream_verify")  # fmt: skip

    def __init__(
        self, hello: TlsHello, verdict: Verdict, destination: str, key: str, client_ip: str
    ) -> None:
        self.hello = hello
        self.upstream_verify = verdict.upstream_verify
        self.on_client_reject = verdict.passthrough_on_client_reject
        self.destination = destination
        # What the passthrough memory knows it by: the name (the destination without SNI) for
        # an upstream that wants a client certificate (it proved who it is: the same for every
        # client); the client and the name for a client that rejected our certificate (what one
        # client does must not turn inspection off for the others).
        self.key = key
        self.client_key = f"{client_ip} {key}"


def _sniffed_facts(sniffed: Sniffed) -> SniffedFacts:
    facts = sniffed.facts
    return SniffedFacts(
        sniffed.proto,
        facts.sni if isinstance(facts, TlsHello) else None,
        facts.host if isinstance(facts, HttpRequest) else None,
    )


class Session:
    """One intercepted connection: `start()` it; it ends by itself, by `close` or by `fail`."""

    __slots__ = (
        "_addons",
        "_capture",
        "_client_addr",
        "_client_sock",
        "_connect_at",
        "_ctx",
        "_deciding",
        "_limit_key",
        "_limits",
        "_recording",
        "_relay",
        "_sniffer",
        "_tls",
        "_upstream",
        "connect_deadline_at",
        "phase",
        "record",
    )

    def __init__(
        self, ctx: SessionContext, client_sock: socket.socket, client_addr: tuple[Any, ...],
        limit_key: str | None = None,
    ) -> None:  # fmt: skip
        self._ctx = ctx
        self._client_sock = client_sock
        self._client_addr = client_addr
        # Its client's key in `ctx.client_limits` (admitted there): released at the close, into
        # those limits even if a reload has turned them off and on again since (new counts).
        self._limit_key = limit_key
        self._limits = ctx.client_limits if limit_key is not None else None
        self._upstream: socket.socket | None = None
        self._relay: Relay | None = None
        self._sniffer: FirstBytes | None = None
        self._deciding: _Deciding | None = None
        # The configuration under which the policy (or --capture-all) chose to capture it.
        self._capture: ProxyConfig | None = None
        self._recording: Recorder | None = None  # its capture, once relaying
        self._addons: AddonRun | None = None  # the addons it started with, if any
        self._tls: _Intercepting | None = None  # intercepted: what its TLS relay needs
        self.phase = Phase.NEW
        self.connect_deadline_at = 0.0  # meaningful while CONNECTING and HANDSHAKING
        self._connect_at = 0.0  # when the upstream connect started (its time is a metric)
        self.record: SessionRecord | None = None  # made by start()

    @property
    def sniffed_so_far(self) -> Sniffed | None:
        """What its first bytes said, as far as known now: the sniffed facts once decided (a
        listing of live sessions shows them), None while undecided."""
        record = self.record
        if record is not None and record.sniffed is not None:
            return record.sniffed
        return None if self._sniffer is None else self._sniffer.result

    def start(self) -> None:
        """Read the original destination, log the open, refuse loops, ask the policy, and sniff
        or connect."""
        try:
            self._start()
        except Exception as exc:  # the session boundary
            self.fail(exc)
        if self.phase is not Phase.SNIFFING and self.phase is not Phase.ADDONS:
            # The record has the client's address now; an idle session keeps no more than it
            # needs (memory per idle session is a benchmark target).
            self._client_addr = ()

    def _start(self) -> None:
        ctx, client_sock = self._ctx, self._client_sock
        lookup_error: OSError | None = None
        try:
            dst_addr = ctx.destination(client_sock)
        except OSError as exc:  # REDIRECT mode, and conntrack knows no original destination
            dst_addr, lookup_error = client_sock.getsockname(), exc
        now = time.monotonic()
        record = self.record = SessionRecord(
            ctx.ids.next(), format_sockaddr(self._client_addr), format_sockaddr(dst_addr), now
        )
        ctx.sessions.add(self)
        ctx.opened += 1
        ctx.log.emit(SessionOpened(record.id, record.client, record.dst, ctx.active))
        if lookup_error is not None:
            detail = f"no original destination (not redirected?): {lookup_error.strerror}"
            name = errno.errorcode.get(lookup_error.errno or 0, "ENOENT")
            ctx.log.emit(UpstreamFailed(record.id, record.dst, name, detail))
            self.close(CloseReason.NO_ORIGINAL_DESTINATION)
            return
        if ctx.guard.is_self(dst_addr):
            ctx.log.emit(
                UpstreamFailed(record.id, record.dst, "ELOOP", "destination is this proxy")
            )
            self.close(CloseReason.LOOP_REFUSED)
            return
        config = ctx.config
        matcher, addons = config.matcher, config.addons
        self._capture = config if config.capture_all else None
        if matcher is None and addons is None:  # no policy: allow, sniffing as the bytes pass
            self._connect(dst_addr, self._spoof_ip(), now)
            return
        if addons is not None and has_hooks(addons):
            self._addons = AddonRun(addons)
        elif matcher is None:  # addons with only byte hooks (never claimed): as without them
            self._connect(dst_addr, self._spoof_ip(), now)
            return
        deciding = _Deciding(matcher, dst_addr)
        verdict = (
            _ALLOW
            if matcher is None
            else matcher.first_of(self._client_addr[0], dst_addr[0], dst_addr[1])
        )
        if isinstance(verdict, Waiting) or (
            self._addons is not None
            and self._addons.addons.wants_sniff
            and verdict.action is not Action.RESET
        ):
            deciding.waiting = verdict
            self._deciding = deciding
            self._sniffer = FirstBytes(eager=True)
            self.phase = Phase.SNIFFING
            # A client's first bytes usually follow its ACK at once, and are here by now: read
            # them first, and wait (a poller registration, a deadline) only if they are not.
            if self._sniff_more():
                return
            timeout_s = ADDON_SNIFF_TIMEOUT_S if matcher is None else matcher.policy.sniff_timeout_s
            deadline_at = now + timeout_s
            deciding.sniff_wait = ctx.sniff_deadlines.add(deadline_at, self)
            ctx.poller.add_reader(client_sock.fileno(), self)
            return
        self._decided(verdict, deciding, now)

    def _spoof_ip(self) -> str | None:
        return self._client_addr[0] if self._ctx.config.spoof_source else None

    # --- SNIFFING -----------------------------------------------------------------------------

    def on_readable(self) -> None:
        """The client sent (SNIFFING), or the upstream proxy answered (HANDSHAKING); CONNECTING,
        the client sent more after its sniffed bytes, or ended (the relay reads that later)."""
        try:
            phase = self.phase
            if phase is Phase.SNIFFING:
                self._sniff_more()
            elif phase is Phase.HANDSHAKING:
                self._handshake_more()
            elif phase is Phase.ADDONS:
                self._client_while_addons()
            elif phase is Phase.CONNECTING:  # the level-triggered poller would call again
                self._ctx.poller.remove_reader(self._client_sock.fileno())
        except Exception as exc:
            self.fail(exc)

    def _sniff_more(self) -> bool:
        """Read what the client sent; True once the session is no longer SNIFFING."""
        deciding, sniffer = self._deciding, self._sniffer
        assert deciding is not None and sniffer is not None
        room = MAX_SNIFF_BYTES - len(deciding.held)
        try:
            data = os.read(self._client_sock.fileno(), room)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _GONE:
                self.close(CloseReason.CLIENT_RESET)
                return True
            raise
        if data:
            held = deciding.held
            if not held:
                deciding.held = data
            else:
                if not isinstance(held, bytearray):
                    held = deciding.held = bytearray(held)
                held += data
            if sniffer.client_sent(data) and len(data) < room:
                return False  # more wanted, and there is room for it
        # Decided, full, or the client's end (its EOF stays for the relay to read).
        self._sniffed()
        return True

    def deadline_passed(self) -> None:
        """The sniff timeout: decide with what came (nothing: `silent`)."""
        if self.phase is Phase.SNIFFING:
            try:
                self._sniffed()
            except Exception as exc:
                self.fail(exc)

    def _sniffed(self) -> None:
        deciding, sniffer, record = self._deciding, self._sniffer, self.record
        assert deciding is not None and sniffer is not None and record is not None
        assert deciding.waiting is not None
        if deciding.sniff_wait is not None:  # it waited: leave the queue
            self._ctx.sniff_deadlines.cancel(deciding.sniff_wait)
            # The client's socket stays in the poller for reading: the relay reads it next, and
            # takes the registration over (no epoll_ctl to remove it now and one to add it back
            # then). Should the client send more or end while the upstream connect is in flight,
            # on_readable takes the socket out then; a `via` session takes it out before it
            # talks to its proxy (on_readable then means the proxy's answer).
        record.sniffed = sniffed = sniffer.final()
        self._sniffer = None
        if self._ctx.metrics is not None:
            self._ctx.metrics.sniffed(sniffed.proto)
        facts = sniffed.facts
        sni = facts.sni if isinstance(facts, TlsHello) else None
        host = facts.host if isinstance(facts, HttpRequest) else None
        waiting = deciding.waiting
        if isinstance(waiting, Waiting):
            assert deciding.matcher is not None
            verdict = deciding.matcher.resume(waiting, deciding.dst_addr[1], sniffed.proto, sni,
                                              host)  # fmt: skip
        else:  # only an addon's `sniff = True` waited: the policy had decided
            verdict = waiting
        self._decided(verdict, deciding, time.monotonic(), sniffed)
        if self.phase is not Phase.ADDONS:
            self._client_addr = ()

    # --- the addons' session_start --------------------------------------------------------------

    def _decided(
        self, verdict: Verdict, deciding: _Deciding, now: float, sniffed: Sniffed | None = None
    ) -> None:
        """The policy has decided: run the addons' `session_start` (unless it is a reset), then
        carry out the first addon verdict, or the policy's."""
        run, record = self._addons, self.record
        if run is None or verdict.action is Action.RESET:
            self._carry_out(verdict, deciding, now, sniffed)
            return
        assert record is not None and verdict.action is not None
        record.action, record.rule = verdict.action.value, verdict.rule
        run.session = AddonSession(record, verdict.rule, verdict.action.value,
                                   on_reset=self._reset_by_addon)  # fmt: skip
        if verdict.tls is not None and verdict.intercepts:
            # Known before the hooks (`session.tls`), so they can claim its plaintext.
            self._tls = self._intercepting(verdict, sniffed, deciding, now)
            run.session.intercepting = self._tls is not None
        hooks = run.addons.session_start
        for index, hook in enumerate(hooks):
            if hook.is_async:  # the rest run in a task; this session waits for it, alone
                self.phase = Phase.ADDONS
                # The sweep's bound, should the task never end (a hook that swallows its
                # cancellation): every hook's timeout, and a second more.
                self.connect_deadline_at = now + ADDON_HOOK_TIMEOUT_S * (len(hooks) - index) + 1
                # Watched meanwhile: a client that resets is noticed (`on_readable`).
                self._ctx.poller.add_reader(self._client_sock.fileno(), self)
                run.task = self._ctx.spawn(
                    self._start_hooks_async(hooks[index:], verdict, deciding, sniffed)
                )
                run.task.add_done_callback(self._addons_task_done)
                return
            run.session.starting = hook.addon
            try:
                answer = hook.fn(run.session)
            except _HOOK_ERRORS as exc:
                self._addon_failed(hook, exc)
                return
            if (answer is not None or run.session.reset_asked) and not self._start_hook(
                hook, answer, run
            ):
                return
        run.session.starting = None
        self._carry_out(_final(run.verdict, verdict), deciding, now, sniffed)

    def _reset_by_addon(self) -> None:
        """An addon's `session.reset()` with no addon relay to carry it out (a session not
        claimed, still connecting, or waiting for an async `session_start`: its task is
        cancelled). In a plain `session_start` (the session is NEW or SNIFFING then) the reset
        is the verdict (`_start_hook`)."""
        if self.phase not in (Phase.NEW, Phase.SNIFFING, Phase.CLOSED):
            self.close(CloseReason.ADDON_RESET)

    def _client_while_addons(self) -> None:
        """The client stirred while its `session_start` hooks run: a reset ends the session (the
        task is cancelled, nothing connects); bytes or its FIN stay unread, for the relay."""
        try:
            self._client_sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in _GONE:
                self.close(CloseReason.CLIENT_RESET)
                return
            raise
        self._ctx.poller.remove_reader(self._client_sock.fileno())  # else level-triggered: again

    def _addons_task_done(self, task: asyncio.Task[None]) -> None:
        """The hooks' task ended: if the session still waits for it, the task ended without an
        answer (cancelled by something else than the session's close): an addon error."""
        if self.phase is not Phase.ADDONS:
            return
        record = self.record
        assert record is not None
        why = "session_start's task ended without an answer (cancelled)"
        self._addon_error(record.id, why, None, "session_start")
        self.close(CloseReason.ADDON_ERROR)

    def _start_hook(self, hook: Hook, answer: object, run: AddonRun) -> bool:
        """Take one `session_start`'s answer (`session.reset()` in it answers `reset()`); False
        (the session closed) when it is wrong."""
        try:
            addon_verdict = engine_verdict(answer, hook.addon)
        except (TypeError, ValueError) as exc:
            self._addon_failed(hook, exc)
            return False
        assert run.session is not None
        if run.session.reset_asked:  # reset() is not an opinion: it wins over earlier verdicts
            run.session.reset_asked = False
            run.verdict = engine_verdict(addon_reset(), hook.addon)
            return True
        if run.verdict is None:
            run.verdict = addon_verdict  # the first wins; later ones only observe
        return True

    async def _start_hooks_async(
        self, hooks: tuple[Hook, ...], verdict: Verdict, deciding: _Deciding,
        sniffed: Sniffed | None,
    ) -> None:  # fmt: skip
        """The `session_start` hooks from the first `async def` one on, each awaited in turn
        (at most `ADDON_HOOK_TIMEOUT_S` each), then the verdict carried out. A close meanwhile
        (a drain, `tproxy` stopping) cancels this task."""
        run = self._addons
        assert run is not None and run.session is not None
        try:
            for hook in hooks:
                run.session.starting = hook.addon
                try:
                    if hook.is_async:
                        timeout = asyncio.timeout(ADDON_HOOK_TIMEOUT_S)
                        try:
                            async with timeout:
                                answer = await hook.fn(run.session)
                        except TimeoutError:
                            if not timeout.expired():
                                raise  # the hook's own
                            raise TimeoutError(f"{hook.name} did not return within "
                                               f"{ADDON_HOOK_TIMEOUT_S:g} s") from None  # fmt: skip
                    else:
                        answer = hook.fn(run.session)
                except _HOOK_ERRORS as exc:
                    if isinstance(exc, asyncio.CancelledError) and cancelling():
                        raise  # the session's own close cancelled it: nothing to report
                    self._addon_failed(hook, exc)
                    return
                if self.phase is Phase.CLOSED:
                    return
                if not self._start_hook(hook, answer, run):
                    return
            run.task = None
            run.session.starting = None
            self._carry_out(_final(run.verdict, verdict), deciding, time.monotonic(), sniffed)
            if self.phase is not Phase.CLOSED:
                self._client_addr = ()
        except Exception as exc:  # the session boundary (a bug of ours past the hooks)
            self.fail(exc)

    def _addon_failed(self, hook: Hook, exc: BaseException) -> None:
        """A hook raised or answered nonsense: one `session_error` naming the addon and the
        hook, and (for `session_start`) the session reset with `addon_error`."""
        if self.phase is Phase.CLOSED:
            return
        record = self.record
        assert record is not None
        self._addon_error(record.id, hook_error(exc), hook.addon, hook.name)
        self.close(CloseReason.ADDON_ERROR)

    # --- the verdict ----------------------------------------------------------------------------

    def _carry_out(
        self,
        verdict: Verdict,
        deciding: _Deciding,
        now: float,
        sniffed: Sniffed | None = None,
    ) -> None:
        record = self.record
        assert record is not None and verdict.action is not None
        record.action = verdict.action.value
        record.rule = verdict.rule
        config = self._ctx.config
        self._capture = config if verdict.capture or config.capture_all else None
        action = verdict.action
        if action is Action.RESET:
            # Nothing is relayed: neither intercepted nor passed through (`_decided` looked the
            # interception up for the addons' `session.tls`).
            self._tls = record.passthrough = None
            self.close(CloseReason.POLICY_RESET)
            return
        target = deciding.dst_addr
        spoof_ip = self._spoof_ip()
        if action is Action.REDIRECT:
            assert verdict.to is not None
            target = (verdict.to.host, verdict.to.port)
            record.upstream = str(verdict.to)
            if self._ctx.guard.is_self(target):
                self._ctx.log.emit(UpstreamFailed(record.id, record.upstream, "ELOOP",
                                                  "the redirect target is this proxy"))  # fmt: skip
                self.close(CloseReason.LOOP_REFUSED)
                return
        elif action is Action.VIA:
            assert verdict.via is not None
            target, spoof_ip = (verdict.via.address.host, verdict.via.address.port), None
            record.upstream = str(verdict.via.address)
            facts = None if sniffed is None else _sniffed_facts(sniffed)
            deciding.handshake = self._proxy_handshake(verdict, deciding, facts)
            if deciding.handshake is None:
                return
        if verdict.tls is not None and verdict.intercepts and self._tls is None:
            self._tls = self._intercepting(verdict, sniffed, deciding, now)
        self._deciding = deciding if (deciding.held or deciding.handshake) else None
        self._connect(target, spoof_ip, now)

    def _intercepting(
        self, verdict: Verdict, sniffed: Sniffed | None, deciding: _Deciding, now: float
    ) -> _Intercepting | None:
        """What intercepting this session takes; None when it is relayed untouched: no CA in
        this process, not TLS, or its name (its destination, without SNI) is passed through
        for now (`record.passthrough` says why)."""
        hello = None if sniffed is None else sniffed.facts
        if self._ctx.interception is None or not isinstance(hello, TlsHello):
            return None
        ip = deciding.dst_addr[0].split("%", 1)[0]  # (an IPv6 scope is not an address)
        key = passthrough_key(hello.sni, ip, deciding.dst_addr[1])
        tls = _Intercepting(hello, verdict, ip, key, self._client_addr[0])
        memory = self._ctx.passthrough
        passed: PassthroughReason | None = memory.lookup(tls.key, now)
        if passed is None and tls.on_client_reject:  # (only where the rule opts in)
            passed = memory.lookup(tls.client_key, now)
        if passed is not None:
            assert self.record is not None
            self.record.passthrough = passed
            return None
        return tls

    def _proxy_handshake(
        self, verdict: Verdict, deciding: _Deciding, facts: SniffedFacts | None
    ) -> ProxyHandshake | None:
        """The upstream proxy's handshake, asking for the sniffed name (`remote_name`) or the
        original destination; None (and the session closed) when neither can be asked for."""
        proxy, record = verdict.via, self.record
        assert proxy is not None and record is not None
        ip, port = deciding.dst_addr[0], deciding.dst_addr[1]
        name = remote_name(facts) if verdict.remote_name else None
        for host in (name, ip) if name is not None else (ip,):
            try:
                return handshake_for(proxy, host, port)
            except ValueError as exc:  # a name too long; an IPv6 address with a zone
                why = str(exc)
        self._ctx.log.emit(UpstreamFailed(record.id, record.dst, "EINVAL",
                                          f"upstream proxy {proxy.address}: {why}"))  # fmt: skip
        self.close(CloseReason.UPSTREAM_PROXY_FAILED)
        return None

    # --- CONNECTING -----------------------------------------------------------------------------

    def _connect(self, target: tuple[Any, ...], spoof_ip: str | None, now: float) -> None:
        config = self._ctx.config
        try:
            sock = open_upstream_socket(target[0], spoof_ip, config.mark)
        except OSError as exc:
            self._connect_failed(exc.errno or 0, exc.strerror or str(exc))
            return
        self._upstream = sock
        self._connect_at = now
        code = sock.connect_ex(target[:2])
        if code == 0:
            self._connected()
        elif code == errno.EINPROGRESS:
            # No timer per connection (it would cost more than the rest of accepting): the
            # server's sweep enforces this deadline.
            self.connect_deadline_at = now + config.connect_timeout_s
            self.phase = Phase.CONNECTING
            self._ctx.poller.add_writer(sock.fileno(), self)
        else:
            self._connect_failed(code, os.strerror(code))

    def on_writable(self) -> None:
        """The upstream connect finished, one way or the other."""
        try:
            self._stop_connecting()
            assert self._upstream is not None
            code = self._upstream.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._connect_failed(code, os.strerror(code))
            else:
                self._connected()
        except Exception as exc:
            self.fail(exc)

    def sweep(self, now: float) -> None:
        """Enforce this session's deadlines at `now` (monotonic); the server's sweep calls it."""
        phase = self.phase
        if phase is Phase.ADDONS:  # the hooks' task should have ended by itself long ago
            if now >= self.connect_deadline_at:
                record = self.record
                assert record is not None
                why = f"session_start did not end within {ADDON_HOOK_TIMEOUT_S:g} s a hook"
                self._addon_error(record.id, why, None, "session_start")
                self.close(CloseReason.ADDON_ERROR)
        elif phase is Phase.CONNECTING or phase is Phase.HANDSHAKING:
            if now >= self.connect_deadline_at:
                self._stop_connecting()
                timeout_s = self._ctx.config.connect_timeout_s
                self._connect_failed(errno.ETIMEDOUT, f"no answer within {timeout_s:g} s")
        elif phase is Phase.RELAYING:
            record = self.record
            assert record is not None
            relay = self._relay
            if isinstance(relay, TLSRelay) and relay.handshake_deadline_at is not None:
                if now >= relay.handshake_deadline_at:
                    relay.handshake_deadline_passed()
                return
            reason = expired_reason(
                record.last_activity_at, record.half_closed_at, now, self._ctx.config.timeouts
            )
            if reason is not None:
                self.close(reason)

    def _stop_connecting(self) -> None:
        if self.phase is Phase.CONNECTING:
            assert self._upstream is not None
            self._ctx.poller.remove_writer(self._upstream.fileno())
        elif self.phase is Phase.HANDSHAKING:
            assert self._upstream is not None
            self._ctx.poller.remove_reader(self._upstream.fileno())

    def _via(self) -> bool:
        return self._deciding is not None and self._deciding.handshake is not None

    def _connect_failed(self, code: int, detail: str) -> None:
        record = self.record
        assert record is not None
        name = errno.errorcode.get(code, str(code))
        if self._via():
            detail = f"upstream proxy {record.upstream}: {detail}"
            reason = _PROXY_FAILURE_REASONS.get(code, CloseReason.UPSTREAM_PROXY_FAILED)
        else:
            reason = _CONNECT_FAILURE_REASONS.get(code, CloseReason.UPSTREAM_FAILED)
        self._ctx.log.emit(UpstreamFailed(record.id, record.dst, name, detail))
        self.close(reason)

    def _connected(self) -> None:
        deciding, upstream = self._deciding, self._upstream
        assert upstream is not None
        if deciding is None or deciding.handshake is None:
            self._relay_start()
            return
        # A `via` rule: talk to the upstream proxy first, on the connect's deadline.
        if self.phase is not Phase.CONNECTING:  # connected at once (connect_ex gave 0)
            config = self._ctx.config
            self.connect_deadline_at = time.monotonic() + config.connect_timeout_s
        self.phase = Phase.HANDSHAKING
        poller = self._ctx.poller
        poller.remove_reader(self._client_sock.fileno())  # if it waited to be sniffed
        poller.add_reader(upstream.fileno(), self)
        self._handshake_send(deciding.handshake.start())

    # --- HANDSHAKING ----------------------------------------------------------------------------

    def _handshake_send(self, data: bytes) -> None:
        upstream = self._upstream
        assert upstream is not None
        try:
            sent = upstream.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._connect_failed(exc.errno or 0, exc.strerror or str(exc))
            return
        if sent < len(data):  # a new connection's send buffer takes a few hundred bytes
            self._handshake_failed("the upstream proxy would not take our request", False)

    def _handshake_more(self) -> None:
        deciding, upstream = self._deciding, self._upstream
        assert deciding is not None and deciding.handshake is not None and upstream is not None
        try:
            data = upstream.recv(_HANDSHAKE_READ_BYTES)
        except BlockingIOError:
            return
        except OSError as exc:
            self._stop_connecting()
            self._connect_failed(exc.errno or 0, exc.strerror or str(exc))
            return
        if not data:
            self._handshake_failed("the upstream proxy closed the connection", False)
            return
        step = deciding.handshake.receive(data)
        if isinstance(step, Send):
            self._handshake_send(step.data)
        elif isinstance(step, Established):
            self._stop_connecting()
            deciding.leftover = step.leftover
            self._relay_start()
        elif isinstance(step, Refused):
            self._handshake_failed(step.detail, step.refused)
        # else: NEED_MORE, wait for the rest of the answer

    def _handshake_failed(self, detail: str, refused: bool) -> None:
        record = self.record
        assert record is not None
        self._stop_connecting()
        self._ctx.log.emit(UpstreamFailed(
            record.id, record.dst, "ECONNREFUSED" if refused else "EPROTO",
            f"upstream proxy {record.upstream}: {detail}",
        ))  # fmt: skip
        self.close(
            CloseReason.UPSTREAM_PROXY_REFUSED if refused else CloseReason.UPSTREAM_PROXY_FAILED
        )

    # --- RELAYING -------------------------------------------------------------------------------

    def _relay_start(self) -> None:
        ctx, record, upstream, deciding = self._ctx, self.record, self._upstream, self._deciding
        assert record is not None and upstream is not None
        now = time.monotonic()
        connect_ms = round((now - record.opened_at) * 1000, 3)
        if ctx.metrics is not None:
            ctx.metrics.connected(now - self._connect_at)
        self._connect_at = 0.0  # no float kept per idle session
        source = format_sockaddr(upstream.getsockname())
        ctx.log.emit(UpstreamConnected(record.id, record.dst, source, connect_ms,
                                       record.upstream))  # fmt: skip
        self.phase = Phase.RELAYING
        self.connect_deadline_at = 0.0  # past; and no float kept per idle session
        pool = ctx.pipes if ctx.config.relay is RelayKind.SPLICE else None
        pending_up = pending_down = b""
        if deciding is not None:
            held = deciding.held
            pending_up = bytes(held) if isinstance(held, bytearray) else held
            pending_down = deciding.leftover
            self._deciding = None
        if record.sniffed is None:
            # What the session is, read from its first bytes as they pass (no wait: no rule
            # needed the facts before connecting). A proxy's first tunnelled bytes came before
            # any of the client's went through: the watcher hears of them.
            self._sniffer = FirstBytes()
            if pending_down:
                self._sniffer.upstream_sent()
        if self._capture is not None:
            self._recording = self._open_recording(self._capture)
        tls, interception = self._tls, ctx.interception
        run, claimed = self._addons, _claimed(self._addons)
        if claimed is not None:
            record.addons = list(claimed.claimers)
        if tls is not None and interception is not None:
            # Claimed: the addons' hooks see the plaintext (`record.relay` "addon").
            tls_relay = TLSRelay(ctx.poller, self._client_sock, upstream, record, hello=tls.hello,
                                 held=pending_up, destination=tls.destination,
                                 interception=interception, upstream_verify=tls.upstream_verify,
                                 on_end=self._relay_ended, on_error=self.fail, spawn=ctx.spawn,
                                 recording=self._recording, pending_down=pending_down,
                                 session=claimed, addons=() if run is None else run.addons.addons,
                                 on_addon_error=self._addon_failed)  # fmt: skip
            self._relay = tls_relay
            tls_relay.start()  # the upstream's handshake starts; it may end the session
            return
        if run is not None and claimed is not None:
            relay = AddonRelay(ctx.poller, self._client_sock, upstream, record,
                               session=claimed, addons=run.addons.addons,
                               on_end=self._relay_ended, on_error=self.fail,
                               on_addon_error=self._addon_failed, spawn=ctx.spawn,
                               tap=self._sniffer, pending_up=pending_up,
                               pending_down=pending_down, recording=self._recording)  # fmt: skip
            self._relay = relay
            relay.start()  # the first hooks may run, and end the session
            return
        self._relay = Relay(ctx.poller, self._client_sock, upstream, record, pool=pool,
                            on_end=self._relay_ended, on_error=self.fail,
                            spawn=ctx.spawn, tap=self._sniffer, pending_up=pending_up,
                            pending_down=pending_down, recording=self._recording)  # fmt: skip

    def _open_recording(self, config: ProxyConfig) -> Recorder | None:
        """The capture of this session under `config` (the one that chose to capture it: a
        reload since changes nothing for it), or None when it cannot be made (the file cannot be
        created or written: a notice says why, and the session relays uncaptured)."""
        ctx, record = self._ctx, self.record
        assert record is not None
        if config.capture_dir is None:  # not a configuration that loads (`capture.setup`)
            return None
        started_at = time.time() - (time.monotonic() - record.opened_at)
        try:
            client, dst = parse_endpoint(record.client), parse_endpoint(record.dst)
            conversation = TcpConversation((str(client.ip), client.port),
                                           (str(dst.ip), dst.port), started_at)  # fmt: skip
            name = capture_name(started_at, record.id, record.client, record.dst)
            file = open_capture(config.capture_dir, name)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            self._not_captured(why)
            return None
        recorder = Recorder(conversation, file, config.capture_max_bytes, started_at)
        if recorder.error is not None:  # its first write failed (a full disk): relay as usual
            self._not_captured(recorder.error)
            recorder.close(cut=False)
            return None
        if ctx.metrics is not None:
            ctx.metrics.captures += 1
        return recorder

    def _not_captured(self, why: str) -> None:
        ctx, record = self._ctx, self.record
        assert record is not None
        ctx.log.emit(Notice(f"session {record.id}: not captured: {why}"))
        if ctx.metrics is not None:
            ctx.metrics.capture_failures += 1

    def _close_recording(self, recording: Recorder, cut: bool) -> tuple[str | None, int | None]:
        """Finish the capture file: its final path (None if it failed) and where it was cut.
        Never raises: whatever goes wrong ends the capture, not the teardown."""
        record = self.record
        assert record is not None
        try:
            path = recording.close(cut=cut)
        except Exception as exc:  # a bug of ours: the close must go on for every session
            recording.abandon()
            path, recording.error = None, f"{type(exc).__name__}: {exc}"
        if recording.error is not None:
            self._ctx.log.emit(Notice(f"session {record.id}: capture ended: {recording.error}"))
        return path, recording.truncated_at if path is not None else None

    def _relay_ended(self, reason: CloseReason) -> None:
        # A clean end leaves both sockets open for close() to send the last FINs; after a reset
        # the relay has already reset them. Either way the relay is done: nothing to stop.
        if isinstance(self._relay, TLSRelay):
            self._tls_ended(self._relay)
        self._relay = None
        self.close(reason, abort=False)

    def _tls_ended(self, relay: TLSRelay) -> None:
        """Keep what the TLS relay negotiated (or why it failed) for the close event, and
        remember a name that must pass through from now on (`tls.passthrough`)."""
        record, tls = self.record, self._tls
        assert record is not None and tls is not None
        outcome = record.tls = relay.outcome
        why = reason_to_remember(outcome.failure, outcome.failed_side,
                                 on_client_reject=tls.on_client_reject)  # fmt: skip
        if why is not None:
            memory = self._ctx.passthrough
            key = tls.key if why is PassthroughReason.UPSTREAM_WANTS_CLIENT_CERT else tls.client_key
            memory.remember(key, why, time.monotonic())
            self._ctx.log.emit(Notice(f"session {record.id}: {to_printable(key.encode(), 300)} "
                                      f"passes through for {memory.ttl_s:g} s: {why}"))  # fmt: skip

    def _addon_error(self, session_id: str, why: str, addon: str | None, hook: str) -> None:
        """An addon's hook failed: one `session_error` naming them, counted for the metrics."""
        self._ctx.log.emit(SessionFailed(session_id, why, addon, hook))
        if self._ctx.metrics is not None:
            self._ctx.metrics.addon_failed(addon, hook)

    def fail(self, exc: BaseException) -> None:
        """The session boundary: an unexpected error ends this session only, logged."""
        if self.phase is not Phase.CLOSED:
            session_id = "-" if self.record is None else self.record.id
            self._ctx.log.emit(SessionFailed(session_id, f"{type(exc).__name__}: {exc}"))
            self.close(CloseReason.ERROR)

    def _end_addons(self, run: AddonRun, reason: CloseReason) -> None:
        """Stop an `async def session_start` still running; call every addon's `session_end`
        if `session_start` ran (an `async def` one is scheduled, not awaited). Never raises:
        what a hook raises is logged, and changes nothing else."""
        task = run.task
        if task is not None and not task.done():
            try:
                current = asyncio.current_task()
            except RuntimeError:  # no loop running (closed from outside it)
                current = None
            if task is not current:  # (its own hook failed: it is ending by itself)
                task.cancel()
        run.task = None
        session, record = run.session, self.record
        if session is None or record is None:
            return
        session.detach()
        session.reason = reason.value
        for hook in run.addons.session_end:
            try:
                if hook.is_async:
                    ending = self._ctx.ending_hooks
                    task = self._ctx.spawn(self._end_hook_async(hook, session, record.id))
                    ending.add(task)
                    task.add_done_callback(ending.discard)
                else:
                    hook.fn(session)
            except _HOOK_ERRORS as exc:
                self._addon_error(record.id, hook_error(exc), hook.addon, hook.name)

    async def _end_hook_async(self, hook: Hook, session: AddonSession, session_id: str) -> None:
        timeout = asyncio.timeout(ADDON_HOOK_TIMEOUT_S)
        try:
            async with timeout:
                await hook.fn(session)
        except _HOOK_ERRORS as exc:
            if isinstance(exc, asyncio.CancelledError) and cancelling():
                raise  # tproxy is stopping: the hook is cut short, not in error
            if isinstance(exc, TimeoutError) and timeout.expired():
                exc = TimeoutError(f"{hook.name} did not return within {ADDON_HOOK_TIMEOUT_S:g} s")
            self._addon_error(session_id, hook_error(exc), hook.addon, hook.name)

    def close(self, reason: CloseReason, *, abort: bool = True) -> None:
        """End the session (once): stop what runs, reset both sides (`abort`, the default) or
        close them with a FIN, write `session_close` with `reason`."""
        if self.phase is Phase.CLOSED:
            return
        self._stop_connecting()
        self.phase = Phase.CLOSED
        if self._limits is not None and self._limit_key is not None:
            self._limits.release(self._limit_key)
        self._limits = self._limit_key = None
        if self._deciding is not None and self._deciding.sniff_wait is not None:
            self._ctx.sniff_deadlines.cancel(self._deciding.sniff_wait)
        self._deciding = None
        self._client_addr = ()
        if self._relay is not None:
            if isinstance(self._relay, TLSRelay):
                self._tls_ended(self._relay)
            self._relay.stop()
        ctx = self._ctx
        for sock in (self._client_sock, self._upstream):
            if sock is None:
                continue
            if sock.fileno() >= 0:
                ctx.poller.forget(sock.fileno())
            if abort:
                abort_socket(sock)
            else:
                sock.close()
        record = self.record
        if record is None:  # failed before the open was logged: nothing to close in the log
            return
        if self._sniffer is not None:
            record.sniffed = self._sniffer.final()
            self._sniffer = None
        ctx.sessions.discard(self)
        capture = capture_cut = None
        if self._recording is not None:
            capture, capture_cut = self._close_recording(self._recording, cut=abort)
            self._recording = None
        ctx.closed_bytes_up += record.bytes_up
        ctx.closed_bytes_down += record.bytes_down
        if ctx.metrics is not None:
            ctx.metrics.session_closed(
                reason, record.action, record.rule,
                None if record.sniffed is None else record.sniffed.proto,
                up=record.bytes_up, down=record.bytes_down,
            )  # fmt: skip
        ctx.pipes.trim(ctx.active)
        if self._addons is not None:
            self._end_addons(self._addons, reason)
            self._addons = None
        sniffed: SniffedFields = (
            _NOT_SNIFFED if record.sniffed is None else (record.sniffed.event_fields())
        )
        ctx.log.emit(
            SessionClosed(
                record.id,
                record.client,
                record.dst,
                record.bytes_up,
                record.bytes_down,
                round(time.monotonic() - record.opened_at, 6),
                reason,
                ctx.active,
                record.relay,
                record.spliced_bytes,
                *sniffed,
                record.rule,
                record.action,
                record.upstream,
                capture,
                capture_cut,
                record.addons,
                *tls_fields(record.tls, record.passthrough),
            )
        )
