"""What the engine gives addons (issue 12): the `Session` object a hook sees, and the pure
helpers around calling `session_start` and `session_end` (the byte hooks are
`engine.addon_relay`'s).

`AddonSession` implements `tproxy.addons.api.Session` for one engine session: it reads the
session's record (id, byte counts, what was sniffed) and keeps what the policy decided, the
addon's `state` and, at `session_end`, the close `reason`. `AddonRun` is what an engine session
holds when it has addons: the `Addons` of the configuration it started with (a SIGHUP reload
changes the next sessions' addons, not this one's), its `AddonSession` once `session_start`
ran, the first verdict an addon returned, and the task of an `async def` hook it waits for.

Limits, as a user sees them:

* `redirect(...)` and `via(...)` verdicts whose host is a name, not an IP literal, are refused
  (an `addon_error`): the policy resolves its names when it is loaded, an addon's verdict would
  have to be resolved per session, which is out of scope.
* `close()` is for a relaying session; in `session_start` it raises (`reset()` there is a reset
  verdict, as returning `reset()` is).
* An `async def` hook has `ADDON_HOOK_TIMEOUT_S` to return; past it the session is reset
  (`addon_error`). An `async def session_end` is scheduled and not awaited: the session's
  `session_close` is written without waiting for it.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Protocol

from tproxy.addons.api import Address, InterceptedTLS, NegotiatedTLS
from tproxy.addons.api import Verdict as AddonVerdict
from tproxy.policy.decide import Verdict
from tproxy.sniffers.printable import to_printable

if TYPE_CHECKING:
    from tproxy.addons.loader import Addons
    from tproxy.core.session import SessionRecord
    from tproxy.engine.tls_relay import TLSOutcome
    from tproxy.sniffers.classify import Sniffed
    from tproxy.tls.legs import TLSInfo

ADDON_HOOK_TIMEOUT_S: Final = 10.0
"""How long an `async def` hook may take before its session is reset (`addon_error`)."""

ADDON_SNIFF_TIMEOUT_S: Final = 1.0
"""How long a session waits for its first bytes for an addon's `sniff = True` when there is no
policy (with one, the policy's `sniff_timeout_s`)."""

MAX_ERROR_CHARS: Final = 300
"""The longest a hook's exception is in the log (`Type: message`, escaped to printable ASCII)."""


class Pushable(Protocol):
    def push(self, data: bytes) -> None:
        """Queue `data` for this direction's sink, after what is queued."""


class ClaimedRelay(Protocol):
    """The relay of a claimed session, as its `AddonSession` drives it: the addon relay
    (`engine.addon_relay`), or the TLS relay of an intercepted one (`engine.tls_relay`)."""

    @property
    def up(self) -> Pushable: ...

    @property
    def down(self) -> Pushable: ...

    @property
    def tls_outcome(self) -> TLSOutcome | None:
        """An intercepted session's TLS so far (None: not intercepted)."""

    def addon_close(self) -> None: ...

    def addon_reset(self) -> None: ...


class AddonSession:
    """One session as its addons see it (`tproxy.addons.api.Session`).

    Before its relay starts, what an addon sends is kept here (sent first once relaying); the
    addon relay `attach`es itself when it starts, and `detach`es when the session ends: from
    then on sending raises, and `close()`/`reset()` do nothing.

    Args:
        record: the engine's record of the session (id, byte counts, sniffed facts).
        rule: the policy rule that decided (None: the default, or no policy).
        action: what the policy decided ("allow" without a policy).
        on_reset: resets the engine's session, for `reset()` when no addon relay runs it (a
            session not claimed, not connected yet, or waiting for an async `session_start`);
            during a plain `session_start` it leaves the reset to the verdict.
    """

    __slots__ = (
        "_ended", "_on_reset", "_record", "_relay", "_state", "_to_client", "_to_upstream",
        "action", "claimers", "intercepting", "reason", "reset_asked", "rule", "starting",
    )  # fmt: skip

    def __init__(
        self,
        record: SessionRecord,
        rule: str | None,
        action: str,
        on_reset: Callable[[], None] = lambda: None,
    ) -> None:
        self._record = record
        self._on_reset = on_reset
        self.rule = rule
        self.action = action
        self.reason: str | None = None
        self._state: dict[str, Any] | None = None  # made when an addon first looks
        # The addon whose session_start runs now (claim() claims for it); None outside them.
        self.starting: str | None = None
        # The addons that claimed the session, in claim order (most sessions: none; nothing
        # is made per session that no addon uses: the garbage collector's work is per object).
        self.claimers: list[str] | tuple[()] = ()
        self.reset_asked = False  # reset() in session_start: a reset verdict
        self.intercepting = False  # the policy's rule intercepts its TLS (`tls` before any)
        self._to_client: list[bytes] | None = None  # sent before relaying, made when sent
        self._to_upstream: list[bytes] | None = None
        self._relay: ClaimedRelay | None = None
        self._ended = False

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def state(self) -> dict[str, Any]:
        state = self._state
        if state is None:
            state = self._state = {}
        return state

    @property
    def client(self) -> Address:
        return _address(self._record.client)

    @property
    def dst(self) -> Address:
        return _address(self._record.dst)

    @property
    def sniffed(self) -> Sniffed | None:
        return self._record.sniffed

    @property
    def tls(self) -> InterceptedTLS | None:
        relay = self._relay
        outcome = relay.tls_outcome if relay is not None else self._record.tls
        if outcome is None:
            return _NOT_YET if self.intercepting else None
        return intercepted_tls(outcome)

    @property
    def bytes_up(self) -> int:
        return self._record.bytes_up

    @property
    def bytes_down(self) -> int:
        return self._record.bytes_down

    def claim(self) -> None:
        """Claim the session's bytes for the addon whose `session_start` is running."""
        if self.starting is None:
            raise RuntimeError("claim() is for session_start")
        if self.starting not in self.claimers:
            self.claimers = [*self.claimers, self.starting]

    def send_to_client(self, data: bytes) -> None:
        self._send(data, to_client=True)

    def send_to_upstream(self, data: bytes) -> None:
        self._send(data, to_client=False)

    def _send(self, data: bytes, to_client: bool) -> None:
        verb = "send_to_client" if to_client else "send_to_upstream"
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"{verb}() takes bytes, not {type(data).__name__}")
        if not self.claimers:
            raise RuntimeError(f"{verb}(): only for claimed sessions (claim() in session_start)")
        if self._ended:
            raise RuntimeError(f"{verb}(): the session has ended")
        data = bytes(data)
        relay = self._relay
        if relay is None:  # still deciding or connecting: sent first, once relaying
            if to_client:
                self._to_client = [*(self._to_client or ()), data]
            else:
                self._to_upstream = [*(self._to_upstream or ()), data]
        else:
            (relay.down if to_client else relay.up).push(data)

    def close(self) -> None:
        if self._relay is not None:
            self._relay.addon_close()
        elif self._ended:
            return
        elif self.starting is not None:
            raise RuntimeError("close() in session_start: return reset() to refuse the session")
        elif not self.claimers:
            raise RuntimeError("close() is for claimed sessions (claim() in session_start); "
                               "reset() ends any session")  # fmt: skip
        else:
            raise RuntimeError("close(): the session is not relaying yet; reset() ends it")

    def reset(self) -> None:
        if self._relay is not None:
            self._relay.addon_reset()
        elif not self._ended:
            if self.starting is not None:  # a reset verdict, if session_start is still to end
                self.reset_asked = True
            self._on_reset()  # the engine's session resets it now, unless in a plain hook

    def attach(self, relay: ClaimedRelay) -> tuple[list[bytes], list[bytes]]:
        """The relay starts taking the addons' sending: what was sent before it, (to the
        upstream, to the client)."""
        self._relay = relay
        queued = self._to_upstream or [], self._to_client or []
        self._to_upstream = self._to_client = None
        return queued

    def detach(self) -> None:
        """The session has ended (or its relay is ending): nothing more can be sent."""
        self._relay = None
        self._ended = True
        # The engine's session is not needed any more, and must not be kept: it holds this
        # object, and a cycle would leave every session to the cyclic garbage collector.
        self._on_reset = _nothing
        self._to_client = self._to_upstream = None


