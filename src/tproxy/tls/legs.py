"""The two TLS legs of an intercepted session, without I/O: ciphertext in and out, plaintext in
and out, a handshake that completes or fails with a reason; never an exception for what a peer
sends.

Theory of operation
-------------------
An intercepted session has two TLS connections. Toward the client, tproxy is the TLS server
(`ClientLeg`), presenting a leaf forged for the client's SNI. Toward the upstream, tproxy is the
TLS client (`UpstreamLeg`), offering the client's SNI and the HTTP protocols of its ALPN list
(`contexts.usable_alpn`) and verifying the upstream's certificate. Each leg is an `ssl.SSLObject`
over two `ssl.MemoryBIO`s (what `asyncio`'s own TLS transport does): the engine moves bytes
between the sockets and the BIOs, and the leg says what happened. The order the engine follows:

1. the ClientHello is sniffed (SNI, ALPN) and held, as for any sniffed session;
2. `open_upstream_leg` -> `data_to_send()` is our ClientHello; the upstream's answers go into
   `receive()` until `state` is ESTABLISHED (`info`: the ALPN it chose, its certificate) or
   FAILED (`failure.reason`: `upstream_cert_invalid`, `upstream_wants_client_cert` or
   `upstream_tls_failed`);
3. the leaf is forged (`LeafForger.leaf_for` with `info.peer_cert_der` read by
   `read_upstream_cert`), `open_client_leg` with its context offering exactly the ALPN the upstream
   chose, and the held ClientHello goes into `receive()`, then the client's bytes, until
   ESTABLISHED or FAILED (`client_rejected_certificate(failure)` says whether the client refused
   our certificate, for `passthrough_on_client_reject`);
4. relay: `plaintext = leg.receive(ciphertext)` on one side, `other.send(plaintext)` and
   `other.data_to_send()` to its socket -- and `leg.data_to_send()` too, after every `receive`:
   reading may answer the peer (a TLS 1.3 KeyUpdate, an alert). A leg whose peer sent
   close_notify has `peer_closed`: the engine `close()`s the other leg (our close_notify, then
   its FIN), as it would forward a FIN; one whose peer closed without it is also `truncated` and
   can send no more (`can_send`), which the engine handles as a reset of that side.

`send()` before the handshake is done keeps the plaintext until it is (an upstream that speaks
first, like an SMTPS banner, while the client's handshake is still going on).

Alerts, EOF and failures. OpenSSL names an alert it *received* in its error reason
(`TLSV1_ALERT_UNKNOWN_CA`); an alert it *sends* is its own error (`CERTIFICATE_VERIFY_FAILED`).
`TLSFailure.alert` holds the received one, by its RFC 8446 name. A TCP FIN or RST is
`receive_eof()`: during a handshake it fails the leg (`peer_eof`); afterwards it is the end of
the stream without close_notify, which HTTP/1.0-style servers do all the time: `peer_closed`
with `truncated` set, not a failure (as browsers treat it).

What the stdlib does not say, observed. Whether our certificate went out before a client gave up,
and whether an upstream asked for a client certificate, are handshake messages the `ssl` module
does not report; both are seen through `SSLContext._msg_callback` (private but present since
Python 3.8, used by the stdlib's own tests), which the contexts carry during handshakes only (see
`contexts`). An upstream asking for a certificate fails the leg once our handshake is done, before
the upstream would refuse our empty one (TLS 1.3 refuses only then, with alert 116
certificate_required; TLS 1.2 during the handshake with a handshake_failure alert
indistinguishable from others, which the order of the messages before it tells apart). Only an
upstream that authenticated itself first is believed (`UpstreamLeg`: anything else fails closed).
Without the private API (a future Python), alert 116 after the handshake is still recognized.

Renegotiation is refused on both legs (`OP_NO_RENEGOTIATION`: OpenSSL answers a TLS 1.2 client's
renegotiating ClientHello, or a server's HelloRequest, with a no_renegotiation warning alert and
goes on; TLS 1.3 has no renegotiation).

Measured (this machine: 2 cores, Python 3.11.7, OpenSSL 3.0.19, P-256 certificates, X25519;
CPU time spent inside the legs' calls over memory BIOs, medians of 500, peers not counted):

    leg                                    TLS 1.3    TLS 1.2
    upstream leg, whole handshake          0.53 ms    0.58 ms   (0.50 ms without verification;
                                                               building our ClientHello 0.035 ms)
    client leg, whole handshake            0.26 ms    0.22 ms
    leaf for a name seen before + context  0.014 ms             (`read_upstream_cert`, remembered
                                                               by DER, `leaf_for`, the lookup)
    leaf for a new name + new context      0.9 ms               (0.07 ms signing, the rest OpenSSL
                                                               loading the PEM key and leaf)

So an intercepted connection costs about 0.8 ms of CPU in TLS when its name was seen before, and
about 1.7 ms the first time: about 1,200 new intercepted connections per second per core before
any relaying. A new upstream context (a new ALPN list) loads the system's trust store: 16 ms,
once. (Measured with the `intercept` steps of `tests/unit/test_tls_legs.py`, timing the legs'
calls only; `test_handshakes_are_cheap_enough_for_the_event_loop` guards the order of magnitude.)
"""

