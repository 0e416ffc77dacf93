"""What an addon author imports: the `Session` a hook is given, the verdicts `session_start` may
return, and the hooks' names; pure, no I/O.

An addon is a Python file (`tproxy run --addon FILE`) whose module-level functions named after
the hooks are its hooks, or whose module-level `addons = [obj, ...]` lists objects with hook
methods. A hook may be a plain function or an `async def`::

    from tproxy.addons.api import Session, Verdict, reset

    sniff = True  # sessions wait for their first bytes, so session_start sees the SNI

    def session_start(session: Session) -> Verdict | None:
        if session.sniffed is not None and session.sniffed.sni == "ads.example":
            return reset()
        return None  # no opinion: the policy's verdict stands

    def session_end(session: Session) -> None:
        print(session.id, session.reason, session.bytes_up, session.bytes_down)

The hooks, with what each is given and returns (`HOOKS` in the order a session meets them):

    session_start(session) -> Verdict | None   the policy has decided, nothing is connected yet
    client_data(session, data) -> bytes         claimed sessions: a chunk from the client
    server_data(session, data) -> bytes         claimed sessions: a chunk from the upstream
    client_eof(session) -> bytes                claimed sessions: the client sent FIN
    server_eof(session) -> bytes                claimed sessions: the upstream sent FIN
    session_end(session) -> None                after session_start ran: byte counts, reason

The byte hooks are called only for a session the addon claimed (`session.claim()` in its
`session_start`); with several claiming addons each data hook gets the previous one's output
(in the order the addons were given), and an eof hook's output goes through the later addons'
data hooks before the FIN is passed on. Chunks are whatever one read returned (at most 64 KiB):
message boundaries are not kept, so a hook that parses must buffer (in `session.state`), and
returns b"" to hold bytes back. A session no addon claims is relayed on the zero-copy path.

A session that ends while an `async def` hook awaits cancels that hook; `session_end` may then
run before the cancelled hook has unwound (whatever it sends then raises RuntimeError).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

from tproxy.core.options import ConfigError
from tproxy.policy.model import (
    Action,
    HostPort,
    UpstreamProxy,
    parse_host_port,
    parse_upstream_proxy,
)
from tproxy.sniffers.classify import Sniffed
from tproxy.upstream.handshake import handshake_for

__all__ = [
    "HOOKS",
    "Action",
    "Address",
    "HostPort",
    "InterceptedTLS",
    "NegotiatedTLS",
    "Session",
    "Sniffed",
    "UpstreamProxy",
    "Verdict",
    "allow",
    "redirect",
    "reset",
    "via",
]

HOOKS: Final = (
    "session_start",
    "client_data",
    "server_data",
    "client_eof",
    "server_eof",
    "session_end",
)
"""Every hook's name, in the order a session meets them."""

HOOK_PARAMETERS: Final = {
    "session_start": ("session",),
    "client_data": ("session", "data"),
    "server_data": ("session", "data"),
    "client_eof": ("session",),
    "server_eof": ("session",),
    "session_end": ("session",),
}
"""What each hook is called with, positionally."""

Address = tuple[str, int]
"""An endpoint as `(ip, port)`: the IP as text ("198.18.1.2", "2001:db8::1"), the port a number."""