def _nothing() -> None:
    pass


_NOT_YET: Final = InterceptedTLS(None, None, None, None, upstream_verified=False, failure=None)
"""`tls` of a session to be intercepted, before its handshakes."""


def _negotiated(info: TLSInfo | None) -> NegotiatedTLS | None:
    return None if info is None else NegotiatedTLS(info.version, info.cipher, info.alpn)


def intercepted_tls(outcome: TLSOutcome) -> InterceptedTLS:
    """`session.tls`, from what the TLS relay says of the session (made when a hook asks)."""
    upstream, failure = outcome.upstream, outcome.failure
    return InterceptedTLS(
        client=_negotiated(outcome.client),
        upstream=_negotiated(upstream),
        upstream_subject=None if upstream is None else upstream.peer_subject,
        upstream_issuer=None if upstream is None else upstream.peer_issuer,
        upstream_verified=outcome.upstream_verify and upstream is not None and upstream.verified,
        failure=None if failure is None else failure.detail,
    )


def _address(endpoint: str) -> Address:
    """`(ip, port)` of a record's endpoint (`ip:port`, `[ip]:port`, as `format_sockaddr` made
    it): split when a hook asks, not parsed for every session (most never ask)."""
    if endpoint.startswith("["):
        host, _, port = endpoint[1:].rpartition("]:")
    else:
        host, _, port = endpoint.rpartition(":")
    return host, int(port)