from __future__ import annotations

import enum
import ipaddress
import re
import ssl
from dataclasses import dataclass
from functools import lru_cache

from cryptography import x509

from tproxy.core.endpoint import IPAddress
from tproxy.tls.names import NameRejected, parse_server_name

# Handshake message types (RFC 8446 section 4) and the content type the observer reports them as.
_HANDSHAKE = 22
_CERTIFICATE = 11
_CERTIFICATE_REQUEST = 13
_READ_SIZE = 1 << 16
_MAX_DETAIL_CHARS = 200

CERTIFICATE_ALERTS = frozenset(
    {
        "bad_certificate",  # 42
        "unsupported_certificate",  # 43
        "certificate_revoked",  # 44
        "certificate_expired",  # 45
        "certificate_unknown",  # 46
        "unknown_ca",  # 48
    }
)
"""Alerts by which a client says it refuses the certificate it was shown (RFC 8446 6.2)."""

_ALERT_REASON = re.compile(r"(?:SSLV3|TLSV1|TLSV13)_ALERT_([A-Z_]+)")


class LegState(enum.Enum):
    """Where a leg is: handshaking, established (relaying), closed (the peer's close_notify or
    EOF came: nothing more from it; we may still send, see `TLSLeg.can_send`), or failed
    (`TLSFailure`)."""

    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    CLOSED = "closed"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TLSFailure:
    """Why a leg failed.

    Args:
        reason: the session's close reason: `upstream_cert_invalid`,
            `upstream_wants_client_cert`, `upstream_tls_failed` (upstream leg),
            `client_tls_failed` (client leg).
        detail: one line for the log: OpenSSL's words or the verification error; escaped (the
            peer may have chosen the names in it) and at most 200 characters.
        alert: the TLS alert the peer sent, by its RFC name (`unknown_ca`), if one did.
        in_handshake: the failure came before the handshake was done.
        peer_eof: the peer closed or reset the connection (`receive_eof`) instead.
        certificate_sent: (client leg) our certificate had gone out to the client.
    """

    reason: str
    detail: str
    alert: str | None = None
    in_handshake: bool = True
    peer_eof: bool = False
    certificate_sent: bool = False


@dataclass(frozen=True, slots=True)
class TLSInfo:
    """What a leg's handshake negotiated, for the close event and for forging.

    Args:
        version: "TLSv1.3", "TLSv1.2".
        cipher: the cipher suite's OpenSSL name.
        alpn: the protocol chosen, None without ALPN.
        peer_cert_der: the peer's certificate (upstream leg), DER; None for the client leg.
        verified: the peer's certificate was verified (upstream leg with `upstream_verify`).
        resumed: the session was resumed (no certificate was exchanged).
    """

    version: str
    cipher: str
    alpn: str | None
    peer_cert_der: bytes | None = None
    verified: bool = False
    resumed: bool = False

    @property
    def peer_subject(self) -> str | None:
        """The peer certificate's subject, RFC 4514, escaped and bounded (None without one)."""
        return None if self.peer_cert_der is None else certificate_names(self.peer_cert_der)[0]

    @property
    def peer_issuer(self) -> str | None:
        """The peer certificate's issuer, RFC 4514, escaped and bounded."""
        return None if self.peer_cert_der is None else certificate_names(self.peer_cert_der)[1]


def bounded(text: str) -> str:
    """Text a peer may have chosen, for one log line: non-ASCII and control characters escaped
    as Python does (`ascii`), at most 200 characters."""
    escaped = ascii(text)[1:-1]
    if len(escaped) > _MAX_DETAIL_CHARS:
        return escaped[: _MAX_DETAIL_CHARS - 3] + "..."
    return escaped


