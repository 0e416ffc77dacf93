"""Why a session closed: the `reason` of every `session_close` event, in one place.

`docs/events.md` lists each reason with what the client and the upstream saw; a unit test keeps
that table and this enum the same. Reasons are strings in the log (a `StrEnum` compares and
prints as its value), never renamed once shipped: scripts match on them. A reason defined before
any session ends with it is in `NOT_EMITTED_YET` (and still planned in the doc).
"""

from __future__ import annotations

import enum


class CloseReason(enum.StrEnum):
    # The relay ended (tproxy.core.lifecycle decides which).
    CLOSED = "closed"  # both sides sent FIN: a clean close
    CLIENT_RESET = "client_reset"  # the client reset (or vanished); the upstream is reset too
    UPSTREAM_RESET = "upstream_reset"  # the upstream reset; the client is reset too
    # The upstream connect failed: the client is reset.
    UPSTREAM_REFUSED = "upstream_refused"
    UPSTREAM_UNREACHABLE = "upstream_unreachable"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_FAILED = "upstream_failed"  # any other connect error (its errno is logged)
    OUT_OF_DESCRIPTORS = "out_of_descriptors"  # no descriptor for the upstream socket
    # Refused before connecting: the client is reset.
    NO_ORIGINAL_DESTINATION = "no_original_destination"  # REDIRECT without a conntrack entry
    LOOP_REFUSED = "loop_refused"  # the destination is this proxy's own listener
    # The policy (`tproxy.policy`): the client is reset, nothing connects upstream.
    POLICY_RESET = "policy_reset"  # a rule's action (or the default), or an addon, said `reset`
    # A `via` rule's upstream proxy: the client is reset.
    UPSTREAM_PROXY_REFUSED = "upstream_proxy_refused"  # it answered no (its answer is logged)
    UPSTREAM_PROXY_FAILED = "upstream_proxy_failed"  # unreachable, silent, or spoke nonsense
    # Cut by the proxy: both sides are reset.
    IDLE_TIMEOUT = "idle_timeout"
    HALF_CLOSED_TIMEOUT = "half_closed_timeout"
    DRAIN_TIMEOUT = "drain_timeout"  # still live when the drain after SIGTERM/SIGINT ended
    SECOND_SIGNAL = "second_signal"  # a second SIGTERM/SIGINT during the drain
    ERROR = "error"  # an unexpected error in this session (a `session_error` event says which)
    # An addon's hook raised, returned nonsense or (async) took too long: both sides are reset.
    ADDON_ERROR = "addon_error"  # `session_error` names the addon and the hook
    # A claimed session ended by its addon (`session.close()`, `session.reset()`).
    ADDON_CLOSE = "addon_close"  # what was queued was sent, then a FIN both ways
    ADDON_RESET = "addon_reset"  # both sides reset
    KILLED = "killed"  # `tproxy kill ID`: both sides reset
    # An intercepted TLS session (`tls = "intercept"`): a handshake failed (or took longer than
    # --tls-handshake-timeout); both sides are reset. The detail is in the close event's
    # `client_tls` / `upstream_tls`.
    CLIENT_TLS_FAILED = "client_tls_failed"  # e.g. the client does not trust our CA
    UPSTREAM_TLS_FAILED = "upstream_tls_failed"
    UPSTREAM_CERT_INVALID = "upstream_cert_invalid"  # its certificate did not verify
    UPSTREAM_WANTS_CLIENT_CERT = "upstream_wants_client_cert"  # cannot be intercepted


NOT_EMITTED_YET: frozenset[CloseReason] = frozenset()
"""Reasons the code defines before any session ends with them: docs/events.md lists them as
planned until then (the doc's test checks both)."""