class Session(Protocol):
    """One intercepted client connection and its upstream connection, as a hook sees it.

    The same object is passed to every hook of one session, so an addon may keep its
    per-session data in `state` (shared by the session's addons: use keys of your own). Every
    other member belongs to the proxy: read it, do not set it.
    """

    @property
    def id(self) -> str:
        """The session id, as in the session log (13 characters, sortable by start time)."""

    @property
    def client(self) -> Address:
        """The client's endpoint: the side that connected."""

    @property
    def dst(self) -> Address:
        """The original destination: where the client was going (not where a `redirect` or a
        `via` verdict connects instead)."""

    @property
    def rule(self) -> str | None:
        """The name of the policy rule that decided the session; None for the policy's default
        and when there is no policy."""

    @property
    def action(self) -> str:
        """What the policy decided: "allow" (also without a policy), "reset", "redirect" or
        "via"."""

    @property
    def sniffed(self) -> Sniffed | None:
        """What the client's first bytes said: `proto` ("tls", "http", "ssh", "unknown",
        "silent") and `sni`, `alpn`, `tls_offered`, `ech`, `http_host`, `http_method` (each
        None where the protocol has no such fact).

        In `session_start` it is None unless the session waited for its first bytes before the
        decision: because a policy rule needed them, or because an addon said `sniff = True`
        at module level (which makes every session wait, as a rule on the SNI does). By
        `session_end` it holds whatever was sniffed as the bytes passed.
        """

    @property
    def tls(self) -> InterceptedTLS | None:
        """What tproxy's TLS interception did with the session (`tls = "intercept"` rules):
        the two TLS connections' versions, ciphers and ALPN, the upstream's certificate; None
        for a session not intercepted (no such rule, not TLS, passed through).

        In `session_start` it is set, with both connections still None, when the policy's rule
        intercepts the session (and its name is not passed through for now, after a client
        refused our certificate or an upstream asked for a client certificate): claim the
        session then to see its plaintext. (A verdict an addon returns keeps the rule's
        interception, but for `reset()`.) In the byte hooks of an intercepted session both
        handshakes are done (`tls.intercepted`) and the hooks see the plaintext, never a TLS
        record; in `session_end`, whatever was negotiated, or why a handshake failed. A claimed
        TLS session that is not intercepted shows its hooks the encrypted bytes.
        """

    @property
    def bytes_up(self) -> int:
        """Bytes delivered to the upstream so far (client to upstream, after the addons'
        changes)."""

    @property
    def bytes_down(self) -> int:
        """Bytes delivered to the client so far (upstream to client, after the addons'
        changes)."""

    @property
    def reason(self) -> str | None:
        """Why the session closed, one of the session log's close reasons ("closed",
        "client_reset", "addon_error", ...); None until `session_end`."""

    @property
    def state(self) -> dict[str, Any]:
        """The session's data for its addons, empty at first; the proxy never reads it. One
        dict per session, shared by all of its addons: key yours by something of your own
        (your addon's name)."""

    def claim(self) -> None:
        """Ask for this session's bytes: this addon's `client_data`, `server_data`,
        `client_eof` and `server_eof` are called for it (other addons' only if they claim it
        too). Only in `session_start` (elsewhere: RuntimeError); a session no addon claims
        relays on the zero-copy path and costs its addons nothing per byte."""

    def send_to_client(self, data: bytes) -> None:
        """Queue `data` for the client, after what is already queued (claimed sessions). From
        `session_start` it is sent first, once the upstream is connected; from a byte hook,
        before what that hook returns.

        Args:
            data: the bytes, sent as they are (not passed to `server_data`).

        Raises:
            RuntimeError: the session is not claimed, has ended, or the client has been sent
                its FIN.
        """

    def send_to_upstream(self, data: bytes) -> None:
        """Queue `data` for the upstream, after what is already queued (claimed sessions);
        as `send_to_client`.

        Args:
            data: the bytes, sent as they are (not passed to `client_data`).

        Raises:
            RuntimeError: the session is not claimed, has ended, or the upstream has been sent
                its FIN.
        """

    def close(self) -> None:
        """End a relaying session gracefully: nothing more is read, what is queued (and what the
        calling hook returns) is sent, then a FIN to both sides; what they still send is read
        and dropped (close reason `addon_close`). Does nothing once the session has ended.

        Raises:
            RuntimeError: in `session_start` (return `reset()` to refuse a session).
        """

    def reset(self) -> None:
        """End the session at once, claimed or not: a TCP reset to both sides, what is queued
        dropped (close reason `addon_reset`); in `session_start`, a `reset()` verdict that wins
        over any other addon's verdict. Does nothing once the session has ended."""


@dataclass(frozen=True, slots=True)
class NegotiatedTLS:
    """What one of an intercepted session's two TLS connections negotiated.

    Args:
        version: "TLSv1.3" or "TLSv1.2".
        cipher: the cipher suite's OpenSSL name ("TLS_AES_256_GCM_SHA384").
        alpn: the application protocol chosen ("h2", "http/1.1"); None without ALPN. Both
            connections carry the same: the client is offered what the upstream chose.
    """

    version: str
    cipher: str
    alpn: str | None