@lru_cache(maxsize=256)
def certificate_names(der: bytes) -> tuple[str, str]:
    """(subject, issuer) of a DER certificate, RFC 4514, `bounded`; remembered (an upstream
    presents the same certificate to every session)."""
    try:
        cert = x509.load_der_x509_certificate(der)
        return bounded(cert.subject.rfc4514_string()), bounded(cert.issuer.rfc4514_string())
    except Exception as exc:  # the bytes come from the network (see forge.read_upstream_cert)
        what = bounded(f"unreadable ({type(exc).__name__})")
        return what, what


def alert_of(error: BaseException) -> str | None:
    """The alert a peer sent, by its RFC name, from an `ssl.SSLError` (None: not an alert)."""
    reason = getattr(error, "reason", None)
    if not isinstance(reason, str):
        return None
    match = _ALERT_REASON.fullmatch(reason)
    if match is None:
        return None
    name = match[1].lower()
    # OpenSSL's names that differ from the RFC's.
    return {"certificate_required": "certificate_required"}.get(name, name)


def client_rejected_certificate(failure: TLSFailure) -> str | None:
    """Whether a client leg's failure means the client refused our certificate (pinning, a CA
    it does not trust), and so why; None when it says nothing of the kind.

    Pure. Yes for a certificate alert (`CERTIFICATE_ALERTS`: what OpenSSL, NSS and Java clients
    send for an untrusted CA), and for a client that closed or reset the connection during the
    handshake after our certificate had gone out (what many pinning clients and Schannel do
    instead of an alert). A client that closes right after a completed handshake, before sending
    anything, is not counted: browsers do that with speculative connections they end up not
    using, and a pinning check done after the handshake looks the same; counting it would pass
    such names through for no reason.
    """
    if failure.reason != "client_tls_failed":
        return None
    if failure.alert in CERTIFICATE_ALERTS:
        return f"the client sent alert {failure.alert}"
    if failure.in_handshake and failure.peer_eof and failure.certificate_sent:
        return "the client closed the connection after our certificate"
    return None


class ObservedSSLObject(ssl.SSLObject):
    """An `SSLObject` that remembers the handshake messages `observe_handshake` saw.

    `certificate_sent`: our Certificate went out (client leg). `certificate_received`: the
    peer's Certificate came in. `certificate_requested`: a CertificateRequest came in;
    `requested_after_certificate`: one came after the peer's Certificate (TLS 1.2's order, see
    `UpstreamLeg`)."""

    certificate_sent = False
    certificate_received = False
    certificate_requested = False
    requested_after_certificate = False


def observe_handshake(  # noqa: PLR0917 -- OpenSSL's message callback, called positionally
    conn: object, direction: str, version: object, content_type: int, msg_type: int, data: bytes
) -> None:
    """The contexts' `_msg_callback` during handshakes: notes our Certificate going out, the
    peer's Certificate and a CertificateRequest coming in (and in which order). OpenSSL calls it
    for a message it reads only once the message is allowed where it stands (an out-of-order one
    fails the handshake first), before processing it. Must never raise (OpenSSL would report it
    from the next call)."""
    if content_type != _HANDSHAKE or not isinstance(conn, ObservedSSLObject):
        return
    if msg_type == _CERTIFICATE:
        if direction == "write":
            conn.certificate_sent = True
        elif direction == "read":
            conn.certificate_received = True
    elif msg_type == _CERTIFICATE_REQUEST and direction == "read":
        conn.certificate_requested = True
        if conn.certificate_received:
            conn.requested_after_certificate = True


