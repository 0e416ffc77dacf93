"""The compiled policy (`policy.matcher`) gives exactly the verdicts of the reference `decide`."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tproxy.policy import matcher as matcher_module
from tproxy.policy.decide import SessionFacts, SniffedFacts, decide
from tproxy.policy.matcher import (
    PARTITION_MAX_RULES,
    Matcher,
    Waiting,
    address_of,
    parse_address,
    remote_name,
)
from tproxy.policy.model import PROTOS, parse_policy

NETS = ["198.18.0.0/15", "198.18.1.0/24", "198.18.2.2/32", "0.0.0.0/0", "2001:db8::/32",
        "2001:db8:1::/64", "2001:db8:2::2/128", "::/0", "198.19.0.0/16"]  # fmt: skip
ADDRESSES = ["198.18.1.2", "198.18.2.2", "198.19.7.7", "2001:db8:1::2", "2001:db8:2::2",
             "2001:db8:ff::1", "::ffff:198.18.2.2", "::ffff:198.19.7.7"]  # fmt: skip
PORTS = [443, 80, "8000-8100", 22, "1-1024", 65535, 1, "65000-65535"]
NAMES = ["www.example.test", "*.example.test", "example.test", "*.ads.example", "tracker.example",
         "*.b.ads.example", "*.test"]  # fmt: skip
SNIFFED_NAMES = [None, "www.example.test", "WWW.Example.Test.", "example.test", "a.b.ads.example",
                 "ads.example", "tracker.example", ".example.test", "other.test", ".b.ads.example",
                 ".test", "x.b.ads.example"]  # fmt: skip


def _toml_list(items: list[object]) -> str:
    return "[" + ", ".join(f'"{i}"' if isinstance(i, str) else str(i) for i in items) + "]"


@st.composite
def policies(draw: st.DrawFn) -> str:
    lines = [f'default = "{draw(st.sampled_from(["allow", "reset"]))}"']
    for index in range(draw(st.integers(0, 8))):
        action = draw(st.sampled_from(["allow", "reset"]))
        lines += ["[[rule]]", f'name = "r{index}"', f'action = "{action}"']
        keys = (("client", NETS), ("dst", NETS), ("ports", PORTS), ("proto", list(PROTOS)),
                ("sni", NAMES), ("host", NAMES), ("sni_or_host", NAMES))  # fmt: skip
        for key, pool in keys:
            if draw(st.booleans()) and draw(st.booleans()):
                items = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
                lines.append(f"{key} = {_toml_list(items)}")
        if action == "allow" and draw(st.booleans()) and draw(st.booleans()):
            lines.append('tls = "intercept"')  # waits for the facts, even without fact keys
    return "\n".join(lines)


@settings(max_examples=1500, deadline=None)
@given(
    text=policies(),
    client=st.sampled_from(ADDRESSES),
    dst=st.sampled_from(ADDRESSES),
    port=st.sampled_from([1, 22, 80, 443, 999, 1024, 1025, 8050, 8101, 64999, 65000, 65535]),
    proto=st.sampled_from(PROTOS),
    sni=st.sampled_from(SNIFFED_NAMES),
    host=st.sampled_from(SNIFFED_NAMES),
)
def test_the_matcher_decides_as_the_reference(  # noqa: PLR0917 (hypothesis gives them)
    text: str, client: str, dst: str, port: int, proto: str, sni: str | None, host: str | None
) -> None:
    policy = parse_policy(text)
    matcher = Matcher(policy)
    facts = SessionFacts(ipaddress.ip_address(client), ipaddress.ip_address(dst), port)
    c, d = parse_address(client), parse_address(dst)
    expected = decide(policy, facts)
    got = matcher.first(c, d, port)
    for _ in range(2):  # computed, then remembered
        assert matcher.first_of(client, dst, port) == got
    if expected.need_facts:
        assert isinstance(got, Waiting) and got.rule == expected.waiting_for
        sniffed = SniffedFacts(proto, sni, host)
        expected = decide(policy, SessionFacts(facts.client, facts.dst, port, sniffed))
        for _ in range(2):  # computed, then remembered
            assert matcher.with_facts(got, c, d, port, sniffed) == expected
    else:
        assert got == expected
    assert matcher.needs_facts == any(rule.needs_facts for rule in policy.rules)


def test_first_of_remembers_a_bounded_number_of_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matcher_module, "FIRST_MEMO_MAX", 2)
    matcher = Matcher(
        parse_policy("""default = "allow"