@dataclass(frozen=True, slots=True)
class InterceptedTLS:
    """`session.tls`: an intercepted session's TLS.

    Args:
        client: the client's connection with tproxy (None until its handshake is done).
        upstream: tproxy's connection with the upstream (None until its handshake is done).
        upstream_subject: the upstream certificate's subject (RFC 4514); None without one.
        upstream_issuer: its issuer.
        upstream_verified: the upstream's certificate was verified (False where the rule says
            `upstream_verify = false`).
        failure: why a handshake (or the TLS after it) failed, as the close event's leg
            `error` says it; None when nothing failed.
    """

    client: NegotiatedTLS | None
    upstream: NegotiatedTLS | None
    upstream_subject: str | None
    upstream_issuer: str | None
    upstream_verified: bool
    failure: str | None

    @property
    def intercepted(self) -> bool:
        """Both handshakes were done: the session was (or is being) decrypted."""
        return self.client is not None and self.upstream is not None


@dataclass(frozen=True, slots=True)
class Verdict:
    """What `session_start` may return instead of None: the same actions a policy rule has.
    Make one with `allow()`, `reset()`, `redirect(...)` or `via(...)`.

    Args:
        action: what to do with the session.
        to: where `redirect` connects instead of the original destination.
        via: the upstream proxy `via` connects through.
        remote_name: `via` asks the upstream proxy for the sniffed name (the SNI or Host), not
            the original destination's IP.

    Raises:
        ValueError: `to` without `redirect` (or `redirect` without `to`), and the same for
            `via`; `remote_name` without `via`.
    """

    action: Action
    to: HostPort | None = None
    via: UpstreamProxy | None = None
    remote_name: bool = False

    def __post_init__(self) -> None:
        if (self.action is Action.REDIRECT) != (self.to is not None):
            raise ValueError("a redirect verdict needs `to`, and only a redirect has one")
        if (self.action is Action.VIA) != (self.via is not None):
            raise ValueError("a via verdict needs `via`, and only a via verdict has one")
        if self.remote_name and self.action is not Action.VIA:
            raise ValueError("remote_name is only for a via verdict")

    def __str__(self) -> str:
        if self.to is not None:
            return f"redirect to {self.to}"
        if self.via is not None:
            return f"via {self.via}" + (" (remote name)" if self.remote_name else "")
        return self.action.value


_ALLOW = Verdict(Action.ALLOW)
_RESET = Verdict(Action.RESET)


def allow() -> Verdict:
    """Connect to the original destination (overriding a policy that would not)."""
    return _ALLOW


def reset() -> Verdict:
    """Reset the client; nothing connects upstream (close reason `policy_reset`, the close
    event's `rule` `addon:NAME`)."""
    return _RESET


def _text(verb: str, value: object, form: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{verb}() takes a {form} string, not {type(value).__name__}")
    return value


def redirect(target: str) -> Verdict:
    """Connect to `target` instead of the original destination.

    Args:
        target: "HOST:PORT" or "[IPv6]:PORT", as a policy's `to`; HOST an IP or a name (the
            engine takes IP literals only for now: a name is an addon error).

    Raises:
        ValueError: `target` is not of that form, or its port is off.
        TypeError: `target` is not a string.
    """
    text = _text("redirect", target, '"HOST:PORT"')
    try:
        return Verdict(Action.REDIRECT, to=parse_host_port(text))
    except ConfigError as exc:
        raise ValueError(f"redirect: {exc}") from None


def via(url: str, *, remote_name: bool = False) -> Verdict:
    """Connect through an upstream proxy, asking it for the original destination.

    Args:
        url: "socks5://[user:pass@]HOST:PORT" or "http://[user:pass@]HOST:PORT" (HTTP CONNECT),
            as a policy's `via`.
        remote_name: ask the proxy for the sniffed name (the SNI or Host; the IP when none).

    Raises:
        ValueError: another scheme, not of that form, or credentials the scheme cannot carry
            (SOCKS5: over 255 bytes; HTTP: a colon in the username).
        TypeError: `url` is not a string.
    """
    text = _text("via", url, '"socks5://HOST:PORT" or "http://HOST:PORT"')
    try:
        proxy = parse_upstream_proxy(text)
        # As the policy's loader does: credentials the protocol cannot carry would fail later.
        handshake_for(proxy, "192.0.2.1", 80)
    except ValueError as exc:  # ConfigError is one
        raise ValueError(f"via: {exc}") from None
    return Verdict(Action.VIA, via=proxy, remote_name=remote_name)