class TLSLeg:
    """One TLS connection over memory BIOs (see the module docstring). Use `open_upstream_leg`
    or `open_client_leg`."""

    __slots__ = (
        "_established_context",
        "_in",
        "_obj",
        "_out",
        "_pending",
        "failure",
        "info",
        "peer_closed",
        "sent_close",
        "state",
        "truncated",
    )

    side = ""  # "client" or "upstream": whom this leg talks to

    def __init__(
        self, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
        established_context: ssl.SSLContext | None,
    ) -> None:  # fmt: skip
        self._obj = obj
        self._in = incoming
        self._out = outgoing
        self._established_context = established_context
        self._pending: list[bytes] = []  # plaintext sent before the handshake was done
        self.state = LegState.HANDSHAKING
        self.failure: TLSFailure | None = None
        self.info: TLSInfo | None = None
        self.peer_closed = False  # the peer's close_notify (or EOF: `truncated`) came
        self.truncated = False  # the peer's EOF came without close_notify
        self.sent_close = False  # our close_notify is out (`close`)

    # --- bytes from the peer -----------------------------------------------------------------

    def receive(self, ciphertext: bytes) -> bytes:
        """Take bytes the peer sent; return the plaintext they completed (b"" when none).

        Afterwards `state` may have changed (handshake done or failed, peer closed), and
        `data_to_send()` may hold an answer. Never raises; bytes after a failure are ignored.
        """
        if self.state is LegState.FAILED or self.peer_closed:
            return b""
        if ciphertext:
            self._in.write(ciphertext)
        return self._advance()

    def receive_eof(self) -> bytes:
        """The peer closed (FIN) or reset the connection: fails a handshake (`peer_eof`), ends
        an established stream (`peer_closed`, `truncated` without its close_notify). Returns
        plaintext still buffered (none, in practice)."""
        if self.state is LegState.FAILED or self.peer_closed:
            return b""
        self._in.write_eof()
        data = self._advance()
        if self.state is LegState.HANDSHAKING:  # the EOF did not fail it: do it here
            self._fail(None, "the peer closed the connection during the handshake", eof=True)
        elif not self.peer_closed and self.failure is None:
            self.peer_closed = self.truncated = True
            self.state = LegState.CLOSED
        return data

    def _advance(self) -> bytes:
        if self.state is LegState.HANDSHAKING:
            try:
                self._obj.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            except (OSError, ValueError) as exc:  # SSLError is an OSError
                self._fail(exc, None, eof=self._in.eof)
                return b""
            self._established()
        return self._read()

    def _read(self) -> bytes:
        chunks = []
        while True:
            try:
                chunk = self._obj.read(_READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:  # close_notify
                self._peer_closed(truncated=False)
                break
            except ssl.SSLEOFError:  # EOF without close_notify
                self._peer_closed(truncated=True)
                break
            except (OSError, ValueError) as exc:
                self._fail(exc, None, eof=self._in.eof)
                break
            if not chunk:  # close_notify, as SSLObject reports it
                self._peer_closed(truncated=False)
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _peer_closed(self, *, truncated: bool) -> None:
        self.peer_closed = True
        self.truncated = truncated
        self.state = LegState.CLOSED

    # --- plaintext to the peer ----------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        """Whether `send` still reaches the peer: not after a failure, our close_notify, or the
        peer's EOF without close_notify (OpenSSL treats that as fatal to the connection, so the
        engine ends the other direction too, as for a reset). After the peer's close_notify it
        does: TLS 1.3 lets each side close its own direction."""
        return self.failure is None and not self.sent_close and not self.truncated

    def send(self, plaintext: bytes) -> None:
        """Encrypt `plaintext` for the peer (kept until the handshake is done); dropped when
        `can_send` is False."""
        if not plaintext or not self.can_send:
            return
        if self.state is LegState.HANDSHAKING:
            self._pending.append(plaintext)
            return
        self._write(plaintext)

    def _write(self, plaintext: bytes) -> None:
        view = memoryview(plaintext)
        try:
            while view:
                view = view[self._obj.write(view) :]
        except (OSError, ValueError) as exc:
            self._fail(exc, None, eof=False)

    def data_to_send(self) -> bytes:
        """The ciphertext to write to the peer's socket now (b"" when none)."""
        return self._out.read() if self._out.pending else b""

    def close(self) -> None:
        """Send our close_notify (`data_to_send()` holds it); the peer may still send until its
        own close_notify. Idempotent; nothing after a failure."""
        if self.sent_close or self.state is LegState.FAILED:
            return
        self.sent_close = True
        if self.truncated:
            return  # the connection is over for OpenSSL: nothing can be sent
        if self.state is LegState.HANDSHAKING:
            return  # nothing to close cleanly: the engine closes the socket
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the peer's close_notify is not awaited
        except (OSError, ValueError):
            pass  # the connection is going away anyway

    # --- outcomes ------------------------------------------------------------------------------

    @property
    def handshake_done(self) -> bool:
        return self.info is not None

    def _established(self) -> None:
        obj = self._obj
        cipher = obj.cipher()
        der = obj.getpeercert(binary_form=True)
        self.info = TLSInfo(
            version=obj.version() or "",
            cipher=cipher[0] if cipher else "",
            alpn=obj.selected_alpn_protocol(),
            peer_cert_der=der,
            verified=obj.context.verify_mode == ssl.CERT_REQUIRED and der is not None,
            resumed=obj.session_reused,
        )
        self.state = LegState.ESTABLISHED
        failure = self._check_established()
        if failure is not None:
            self.state = LegState.FAILED
            self.failure = failure
            return
        if self._established_context is not None:
            # Moves the connection off the observer (see `contexts`); after what it told us.
            obj.context = self._established_context
        pending, self._pending = self._pending, []
        for plaintext in pending:
            self._write(plaintext)

    def _check_established(self) -> TLSFailure | None:
        return None

    def _fail(self, exc: BaseException | None, detail: str | None, *, eof: bool) -> None:
        alert = alert_of(exc) if exc is not None else None
        if detail is None:
            detail = _describe(exc)
        self.failure = self._classify(exc, bounded(detail), alert, eof)
        self.state = LegState.FAILED
        self._pending = []

    def _classify(
        self, exc: BaseException | None, detail: str, alert: str | None, eof: bool
    ) -> TLSFailure:
        raise NotImplementedError


