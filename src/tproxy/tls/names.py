"""Which names a forged certificate carries: the client's SNI and the upstream certificate's
names, validated; pure, no I/O, never raises for what it is given.

Theory of operation. A forged leaf vouches, with the authority of a CA the client trusts, that
the holder of our leaf key is the server for every name the leaf carries. So it carries only
names someone legitimately asked for or vouched for:

* The client's SNI is what the client asked for and will check. It is a host name (RFC 6066
  section 3: "HostName" is a DNS name in A-labels, no trailing dot), so it never makes a
  wildcard: a client that sends `*.bank.example` as its SNI gets a refusal, not a leaf valid for
  every name under `bank.example`. An IP address as SNI (forbidden by the RFC, sent by a few
  clients anyway) is taken as that IP.
* When the upstream's certificate is known, its subjectAltName DNS names and IP addresses are
  what it vouched for (its common name only when it has no DNS names, as OpenSSL's
  `X509_check_host` does). Its wildcards are kept when well-formed (`*` as the whole leftmost
  label, with at least two labels after it); anything else it carries is dropped, and said so.
* With an SNI that one of those names covers, the leaf carries the SNI alone (its common name
  too). Not the upstream's other names: a browser reuses an HTTP/2 connection for any name the
  certificate covers whose address matches ("connection coalescing", RFC 9113 section 9.1.1),
  so a leaf listing `*.google.com` and `*.youtube.com` would carry requests for names a rule
  passes through, or never meant to intercept, over this intercepted connection.
* With an SNI that none of them covers, the leaf carries the upstream's first name alone: a leaf
  never vouches for more than the real server's certificate did, so a client whose SNI the
  upstream's certificate does not match sees the same mismatch it would have seen without us
  (with upstream verification on, which checks the SNI against that certificate, this never
  happens).
* Without an SNI, the client asked for no name: the leaf carries all of the upstream's names,
  at most `MAX_LEAF_NAMES`. Without an upstream certificate either (a client that connected to
  an IP address, decided before the upstream handshake), the destination's IP address is the
  one name.

Names are checked the way they are given: lower-cased, one trailing dot removed, ASCII only (an
internationalized name is valid only in its `xn--` A-label form, as the SNI carries it), each
label 1 to 63 letters, digits, hyphens (not at either end) and underscores (which some private
names use), at most 253 characters, and not ending in an all-digit label (which browsers read as
an IPv4 address). At most `MAX_LEAF_NAMES` names go into a leaf, and at most
`MAX_UPSTREAM_NAMES` of the upstream certificate's are read (in its order): a certificate built
with thousands would otherwise cost every new session time and memory; one whose SNI comes later
than that is treated as not covering it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import datetime

from tproxy.core.endpoint import IPAddress

LeafName = str | IPAddress
"""A DNS name (lower case, maybe a wildcard from the upstream's certificate) or an IP address."""

MAX_DNS_NAME_CHARS = 253
# Large CDN certificates carry around a hundred names (public CAs allow at most about that many);
# more than this is a certificate built to make every forged leaf (and every handshake) big.
MAX_LEAF_NAMES = 100
MAX_UPSTREAM_NAMES = 2 * MAX_LEAF_NAMES
"""How many of an upstream certificate's names are read and kept (`UpstreamCertFacts`)."""
# Dropped names are reported for the log: this many, then a count.
_MAX_DROPPED_SHOWN = 5
_SHOWN_CHARS = 80

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


@dataclass(frozen=True, slots=True)
class NameRejected:
    """A name, or the whole choice, that cannot be used: one sentence for the log."""

    reason: str


@dataclass(frozen=True, slots=True)
class UpstreamCertFacts:
    """What forging needs of the upstream's certificate, as read from it (not yet validated).

    Args:
        dns_names: its subjectAltName DNS names, as they are.
        ip_addresses: its subjectAltName IP addresses.
        common_name: its subject's common name, if any.
        not_after: the end of its validity (aware, UTC); a forged leaf never outlives it.
        unread: how many subjectAltNames past the first `MAX_UPSTREAM_NAMES` were not kept.
    """

    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[IPAddress, ...] = ()
    common_name: str | None = None
    not_after: datetime | None = None
    unread: int = 0


@dataclass(frozen=True, slots=True)
class LeafNames:
    """The names a leaf carries, and what was left out.

    Args:
        names: never empty; the SNI alone when the client sent one the upstream vouched for.
        dropped: one short line per name left out and why, for the session's log (bounded).
    """

    names: tuple[LeafName, ...]
    dropped: tuple[str, ...] = ()


def shown(text: str) -> str:
    """A name an attacker may have chosen, safe for a log line: quoted, escaped, cut short."""
    if len(text) > _SHOWN_CHARS:
        return ascii(text[:_SHOWN_CHARS]) + "..."
    return ascii(text)


def parse_dns_name(text: str, *, wildcard: bool = False) -> str | NameRejected:
    """A DNS name in the form a certificate carries it (lower case, no trailing dot).

    Args:
        text: the name as given.
        wildcard: accept `*` as the whole leftmost label (an upstream certificate's name), with
            at least two labels after it.

    Returns:
        The name, or why it is not one (never raises).
    """
    if not isinstance(text, str):
        return NameRejected("not text")
    if len(text) > MAX_DNS_NAME_CHARS + 1:  # room for the trailing dot
        return NameRejected(f"longer than {MAX_DNS_NAME_CHARS} characters")
    name = text.lower().removesuffix(".")
    if not name:
        return NameRejected("empty")
    if len(name) > MAX_DNS_NAME_CHARS:
        return NameRejected(f"longer than {MAX_DNS_NAME_CHARS} characters")
    if not name.isascii():
        return NameRejected("not ASCII (an internationalized name must be in xn-- form)")
    labels = name.split(".")
    if labels[0] == "*":
        if not wildcard:
            return NameRejected("a wildcard, which only an upstream certificate may carry")
        if len(labels) < 3:
            return NameRejected("a wildcard for a top-level or single-label name")
        labels = labels[1:]
    for label in labels:
        if not label:
            return NameRejected("an empty label")
        if "*" in label:
            return NameRejected("a wildcard that is not the whole leftmost label")
        if _LABEL.fullmatch(label) is None:
            return NameRejected(
                "not a host name (labels of 1-63 letters, digits, '-' and '_', no '-' at "
                "either end)"
            )
    if labels[-1].isdigit():
        return NameRejected("ends in a number, as only an IPv4 address does")
    return name


def parse_server_name(text: str) -> LeafName | NameRejected:
    """The client's SNI as a leaf name: a DNS name (no wildcard), or an IP address."""
    if not isinstance(text, str):
        return NameRejected("the SNI is not text")
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    name = parse_dns_name(text)
    if isinstance(name, NameRejected):
        return NameRejected(f"the SNI {shown(text)} is {name.reason}")
    return name


def covers(pattern: LeafName, name: LeafName) -> bool:
    """Whether a certificate name `pattern` matches `name` (RFC 6125 section 6.4.3: a wildcard
    stands for exactly one whole leftmost label; no partial wildcards)."""
    if isinstance(pattern, str) != isinstance(name, str):
        return False
    if not isinstance(pattern, str) or not isinstance(name, str):
        return pattern == name
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    first, dot, rest = name.partition(".")
    return bool(first) and bool(dot) and rest == pattern[2:]


def choose_names(
    sni: str | None,
    upstream: UpstreamCertFacts | None,
    destination: IPAddress | None = None,
) -> LeafNames | NameRejected:
    """The names a forged leaf carries (see the module's docstring for the rules).

    Args:
        sni: the client's server name as sniffed; None if it sent none.
        upstream: the upstream's certificate, when its handshake came first; None to forge from
            the SNI alone.
        destination: the session's original destination, the name of last resort.

    Returns:
        The SNI alone when the upstream's certificate covers it (or there is none); without an
        SNI, the upstream's names; or why no leaf can be forged (never raises).
    """
    asked: LeafName | None = None
    if sni is not None:
        parsed = parse_server_name(sni)
        if isinstance(parsed, NameRejected):
            return parsed
        asked = parsed
    if upstream is None:
        if asked is not None:
            return LeafNames((asked,))
        if destination is not None:
            return LeafNames((destination,))
        return NameRejected("no SNI, no upstream certificate and no destination to forge for")
    dropped: list[str] = []
    vouched, unread = _upstream_names(upstream, dropped)
    names = vouched
    if asked is not None:
        if any(covers(pattern, asked) for pattern in vouched):
            names = [asked]
        else:
            where = f"the first {MAX_UPSTREAM_NAMES} names of " if unread else ""
            dropped.append(f"{shown(str(asked))} (the SNI): not in {where}the upstream certificate")
            names = vouched[:1]
    elif len(names) > MAX_LEAF_NAMES:
        # First: the one drop that says the most when only a few are shown.
        dropped.insert(0, f"{len(names) - MAX_LEAF_NAMES} names past the first {MAX_LEAF_NAMES}")
        names = names[:MAX_LEAF_NAMES]
    if not names:
        why = "; ".join(_bounded(dropped)) or "it has none"
        return NameRejected(f"no usable name in the upstream certificate ({why})")
    return LeafNames(tuple(names), tuple(_bounded(dropped)))


def _upstream_names(upstream: UpstreamCertFacts, dropped: list[str]) -> tuple[list[LeafName], int]:
    """The upstream certificate's usable names, in its order, without repeats, and how many
    were not read: at most `MAX_UPSTREAM_NAMES` are (the rest counted in `dropped`)."""
    dns = upstream.dns_names
    if not dns and upstream.common_name is not None:
        dns = (upstream.common_name,)
    ips = upstream.ip_addresses
    given: list[str | IPAddress] = [*dns[:MAX_UPSTREAM_NAMES]]
    given += ips[: MAX_UPSTREAM_NAMES - len(given)]
    unread = upstream.unread + len(dns) + len(ips) - len(given)
    if unread:
        dropped.append(f"{unread} names past the first {MAX_UPSTREAM_NAMES}: not read")
    names: list[LeafName] = []
    seen: set[LeafName] = set()
    for text in given:
        name = parse_dns_name(text, wildcard=True) if isinstance(text, str) else text
        if isinstance(name, NameRejected):
            dropped.append(f"{shown(str(text))}: {name.reason}")
        elif name not in seen:
            seen.add(name)
            names.append(name)
    return names, unread


def _bounded(dropped: list[str]) -> list[str]:
    if len(dropped) <= _MAX_DROPPED_SHOWN:
        return dropped
    return [*dropped[:_MAX_DROPPED_SHOWN], f"{len(dropped) - _MAX_DROPPED_SHOWN} more"]
