"""Loading a policy for the proxy: names in `to` and `via` resolved once, failures named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tproxy.core.options import ConfigError
from tproxy.policy.load import load_matcher, resolve_names
from tproxy.policy.model import HostPort, parse_policy

POLICY = """
[[rule]]
name = "mirror"
ports = [9000]
action = "redirect"
to = "mirror.lab:9001"

[[rule]]
name = "out"
action = "via"
via = "socks5://user:secret@socks.lab:1080"

[[rule]]
name = "literal"
action = "redirect"
to = "[2001:db8::9]:80"
"""

NAMES = {"mirror.lab": "198.18.2.9", "socks.lab": "2001:db8:2::5"}


def _resolve(name: str) -> str:
    try:
        return NAMES[name]
    except KeyError:
        raise OSError(-2, "Name or service not known") from None


def test_names_are_resolved_and_literals_kept() -> None:
    rules = resolve_names(parse_policy(POLICY), _resolve).rules
    assert rules[0].to == HostPort("198.18.2.9", 9001)
    assert rules[1].via is not None
    assert rules[1].via.address == HostPort("2001:db8:2::5", 1080)
    assert (rules[1].via.username, rules[1].via.password) == ("user", "secret")
    assert rules[2].to == HostPort("2001:db8::9", 80)


def test_a_name_that_does_not_resolve_names_the_rule_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY.replace("socks.lab", "gone.lab"))
    with pytest.raises(ConfigError) as raised:
        load_matcher(str(path), _resolve)
    assert str(raised.value) == (
        f"{path}: rule[1] (out).via: cannot resolve 'gone.lab': Name or service not known"
    )


def test_a_loaded_policy_is_compiled(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    matcher = load_matcher(str(path), _resolve)
    assert [rule.name for rule in matcher.policy.rules] == ["mirror", "out", "literal"]
    assert not matcher.needs_facts
