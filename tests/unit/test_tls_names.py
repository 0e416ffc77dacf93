"""Which names a forged leaf carries: the SNI alone when the upstream vouched for it, the
upstream's names only without an SNI, the destination as a last resort; garbage from either side
is an answer, never an exception, and never turns into a wildcard; bounded work for a certificate
with thousands of names."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.tls import names as names_module
from tproxy.tls.names import (
    MAX_LEAF_NAMES,
    MAX_UPSTREAM_NAMES,
    LeafNames,
    NameRejected,
    UpstreamCertFacts,
    choose_names,
    covers,
    parse_dns_name,
    parse_server_name,
    shown,
)

IP4 = ipaddress.IPv4Address("198.18.2.2")
IP6 = ipaddress.IPv6Address("2001:db8:2::2")


def _upstream(*dns: str, ips: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...] = (),
              cn: str | None = None) -> UpstreamCertFacts:  # fmt: skip
    return UpstreamCertFacts(dns, ips, cn, datetime(2027, 1, 1, tzinfo=UTC))


# --- one name ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("example.test", "example.test"),
        ("WWW.Example.TEST.", "www.example.test"),
        ("localhost", "localhost"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("_sip._tcp.example.test", "_sip._tcp.example.test"),
        ("a-b.c1.example", "a-b.c1.example"),
        ("1.example", "1.example"),
        ("a" * 63 + ".test", "a" * 63 + ".test"),
        (".".join(["a" * 63] * 3) + "." + "b" * 61, ".".join(["a" * 63] * 3) + "." + "b" * 61),
    ],
)
def test_valid_dns_names(text: str, name: str) -> None:
    assert parse_dns_name(text) == name


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        (".", "empty"),
        ("a..b", "an empty label"),
        (".a", "an empty label"),
        ("a.b..", "an empty label"),
        ("-a.test", "not a host name"),
        ("a-.test", "not a host name"),
        ("a b.test", "not a host name"),
        ("a\\x00b.test", "not a host name"),
        ("a/b.test", "not a host name"),
        ("a:443", "not a host name"),
        ("a" * 64 + ".test", "not a host name"),
        ("bücher.example", "not ASCII (an internationalized name must be in xn-- form)"),
        (".".join(["a" * 63] * 4), "longer than 253 characters"),
        ("x" * 10_000, "longer than 253 characters"),
        ("1.2.3", "ends in a number, as only an IPv4 address does"),
        ("example.123", "ends in a number, as only an IPv4 address does"),
        ("*.example.test", "a wildcard, which only an upstream certificate may carry"),
        ("f*o.example.test", "a wildcard that is not the whole leftmost label"),
        ("a.*.example.test", "a wildcard that is not the whole leftmost label"),
    ],
)
def test_invalid_dns_names(text: str, reason: str) -> None:
    rejected = parse_dns_name(text)
    assert isinstance(rejected, NameRejected)
    assert rejected.reason.startswith(reason)


def test_wildcards_only_where_allowed_and_well_formed() -> None:
    assert parse_dns_name("*.Example.Test", wildcard=True) == "*.example.test"
    for text, reason in [
        ("*.test", "a wildcard for a top-level or single-label name"),
        ("*", "a wildcard for a top-level or single-label name"),
        ("*.*.example.test", "a wildcard that is not the whole leftmost label"),
        ("w*.example.test", "a wildcard that is not the whole leftmost label"),
    ]:
        assert parse_dns_name(text, wildcard=True) == NameRejected(reason)


def test_the_sni_may_be_an_ip_address_but_never_a_wildcard() -> None:
    assert parse_server_name("198.18.2.2") == IP4
    assert parse_server_name("2001:db8:2::2") == IP6
    assert parse_server_name("*.bank.example") == NameRejected(
        "the SNI '*.bank.example' is a wildcard, which only an upstream certificate may carry"
    )


def test_a_hostile_name_is_shown_escaped_and_short() -> None:
    assert shown("a\nb") == "'a\\nb'"
    assert shown("é" * 200) == ascii("é" * 80) + "..."


@pytest.mark.parametrize(
    ("pattern", "name", "covered"),
    [
        ("a.example", "a.example", True),
        ("*.example.test", "a.example.test", True),
        ("*.example.test", "xn--bcher-kva.example.test", True),
        ("*.example.test", "example.test", False),
        ("*.example.test", "a.b.example.test", False),
        ("*.example.test", ".example.test", False),
        ("a.example", "b.example", False),
        (IP4, IP4, True),
        (IP4, "198.18.2.2", False),
        ("198.18.2.2", IP4, False),
    ],
)
def test_covers_is_rfc_6125(pattern: str, name: str, covered: bool) -> None:
    assert covers(pattern, name) is covered


# --- the choice ---------------------------------------------------------------------------------


def test_without_an_upstream_certificate_the_sni_alone() -> None:
    assert choose_names("Example.Test", None, IP4) == LeafNames(("example.test",))


def test_without_sni_or_upstream_certificate_the_destination() -> None:
    assert choose_names(None, None, IP6) == LeafNames((IP6,))
    assert choose_names(None, None) == NameRejected(
        "no SNI, no upstream certificate and no destination to forge for"
    )


def test_an_sni_the_upstream_vouched_for_is_the_only_name() -> None:
    """Not the upstream's other names and wildcards: browsers would coalesce requests for them
    onto this intercepted HTTP/2 connection (review rv3, finding 5)."""
    upstream = _upstream("*.google.com", "google.com", "*.youtube.com", "accounts.google.com",
                         ips=(IP4,))  # fmt: skip
    assert choose_names("www.google.com", upstream, IP6) == LeafNames(("www.google.com",))
    assert choose_names("accounts.google.com", upstream) == LeafNames(("accounts.google.com",))
    assert choose_names("198.18.2.2", upstream) == LeafNames((IP4,))


def test_without_sni_the_upstreams_names_once_each() -> None:
    upstream = _upstream("*.example.test", "example.test", "b.example.test", "EXAMPLE.test",
                         ips=(IP4, IP4))  # fmt: skip
    assert choose_names(None, upstream, IP6) == LeafNames(
        ("*.example.test", "example.test", "b.example.test", IP4)
    )


def test_an_sni_covered_by_a_wildcard_is_the_only_name() -> None:
    assert choose_names("a.example.test", _upstream("*.example.test"), None) == LeafNames(
        ("a.example.test",)
    )


def test_an_sni_the_upstream_did_not_vouch_for_is_left_out() -> None:
    """The leaf then carries the upstream's first name alone: the client sees the mismatch it
    would have seen without us, and nothing to coalesce onto."""
    upstream = _upstream("evil.example", "*.evil.example", "other.example")
    assert choose_names("bank.example", upstream, IP4) == LeafNames(
        ("evil.example",), ("'bank.example' (the SNI): not in the upstream certificate",)
    )


def test_an_ip_sni_needs_the_upstreams_ip() -> None:
    assert choose_names("198.18.2.2", _upstream("a.example", ips=(IP4,))) == LeafNames((IP4,))
    chosen = choose_names("198.18.2.3", _upstream("a.example", ips=(IP4,)))
    assert isinstance(chosen, LeafNames)
    assert chosen.names == ("a.example",)


def test_the_common_name_counts_only_without_dns_names() -> None:
    assert choose_names(None, _upstream(cn="legacy.example")) == LeafNames(("legacy.example",))
    assert choose_names(None, _upstream("new.example", cn="legacy.example")) == LeafNames(
        ("new.example",)
    )
    assert choose_names(None, _upstream(ips=(IP4,), cn="legacy.example")) == LeafNames(
        ("legacy.example", IP4)
    )


def test_the_upstreams_garbage_is_dropped_and_said() -> None:
    upstream = _upstream("good.example", "bad name", "*.test", "w*.example", "x" * 300)
    chosen = choose_names("good.example", upstream)
    assert chosen == LeafNames(
        ("good.example",),
        (
            "'bad name': not a host name (labels of 1-63 letters, digits, '-' and '_', no '-' "
            "at either end)",
            "'*.test': a wildcard for a top-level or single-label name",
            "'w*.example': a wildcard that is not the whole leftmost label",
            "'" + "x" * 80 + "'...: longer than 253 characters",
        ),
    )


def test_an_upstream_with_no_usable_name_is_a_refusal() -> None:
    assert choose_names(None, _upstream()) == NameRejected(
        "no usable name in the upstream certificate (it has none)"
    )
    assert choose_names("a.example", _upstream("*", cn="ignored")) == NameRejected(
        "no usable name in the upstream certificate ('*': a wildcard for a top-level or "
        "single-label name; 'a.example' (the SNI): not in the upstream certificate)"
    )


def test_an_invalid_sni_is_a_refusal_even_with_an_upstream() -> None:
    assert choose_names("a b", _upstream("a.example")) == NameRejected(
        "the SNI 'a b' is not a host name (labels of 1-63 letters, digits, '-' and '_', no '-' "
        "at either end)"
    )


def test_names_are_bounded_and_so_is_what_is_said_about_them() -> None:
    upstream = _upstream(*[f"n{i}.example" for i in range(150)], *["bad name"] * 50)
    chosen = choose_names(None, upstream)
    assert isinstance(chosen, LeafNames)
    assert len(chosen.names) == MAX_LEAF_NAMES
    assert chosen.names[:2] == ("n0.example", "n1.example")
    assert len(chosen.dropped) == 6
    assert chosen.dropped[0] == "50 names past the first 100"
    assert chosen.dropped[-1] == "46 more"


def test_only_the_first_names_of_a_huge_certificate_are_read() -> None:
    """A certificate with thousands of names (review rv3, finding 6): the first
    MAX_UPSTREAM_NAMES are read, each once; an SNI among the rest is not covered."""
    names = [f"n{i}.example" for i in range(5000)]
    upstream = _upstream(*names, ips=(IP4,))
    read: list[str] = []
    real = names_module.parse_dns_name

    def counting(text: str, *, wildcard: bool = False) -> str | NameRejected:
        read.append(text)
        return real(text, wildcard=wildcard)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(names_module, "parse_dns_name", counting)
        unread = f"{5001 - MAX_UPSTREAM_NAMES} names past the first {MAX_UPSTREAM_NAMES}: not read"
        assert choose_names("n5.example", upstream) == LeafNames(("n5.example",), (unread,))
        assert len(read) == 1 + MAX_UPSTREAM_NAMES  # the SNI, then the certificate's
        chosen = choose_names("n4999.example", upstream)
    assert chosen == LeafNames(
        ("n0.example",),
        (
            unread,
            f"'n4999.example' (the SNI): not in the first {MAX_UPSTREAM_NAMES} names of the "
            "upstream certificate",
        ),
    )
    without_sni = choose_names(None, UpstreamCertFacts(tuple(names[:10]), unread=7))
    assert isinstance(without_sni, LeafNames)
    assert without_sni.dropped == (f"7 names past the first {MAX_UPSTREAM_NAMES}: not read",)
    assert len(without_sni.names) == 10


def test_repeated_names_are_kept_once_in_their_order() -> None:
    upstream = _upstream(*[f"n{i % 3}.example" for i in range(MAX_UPSTREAM_NAMES)], ips=(IP4,))
    assert choose_names(None, upstream) == LeafNames(
        ("n0.example", "n1.example", "n2.example"),
        (f"1 names past the first {MAX_UPSTREAM_NAMES}: not read",),
    )


# --- hostile input ------------------------------------------------------------------------------

_LABEL = st.from_regex(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?", fullmatch=True)
_NAME = (
    st.lists(_LABEL, min_size=1, max_size=6)
    .map(".".join)
    .filter(lambda n: len(n) <= 253 and not n.rsplit(".", 1)[-1].isdigit())
)
_ANY_NAME = st.one_of(st.text(max_size=300), _NAME, st.sampled_from(["*", "*.a", "*.a.b", "."]))


@given(_ANY_NAME, st.booleans())
def test_any_text_is_a_name_or_a_reason(text: str, wildcard: bool) -> None:
    result = parse_dns_name(text, wildcard=wildcard)
    if isinstance(result, str):
        assert result.isascii()
        assert len(result) <= 253
        assert result == parse_dns_name(result, wildcard=wildcard)  # stable
        assert "*" not in result[1:] and (wildcard or "*" not in result)
    else:
        assert result.reason


@given(_NAME, st.booleans(), st.booleans())
def test_valid_names_round_trip(name: str, upper: bool, dot: bool) -> None:
    text = (name.upper() if upper else name) + ("." if dot else "")
    assert parse_dns_name(text) == name
    assert parse_server_name(text) == name


@given(
    st.one_of(st.none(), _ANY_NAME),
    st.one_of(
        st.none(),
        st.builds(
            UpstreamCertFacts,
            st.lists(_ANY_NAME, max_size=8).map(tuple),
            st.lists(st.sampled_from([IP4, IP6]), max_size=2).map(tuple),
            st.one_of(st.none(), _ANY_NAME),
        ),
    ),
    st.one_of(st.none(), st.sampled_from([IP4, IP6])),
)
def test_choosing_never_raises_and_never_invents_a_wildcard(
    sni: str | None, upstream: UpstreamCertFacts | None, destination: ipaddress.IPv4Address | None
) -> None:
    chosen = choose_names(sni, upstream, destination)
    if isinstance(chosen, NameRejected):
        assert chosen.reason
        return
    assert 1 <= len(chosen.names) <= MAX_LEAF_NAMES
    assert len(set(chosen.names)) == len(chosen.names)
    vouched = set() if upstream is None else {*upstream.dns_names, *upstream.ip_addresses}
    if upstream is not None and upstream.common_name is not None:
        vouched.add(upstream.common_name)
    lowered = {v.lower().removesuffix(".") if isinstance(v, str) else v for v in vouched}
    for name in chosen.names:
        if isinstance(name, str) and name.startswith("*"):
            assert name in lowered  # a wildcard comes only from the upstream's certificate
        if upstream is not None:
            assert any(covers(pattern, name) for pattern in chosen.names if pattern in lowered)
