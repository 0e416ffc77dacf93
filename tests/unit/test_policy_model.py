"""The policy file's model: the issue's example parses, and each mistake is refused with one
sentence naming the rule (index and name) and the key."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tproxy.core.options import ConfigError
from tproxy.policy.model import (
    Action,
    Default,
    HostPort,
    NamePattern,
    PortRange,
    UpstreamProxy,
    parse_policy,
)

EXAMPLE = """\
default = "allow"          # or "reset"; what happens when no rule matches
sniff_timeout_s = 1.0      # longest wait for the client's first bytes, when a rule needs them

[[rule]]
name = "no-ads"            # required, unique; logged on every session it decides
sni = ["*.ads.example", "tracker.example"]
action = "reset"

[[rule]]
name = "mirror"
ports = [9009]             # numbers or "8000-8100" strings
action = "redirect"
to = "198.18.2.2:9000"     # host:port or [v6]:port

[[rule]]
name = "out-via-socks"
dst = ["198.18.2.0/24", "2001:db8:2::/64"]
action = "via"
via = "socks5://198.18.2.2:1080"
remote_name = true
"""


def _rule(body: str, name: str = "r") -> str:
    return f'[[rule]]\nname = "{name}"\n{body}\n'


def test_the_issue_example_parses() -> None:
    policy = parse_policy(EXAMPLE)
    assert policy.default is Default.ALLOW
    assert policy.sniff_timeout_s == 1.0
    no_ads, mirror, socks = policy.rules
    assert (no_ads.name, no_ads.action) == ("no-ads", Action.RESET)
    assert no_ads.sni == (NamePattern(".ads.example", glob=True), NamePattern("tracker.example"))
    assert no_ads.needs_facts
    assert mirror.ports == (PortRange(9009, 9009),)
    assert mirror.to == HostPort("198.18.2.2", 9000)
    assert not mirror.needs_facts
    assert socks.dst == (
        ipaddress.ip_network("198.18.2.0/24"),
        ipaddress.ip_network("2001:db8:2::/64"),
    )
    assert socks.via == UpstreamProxy("socks5", HostPort("198.18.2.2", 1080))
    assert socks.remote_name and not socks.capture


def test_an_empty_file_is_allow_everything() -> None:
    policy = parse_policy("")
    assert (policy.rules, policy.default, policy.sniff_timeout_s) == ((), Default.ALLOW, 1.0)


def test_every_key_is_read() -> None:
    text = 'default = "reset"\nsniff_timeout_s = 2\n' + _rule(
        'action = "via"\nclient = ["10.0.0.1/8", "fd00::/8"]\nports = [443, "8000-8100"]\n'
        'proto = ["tls", "http"]\nhost = ["Example.COM."]\nsni_or_host = ["*.Example.org"]\n'
        'via = "http://u%40x:p%3Aw@proxy.example:3128"\nremote_name = true\ncapture = true'
    )
    policy = parse_policy(text)
    assert (policy.default, policy.sniff_timeout_s) == (Default.RESET, 2.0)
    (rule,) = policy.rules
    assert rule.client == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert rule.ports == (PortRange(443, 443), PortRange(8000, 8100))
    assert rule.proto == ("tls", "http")
    assert rule.host == (NamePattern("example.com"),)
    assert rule.name_any == (NamePattern(".example.org", glob=True),)
    assert rule.via == UpstreamProxy("http", HostPort("proxy.example", 3128), "u@x", "p:w")
    assert "p:w" not in repr(rule.via) and "p:w" not in str(rule.via)
    assert rule.capture


@pytest.mark.parametrize(
    ("to", "expected"),
    [
        ("198.18.2.2:9000", HostPort("198.18.2.2", 9000)),
        ("[2001:db8::2]:443", HostPort("2001:db8::2", 443)),
        ("mirror.example:80", HostPort("mirror.example", 80)),
    ],
)
def test_to_takes_ips_and_names_kept_as_given(to: str, expected: HostPort) -> None:
    (rule,) = parse_policy(_rule(f'action = "redirect"\nto = "{to}"')).rules
    assert rule.to == expected
    assert str(rule.to) == to


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_rule('action = "allow"\ncolour = "red"', "x"), "unknown setting 'rule[0] (x).colour'"),
        ('colour = "red"', "unknown setting 'colour'"),
        (_rule('action = "allow"\ndst = ["10.0.0.300/8"]', "x"), "rule[0] (x).dst: '10.0.0.300/8'"),
        (_rule('action = "allow"\nclient = ["fd00::/200"]', "x"), "rule[0] (x).client: "),
        (_rule('action = "allow"\nports = ["9000-8000"]', "x"), "rule[0] (x).ports: port range"),
        (_rule('action = "allow"\nports = ["1-70000"]', "x"), "rule[0] (x).ports: port 70000"),
        (_rule('action = "allow"\nports = [0]', "x"), "rule[0] (x).ports: port 0 out of range"),
        (_rule('action = "allow"\nports = ["http"]', "x"), "rule[0] (x).ports: invalid port"),
        (
            _rule('action = "allow"', "a") + _rule('action = "reset"', "a"),
            "rule[1] (a).name is a duplicate of rule[0]'s",
        ),
        (_rule('action = "redirect"', "m"), 'rule[0] (m).to is required with action = "redirect"'),
        (_rule('action = "allow"\nto = "1.2.3.4:5"', "m"), "rule[0] (m).to is only for action"),
        (_rule('action = "redirect"\nto = "1.2.3.4"', "m"), "rule[0] (m).to: '1.2.3.4' is not"),
        (
            _rule('action = "via"\nvia = "ftp://1.2.3.4:21"', "v"),
            "rule[0] (v).via: unknown proxy scheme 'ftp'",
        ),
        (_rule('action = "via"', "v"), 'rule[0] (v).via is required with action = "via"'),
        (
            _rule('action = "allow"\nremote_name = true', "v"),
            'rule[0] (v).remote_name is only for action = "via"',
        ),
        (_rule('action = "allow"\nvia = "socks5://1.2.3.4:1080"', "v"), "rule[0] (v).via is only"),
        (_rule('action = "drop"', "x"), "rule[0] (x).action must be"),
        (_rule('sni = ["a.example"]', "x"), "rule[0] (x).action is required"),
        ('[[rule]]\naction = "allow"', "rule[0].name is required"),
        ('[[rule]]\nname = "a\\nb"\naction = "allow"', "rule[0] ('a\\nb').name must be printable"),
        (_rule('action = "allow"\nproto = ["quic"]', "x"), "rule[0] (x).proto: unknown protocol"),
        (_rule('action = "allow"\nsni = []', "x"), "rule[0] (x).sni must be a non-empty list"),
        (_rule('action = "allow"\nsni = "a.example"', "x"), "rule[0] (x).sni must be a non-empty"),
        (_rule('action = "allow"\nsni = ["a.*.example"]', "x"), "rule[0] (x).sni: 'a.*.example'"),
        (_rule('action = "allow"\ncapture = "yes"', "x"), "rule[0] (x).capture must be true"),
        ('default = "redirect"', 'default must be "allow" or "reset"'),
        ("sniff_timeout_s = 0", "sniff_timeout_s must be a number of seconds above 0"),
        ("sniff_timeout_s = 61", "sniff_timeout_s must be at most 60 s"),
        ('[rule]\nname = "x"', "rule must be a list of tables"),
        ("default = ", "not valid TOML"),
    ],
)
def test_each_mistake_is_one_sentence_naming_rule_and_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(text)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


_KEYS = st.sampled_from(
    ["name", "action", "client", "dst", "ports", "proto", "sni", "host", "sni_or_host", "to",
     "via", "remote_name", "capture", "tls", "upstream_verify", "passthrough_on_client_reject",
     "colour"]
)  # fmt: skip
_SCALARS = st.one_of(
    st.booleans(),
    st.integers(-10, 70000),
    st.text(max_size=30),
    st.sampled_from(
        ["allow", "reset", "redirect", "via", "10.0.0.0/8", "fd00::/8", "1-2", "8000-8100",
         "*.a.example", "a.example.", "tls", "1.2.3.4:5", "[::1]:80", "socks5://u:p@h:1",
         "http://h:8080", "ftp://h:1", "intercept", "passthrough"]
    ),
)  # fmt: skip
_VALUES = st.one_of(_SCALARS, st.lists(_SCALARS, max_size=3))


@given(st.lists(st.dictionaries(_KEYS, _VALUES, max_size=6), max_size=3))
def test_random_rules_parse_or_give_one_config_error(tables: list[dict[str, object]]) -> None:
    text = "".join(
        "[[rule]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in table.items())
        for table in tables
    )
    try:
        policy = parse_policy(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)
    else:
        assert len(policy.rules) == len(tables)
        assert len({rule.name for rule in policy.rules}) == len(tables)
