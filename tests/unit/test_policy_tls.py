"""The policy's TLS keys (`tls`, `upstream_verify`, `passthrough_on_client_reject`): parsed,
refused where they do not go, carried by the verdict, explained; `tls = "intercept"` needs a CA,
at start-up and on reload; `--tls-handshake-timeout` and `--upstream-ca`."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from pathlib import Path

import pytest

from tests.unit.test_policy_cli import _run
from tproxy.core.config import ConfigError, ProxyConfig, check_interception, reload_from
from tproxy.policy.decide import SessionFacts, SniffedFacts, Verdict, decide
from tproxy.policy.matcher import Matcher, address_of
from tproxy.policy.model import Action, TLSMode, parse_policy
from tproxy.tls.contexts import check_upstream_ca

CLIENT = ipaddress.ip_address("198.18.1.2")
DST = ipaddress.ip_address("198.18.2.2")

INTERCEPTING = """\
[[rule]]
name = "inspect"
sni = ["*.example.test"]
action = "allow"
tls = "intercept"
upstream_verify = false
passthrough_on_client_reject = true

[[rule]]
name = "leave-the-bank"
ports = [443]
action = "via"
via = "socks5://198.18.2.9:1080"
tls = "passthrough"
"""


def _rule(body: str, name: str = "r") -> str:
    return f'[[rule]]\nname = "{name}"\n{body}\n'


def test_the_keys_are_read() -> None:
    inspect, leave = parse_policy(INTERCEPTING).rules
    assert inspect.tls is TLSMode.INTERCEPT and inspect.intercepts
    assert not inspect.upstream_verify and inspect.passthrough_on_client_reject
    assert leave.tls is TLSMode.PASSTHROUGH and not leave.intercepts
    assert leave.upstream_verify and not leave.passthrough_on_client_reject
    assert parse_policy(INTERCEPTING).intercepting_rules == ("inspect",)


def test_without_tls_nothing_changes() -> None:
    (rule,) = parse_policy(_rule('action = "allow"')).rules
    assert (rule.tls, rule.upstream_verify, rule.passthrough_on_client_reject) == (
        None,
        True,
        False,
    )
    assert not rule.needs_facts


@pytest.mark.parametrize("action", ['"allow"', '"redirect"\nto = "198.18.2.3:443"',
                                    '"via"\nvia = "http://198.18.2.9:3128"'])  # fmt: skip
def test_intercept_goes_with_every_action_that_connects(action: str) -> None:
    (rule,) = parse_policy(_rule(f'action = {action}\ntls = "intercept"')).rules
    assert rule.intercepts
    assert rule.needs_facts  # the ClientHello's SNI and ALPN


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('action = "reset"\ntls = "intercept"', "rule[0] (x).tls is only for an action that "
         "connects"),
        ('action = "reset"\ntls = "passthrough"', "rule[0] (x).tls is only for an action"),
        ('action = "allow"\ntls = "decrypt"', 'rule[0] (x).tls must be "intercept" or '
         '"passthrough"'),
        ('action = "allow"\nupstream_verify = false', 'rule[0] (x).upstream_verify is only for '
         'tls = "intercept"'),
        ('action = "allow"\ntls = "passthrough"\nupstream_verify = true',
         'rule[0] (x).upstream_verify is only for tls = "intercept"'),
        ('action = "allow"\ntls = "passthrough"\npassthrough_on_client_reject = true',
         'rule[0] (x).passthrough_on_client_reject is only for tls = "intercept"'),
        ('action = "allow"\ntls = "intercept"\nupstream_verify = "no"',
         "rule[0] (x).upstream_verify must be true or false"),
    ],
)  # fmt: skip
def test_mistakes_are_one_sentence_naming_rule_and_key(body: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_policy(_rule(body, "x"))
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_the_verdict_carries_them_from_decide_and_the_matcher() -> None:
    policy = parse_policy(INTERCEPTING)
    waiting = decide(policy, SessionFacts(CLIENT, DST, 443))
    assert waiting.need_facts and waiting.waiting_for == "inspect"
    sniffed = SessionFacts(CLIENT, DST, 443, SniffedFacts("tls", "www.example.test"))
    expected = Verdict(Action.ALLOW, rule="inspect", tls=TLSMode.INTERCEPT,
                       upstream_verify=False, passthrough_on_client_reject=True)  # fmt: skip
    assert decide(policy, sniffed) == expected
    assert expected.intercepts
    matcher = Matcher(policy)
    first = matcher.first(address_of(CLIENT), address_of(DST), 443)
    assert not isinstance(first, Verdict)
    facts = SniffedFacts("tls", "www.example.test")
    assert matcher.with_facts(first, address_of(CLIENT), address_of(DST), 443, facts) == expected
    other = SessionFacts(CLIENT, DST, 443, SniffedFacts("tls", "bank.example"))
    passthrough = decide(policy, other)
    assert (passthrough.rule, passthrough.tls, passthrough.intercepts) == (
        "leave-the-bank",
        TLSMode.PASSTHROUGH,
        False,
    )


def test_explain_shows_the_tls_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.toml"
    path.write_text(INTERCEPTING)
    base = ["policy", "explain", str(path), "--client", "198.18.1.2", "--dst", "198.18.2.2:443"]
    assert _run([*base, "--sni", "www.example.test"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "allow, TLS intercepted (with --ca), upstream certificate NOT verified, passed through "
        "for a while after a client rejects our certificate (rule 'inspect')"
    )
    assert _run([*base, "--sni", "bank.example"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "via socks5://198.18.2.9:1080, TLS passthrough (rule 'leave-the-bank')"
    )


# --- the CA an intercepting policy needs ---------------------------------------------------


def test_an_intercepting_policy_needs_a_ca() -> None:
    config = ProxyConfig(matcher=Matcher(parse_policy(INTERCEPTING)))
    with pytest.raises(ConfigError) as raised:
        check_interception(config)
    assert str(raised.value) == (
        "policy rule 'inspect' has tls = \"intercept\", but no --ca (ca) gives the CA that signs "
        "the certificates it forges ('tproxy ca create DIR' makes one)"
    )
    check_interception(replace(config, ca_dir="/etc/tproxy/ca"))
    check_interception(ProxyConfig())
    check_interception(ProxyConfig(matcher=Matcher(parse_policy(_rule('action = "allow"')))))


def test_a_key_log_needs_a_ca() -> None:
    with pytest.raises(ConfigError, match=r"--keylog \(keylog\) needs --ca \(ca\)"):
        check_interception(ProxyConfig(keylog="keys.log"))
    check_interception(ProxyConfig(keylog="keys.log", ca_dir="/etc/tproxy/ca"))


def test_a_reload_cannot_add_interception_without_the_ca_it_keeps() -> None:
    """`ca` changes only on restart: a file that adds a CA and an intercepting rule together
    is refused as a whole, the running configuration kept."""
    running = ProxyConfig()
    loaded = ProxyConfig(ca_dir="/etc/tproxy/ca", matcher=Matcher(parse_policy(INTERCEPTING)))
    new, notices = reload_from(running, lambda: loaded)
    assert new is None
    assert notices[0].startswith("reload failed, keeping the running configuration: policy "
                                 "rule 'inspect' has tls")  # fmt: skip
    with_ca = replace(running, ca_dir="/etc/tproxy/ca")
    new, _ = reload_from(with_ca, lambda: replace(loaded, ca_dir="/etc/tproxy/ca"))
    assert new is not None and new.matcher is loaded.matcher


def test_tproxy_run_refuses_an_intercepting_policy_without_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(INTERCEPTING)
    assert _run(["run", "--policy", str(policy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(
        "tproxy: error: policy rule 'inspect' has tls = \"intercept\", but no --ca"
    )
    assert err.count("\n") == 1


# --- --upstream-ca -------------------------------------------------------------------------


def test_an_upstream_ca_bundle_is_checked_when_loaded(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError) as raised:
        check_upstream_ca(str(missing))
    assert str(raised.value) == f"--upstream-ca {missing}: no such file"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"--upstream-ca .*junk.pem: not a PEM file of CA"):
        check_upstream_ca(str(junk))
    with pytest.raises(ConfigError, match="cannot read it"):
        check_upstream_ca(str(tmp_path))  # a directory


def test_tproxy_run_refuses_a_bad_upstream_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert _run(["run", "--upstream-ca", str(junk)]) == 1
    assert capsys.readouterr().err.startswith(f"tproxy: error: --upstream-ca {junk}: not a PEM")


def test_the_handshake_timeout_defaults_to_ten_seconds() -> None:
    assert ProxyConfig().tls_handshake_timeout_s == 10.0
    assert ProxyConfig().upstream_ca is None