class AddonRun:
    """What a session with addons holds: its addons, and how far their `session_start` went."""

    __slots__ = ("addons", "session", "task", "verdict")

    def __init__(self, addons: Addons) -> None:
        self.addons = addons
        self.session: AddonSession | None = None  # made when session_start is about to run
        self.verdict: Verdict | None = None  # the first addon verdict, as the policy's type
        self.task: asyncio.Task[None] | None = None  # an async session_start being waited for


def cancelling() -> bool:
    """Whether the running task is being cancelled (by whoever called its `cancel()`)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def has_hooks(addons: Addons | None) -> bool:
    """Whether `addons` gives a session anything to do: a `session_start`, a `session_end`, or
    `sniff = True` (byte hooks run only for sessions a `session_start` claimed)."""
    return addons is not None and bool(
        addons.session_start or addons.session_end or addons.wants_sniff
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def engine_verdict(answer: object, addon: str) -> Verdict | None:
    """What `session_start` returned, as the policy's `Verdict` (its rule `addon:NAME`); None
    for no opinion.

    Raises:
        TypeError: the answer is neither None nor a `tproxy.addons.api.Verdict`.
        ValueError: a `redirect` or `via` whose host is a name, not an IP literal.
    """
    if answer is None:
        return None
    if not isinstance(answer, AddonVerdict):
        if inspect.iscoroutine(answer):  # a plain def that returned a coroutine: never awaited
            answer.close()
        raise TypeError(
            f"session_start returned {type(answer).__name__}: return allow(), reset(), "
            "redirect(...), via(...) or None"
        )
    host = answer.to.host if answer.to is not None else None
    if answer.via is not None:
        host = answer.via.address.host
    if host is not None and not _is_ip(host):
        raise ValueError(f"{answer}: addons' verdicts take IP addresses only, not a host name")
    return Verdict(answer.action, rule=f"addon:{addon}", to=answer.to, via=answer.via,
                   remote_name=answer.remote_name)  # fmt: skip


def hook_error(exc: BaseException) -> str:
    """`Type: message` of a hook's exception, one line of printable ASCII (the message may hold
    what a client sent), at most `MAX_ERROR_CHARS` characters."""
    try:
        message = str(exc)
    except Exception:  # an addon's exception whose __str__ raises: its type says enough
        message = "(its message could not be read)"
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return to_printable(text.encode("utf-8", "backslashreplace"), MAX_ERROR_CHARS)