[[rule]]
name = "near"
client = ["198.18.1.0/24"]
sni = ["*.example.test"]
action = "reset"
""")
    )
    for _ in range(3):
        for client in ("198.18.1.2", "198.18.1.3", "198.18.9.9"):
            got = matcher.first_of(client, "198.18.2.2", 443)
            assert got == matcher.first(parse_address(client), parse_address("198.18.2.2"), 443)
            assert len(matcher._first_memo) <= 2
    waiting = matcher.first_of("198.18.1.2", "198.18.2.2", 443)
    assert isinstance(waiting, Waiting)
    assert matcher.resume(waiting, 443, "tls", "A.Example.Test.", None).rule == "near"
    assert matcher.resume(waiting, 443, "tls", "example.test", None).rule is None
    with pytest.raises(OSError):
        matcher.first_of("not an address", "198.18.2.2", 443)


def test_resume_remembers_a_bounded_number_of_facts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(matcher_module, "FACTS_MEMO_MAX", 2)
    matcher = Matcher(
        parse_policy("""default = "allow"
[[rule]]
name = "near"
client = ["198.18.1.0/24"]
sni = ["*.example.test"]
action = "reset"
[[rule]]
name = "web"
sni_or_host = ["www.example.org"]
action = "reset"
""")
    )
    near = matcher.first_of("198.18.1.2", "198.18.2.2", 443)
    far = matcher.first_of("198.18.9.9", "198.18.2.2", 443)
    assert isinstance(near, Waiting) and isinstance(far, Waiting)
    cases = [
        (near, "tls", "A.Example.Test.", None, "near"),
        (far, "tls", "A.Example.Test.", None, None),  # the same facts, other rules left
        (near, "http", None, "WWW.example.org", "web"),
        (far, "http", None, "www.example.org.", "web"),
        (near, "tls", "example.test", None, None),
        (near, "silent", None, None, None),
    ]
    for _ in range(3):  # computed, then remembered (or computed again once forgotten)
        for waiting, proto, sni, host, rule in cases:
            assert matcher.resume(waiting, 443, proto, sni, host).rule == rule
            assert len(matcher._facts_memo) <= 2


def test_a_policy_too_big_to_partition_still_decides_in_order() -> None:
    rules = [f'[[rule]]\nname = "p{i}"\nports = [{1000 + i}]\naction = "reset"'
             for i in range(PARTITION_MAX_RULES + 5)]  # fmt: skip
    rules.append('[[rule]]\nname = "last"\nsni = ["*.example.test"]\naction = "reset"')
    matcher = Matcher(parse_policy("\n".join(rules)))
    c, d = parse_address("198.18.1.2"), parse_address("198.18.2.2")
    last = matcher.first(c, d, 1000 + PARTITION_MAX_RULES + 4)
    assert last.rule == f"p{PARTITION_MAX_RULES + 4}"
    waiting = matcher.first(c, d, 443)
    assert isinstance(waiting, Waiting) and waiting.rule == "last"
    verdict = matcher.with_facts(waiting, c, d, 443, SniffedFacts("tls", "a.example.test"))
    assert verdict.rule == "last"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("198.18.1.2", (4, 0xC6120102)),
        ("::ffff:198.18.1.2", (4, 0xC6120102)),
        ("2001:db8::1", (6, 0x20010DB8 << 96 | 1)),
        ("fe80::1%eth0", (6, 0xFE80 << 112 | 1)),
    ],
)
def test_addresses_parse_as_sockets_print_them(text: str, expected: tuple[int, int]) -> None:
    assert parse_address(text) == expected
    assert address_of(ipaddress.ip_address(text.partition("%")[0])) == expected


@pytest.mark.parametrize("text", ["", "198.18.1", "not an address", "1::2::3"])
def test_what_is_not_an_address_is_an_error(text: str) -> None:
    with pytest.raises(OSError):
        parse_address(text)


@pytest.mark.parametrize(
    ("sni", "host", "expected"),
    [
        ("www.example.test", None, "www.example.test"),
        ("WWW.Example.Test.", None, "www.example.test"),
        (None, "shop.example.test", "shop.example.test"),
        ("bad name.example", "shop.example.test", "shop.example.test"),
        ("a\\x0ab.example", None, None),  # escaped control bytes: not a name
        ("198.18.2.2", None, None),  # an address is no name to resolve
        ("-lead.example", None, None),
        ("a" * 64 + ".example", None, None),  # a label over 63
        (".".join(["abcdefghi"] * 26), None, None),  # over 253
        (None, None, None),
    ],
)
def test_the_remote_name_is_a_well_formed_name_or_none(
    sni: str | None, host: str | None, expected: str | None
) -> None:
    assert remote_name(SniffedFacts("tls", sni, host)) == expected


def test_resume_refuses_a_waiting_that_first_did_not_make() -> None:
    policy = parse_policy('[[rule]]\nname = "n"\nsni = ["a.example"]\naction = "reset"\n')
    with pytest.raises(ValueError, match="with_facts"):
        Matcher(policy).resume(Waiting(0, "n"), 443, "tls", "a.example", None)