def _describe(exc: BaseException | None) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.verify_message} (verify code {exc.verify_code})"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"{exc.reason}: {exc.strerror or exc}"
    return str(exc) or type(exc).__name__


class UpstreamLeg(TLSLeg):
    """Our TLS connection to the upstream (we are the TLS client).

    Telling `upstream_wants_client_cert`. That reason makes the name pass through, for every
    client, for an hour (`passthrough`), so it is believed only from an upstream that has proved
    it holds the key of a certificate we verified; anything else fails closed as
    `upstream_tls_failed`. An alert or a CertificateRequest costs nothing to send: a server at
    any address the client chose, or anyone on the path, can send one before authenticating
    anything. So it is the upstream asking for a certificate only:

    * after our handshake is done (the upstream's Certificate, CertificateVerify and Finished
      checked): a CertificateRequest seen during it (`_check_established`), or alert 116
      certificate_required (TLS 1.3, where the upstream refuses our empty certificate only
      then; also what is left without the observer);
    * during the handshake, a CertificateRequest that came after the upstream's Certificate
      (TLS 1.2: Certificate, ServerKeyExchange, CertificateRequest, then it refuses our empty
      certificate with a handshake_failure alert). By then OpenSSL has verified the certificate
      and the ServerKeyExchange signed with its key over both hellos' randoms: the key's holder
      is there. This needs a key exchange that is signed, so the upstream contexts offer TLS 1.2
      ECDHE suites only (`contexts`). In theory the CertificateRequest itself is not signed
      (only the Finished covers it, which never comes), so someone on the path between tproxy
      and a TLS 1.2-only upstream can still insert one; in practice they cannot make a TLS
      1.3-capable upstream speak TLS 1.2 (the signed server random carries the downgrade
      sentinel of RFC 8446 section 4.1.3), and they could stop that session anyway.

    Never without verification (`upstream_verify = false`): the upstream then proved nothing.
    """

    __slots__ = ("_handshake_context",)
    side = "upstream"

    def __init__(
        self, obj: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO,
        established_context: ssl.SSLContext | None,
    ) -> None:  # fmt: skip
        super().__init__(obj, incoming, outgoing, established_context)
        self._handshake_context = obj.context

    def session_to_resume(self) -> ssl.SSLSession | None:
        """The session a later leg to the same place may offer (`tls.resumption`): once the
        handshake is done and the server gave something to resume with (a TLS 1.2 session id
        or ticket at once, a TLS 1.3 ticket once it arrived); None otherwise, and after a
        failure. It is fetched as belonging to the handshake's context, which a later leg is
        made from (`ssl` refuses a session of another context)."""
        obj = self._obj
        if self.state is not LegState.ESTABLISHED and self.state is not LegState.CLOSED:
            return None
        if self.failure is not None or self.truncated:
            return None
        moved = obj.context is not self._handshake_context
        try:
            if moved:
                obj.context = self._handshake_context
            session = obj.session
        except (OSError, ValueError):
            return None
        finally:
            if moved and self._established_context is not None:
                obj.context = self._established_context
        if session is None or not (session.has_ticket or session.id):
            return None
        return session

    def _classify(
        self, exc: BaseException | None, detail: str, alert: str | None, eof: bool
    ) -> TLSFailure:
        in_handshake = self.info is None
        if isinstance(exc, ssl.SSLCertVerificationError):
            reason = "upstream_cert_invalid"
        elif self._verifies() and (
            (alert == "certificate_required" and not in_handshake)
            or (in_handshake and _requested_after_certificate(self._obj))
        ):
            reason = "upstream_wants_client_cert"
            detail = _WANTS_CLIENT_CERT
        else:
            reason = "upstream_tls_failed"
        return TLSFailure(reason, detail, alert, in_handshake, eof)

    def _check_established(self) -> TLSFailure | None:
        if _requested(self._obj):
            # TLS 1.3: the upstream refuses our empty certificate only after our side of the
            # handshake is done; it asked, so it will.
            if self._verifies():
                return TLSFailure("upstream_wants_client_cert", _WANTS_CLIENT_CERT)
            return TLSFailure(
                "upstream_tls_failed",
                "the upstream (not verified) asks for a client certificate",
            )
        return None

    def _verifies(self) -> bool:
        if self.info is not None:  # the connection may have moved to `established` since
            return self.info.verified
        return self._obj.context.verify_mode == ssl.CERT_REQUIRED


