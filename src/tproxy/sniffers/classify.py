"""Classify a session from its client's first bytes: which protocol, and its facts.

Every sniffer looks at the same accumulated bytes; the first that recognises them wins (TLS,
then HTTP/1, then SSH: their first bytes cannot be mistaken for one another's). While any of them
still answers "need more", so does `classify`; when none can be it any more, the session is
`unknown`. A session whose client sends nothing before the upstream answers or the sniff timeout
ends is `silent` -- the engine knows that, not the bytes, so it is not decided here.
"""

from __future__ import annotations

from dataclasses import dataclass

from tproxy.sniffers.facts import (
    NEED_MORE,
    HttpRequest,
    NeedMore,
    NotThis,
    SshBanner,
    TlsHello,
)
from tproxy.sniffers.http import sniff_http
from tproxy.sniffers.ssh import sniff_ssh
from tproxy.sniffers.tls import sniff_tls

Facts = TlsHello | HttpRequest | SshBanner
SniffedFields = tuple[
    str | None, str | None, list[str] | None, str | None, bool | None, str | None, str | None
]


@dataclass(frozen=True, slots=True)
class Sniffed:
    """What a session is: `proto` (`tls`, `http`, `ssh`, `unknown`, `silent`) and the facts of
    its protocol (None for `unknown` and `silent`)."""

    proto: str
    facts: Facts | None = None

    def event_fields(self) -> SniffedFields:
        """The `session_close` fields (docs/events.md): proto, sni, alpn, tls_offered, ech,
        http_host, http_method; None where the protocol has no such fact."""
        facts = self.facts
        if isinstance(facts, TlsHello):
            return (self.proto, facts.sni, list(facts.alpn), facts.offered_version, facts.ech,
                    None, None)  # fmt: skip
        if isinstance(facts, HttpRequest):
            return (self.proto, None, None, None, None, facts.host, facts.method)
        return (self.proto, None, None, None, None, None, None)

    # The facts one by one, as addons read them (`tproxy.addons.api.Session.sniffed`); None
    # where the protocol has no such fact. Not used on the relay's path (`event_fields` is).

    @property
    def sni(self) -> str | None:
        """The TLS server name (`TlsHello.sni`)."""
        return self.facts.sni if isinstance(self.facts, TlsHello) else None

    @property
    def alpn(self) -> tuple[str, ...] | None:
        """The offered ALPN protocol names, in the client's order (`TlsHello.alpn`)."""
        return self.facts.alpn if isinstance(self.facts, TlsHello) else None

    @property
    def tls_offered(self) -> str | None:
        """The highest TLS version offered, e.g. "1.3" (`TlsHello.offered_version`)."""
        return self.facts.offered_version if isinstance(self.facts, TlsHello) else None

    @property
    def ech(self) -> bool | None:
        """The ClientHello carries the ECH extension, real or GREASE (`TlsHello.ech`)."""
        return self.facts.ech if isinstance(self.facts, TlsHello) else None

    @property
    def http_host(self) -> str | None:
        """The first HTTP/1 request's Host, port stripped (`HttpRequest.host`)."""
        return self.facts.host if isinstance(self.facts, HttpRequest) else None

    @property
    def http_method(self) -> str | None:
        """The first HTTP/1 request's method (`HttpRequest.method`)."""
        return self.facts.method if isinstance(self.facts, HttpRequest) else None


UNKNOWN = Sniffed("unknown")
SILENT = Sniffed("silent")
_PROTO = {TlsHello: "tls", HttpRequest: "http", SshBanner: "ssh"}


def classify(data: bytes) -> Sniffed | NeedMore:
    """The session's protocol and facts from everything its client sent so far, or NEED_MORE.

    Empty `data` is NEED_MORE (the engine decides `silent` when the waiting ends).
    """
    if not data:
        return NEED_MORE
    waiting = False
    for sniff in (sniff_tls, sniff_http, sniff_ssh):
        answer = sniff(data)
        if isinstance(answer, NeedMore):
            waiting = True
        elif not isinstance(answer, NotThis):
            return Sniffed(_PROTO[type(answer)], answer)
    return NEED_MORE if waiting else UNKNOWN