class ClientLeg(TLSLeg):
    """Our TLS connection to the client (we are the TLS server, with a forged leaf)."""

    __slots__ = ()
    side = "client"

    def _classify(
        self, exc: BaseException | None, detail: str, alert: str | None, eof: bool
    ) -> TLSFailure:
        sent = isinstance(self._obj, ObservedSSLObject) and self._obj.certificate_sent
        return TLSFailure("client_tls_failed", detail, alert, self.info is None, eof, sent)


_WANTS_CLIENT_CERT = "the upstream asks for a client certificate, which tproxy cannot present"


def _requested(obj: ssl.SSLObject) -> bool:
    return isinstance(obj, ObservedSSLObject) and obj.certificate_requested


def _requested_after_certificate(obj: ssl.SSLObject) -> bool:
    return isinstance(obj, ObservedSSLObject) and obj.requested_after_certificate


def verify_name(sni: str | None, destination: IPAddress | str) -> str | TLSFailure:
    """The name the upstream's certificate is verified for (and the SNI sent, when it is not
    an IP address): the client's SNI, or without one the original destination's IP address (an
    IPv4-mapped IPv6 address as the IPv4 address it is)."""
    if sni is not None:
        name = parse_server_name(sni)
        if isinstance(name, NameRejected):
            return TLSFailure("upstream_tls_failed", bounded(name.reason))
        return str(name)
    try:
        ip = ipaddress.ip_address(destination)
    except ValueError:
        return TLSFailure(
            "upstream_tls_failed", f"no SNI and no IP address: {bounded(str(destination))}"
        )
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def open_upstream_leg(
    context: ssl.SSLContext,
    sni: str | None,
    destination: IPAddress | str,
    *,
    established_context: ssl.SSLContext | None = None,
    session: ssl.SSLSession | None = None,
) -> UpstreamLeg | TLSFailure:
    """Start our TLS connection to the upstream: `data_to_send()` then holds our ClientHello.

    Args:
        context: from `UpstreamContexts.get(verify, usable_alpn(client's ALPN))`.
        sni: the client's SNI as sniffed (sent on, and verified), or None.
        destination: the original destination's IP: verified when there is no SNI.
        established_context: `UpstreamContexts.established`, where the connection moves once
            its handshake is done (None: it stays on `context`).
        session: a session of an earlier leg to the same place, to resume (`tls.resumption`);
            one `ssl` refuses (made on another context) is not offered.

    Returns:
        The leg, or the failure when the SNI cannot be sent (not a host name).
    """
    name = verify_name(sni, destination)
    if isinstance(name, TLSFailure):
        return name
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    try:
        try:
            obj = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=name,
                                   session=session)  # fmt: skip
        except ValueError:
            if session is None:
                raise
            # "Session refers to a different SSLContext": the context was made again since.
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            obj = context.wrap_bio(incoming, outgoing, server_side=False, server_hostname=name)
    except (OSError, ValueError, UnicodeError) as exc:
        return TLSFailure("upstream_tls_failed", bounded(f"cannot start TLS for {name}: {exc}"))
    leg = UpstreamLeg(obj, incoming, outgoing, established_context)
    leg._advance()  # our ClientHello
    return leg


def open_client_leg(
    context: ssl.SSLContext, *, established_context: ssl.SSLContext | None = None
) -> ClientLeg:
    """Start our TLS connection to the client; `receive()` the held ClientHello next.

    Args:
        context: from `LeafContexts.get(leaf, upstream_leg.info.alpn)`.
        established_context: `LeafContexts.established` (see `open_upstream_leg`).
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side=True)
    return ClientLeg(obj, incoming, outgoing, established_context)
