"""The addon API: verdicts checked as the policy checks `to` and `via` (a bad target fails when
the verdict is made, with a message naming it), the hooks' names, a documented `Session`
protocol that a plain class satisfies, and the sniffed facts as an addon reads them."""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import pytest

from tproxy.addons import api
from tproxy.addons.api import (
    HOOK_PARAMETERS,
    HOOKS,
    Action,
    Address,
    HostPort,
    Session,
    Sniffed,
    Verdict,
    allow,
    redirect,
    reset,
    via,
)
from tproxy.sniffers.classify import classify
from tproxy.sniffers.facts import SshBanner, TlsHello


def test_the_hooks_in_the_order_a_session_meets_them() -> None:
    assert HOOKS == (
        "session_start",
        "client_data",
        "server_data",
        "client_eof",
        "server_eof",
        "session_end",
    )
    assert tuple(HOOK_PARAMETERS) == HOOKS
    assert {HOOK_PARAMETERS[name] for name in ("client_data", "server_data")} == {
        ("session", "data")
    }


# --- verdicts --------------------------------------------------------------------------------


def test_allow_and_reset() -> None:
    assert allow() == Verdict(Action.ALLOW)
    assert reset() == Verdict(Action.RESET)
    assert (str(allow()), str(reset())) == ("allow", "reset")


@pytest.mark.parametrize(
    ("target", "host", "port"),
    [
        ("198.18.2.2:9000", "198.18.2.2", 9000),
        ("[2001:db8::1]:443", "2001:db8::1", 443),
        ("backend.example:80", "backend.example", 80),
    ],
)
def test_redirect_takes_what_a_policy_to_takes(target: str, host: str, port: int) -> None:
    verdict = redirect(target)
    assert verdict == Verdict(Action.REDIRECT, to=HostPort(host, port))
    assert str(verdict) == f"redirect to {verdict.to}"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("198.18.2.2", "'198.18.2.2' is not HOST:PORT or [IPv6]:PORT"),
        ("2001:db8::1:443", "is not HOST:PORT or [IPv6]:PORT"),
        ("host:0", "port 0 out of range"),
        ("host:70000", "out of range"),
        ("a b:80", "is not HOST:PORT"),
        ("", "is not HOST:PORT"),
    ],
)
def test_a_bad_redirect_target_fails_when_the_verdict_is_made(target: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^redirect: ") as raised:
        redirect(target)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("url", "scheme", "address", "user"),
    [
        ("socks5://198.18.2.2:1080", "socks5", HostPort("198.18.2.2", 1080), None),
        ("http://u:p%40ss@proxy.example:3128", "http", HostPort("proxy.example", 3128), "u"),
        ("SOCKS5://[2001:db8::2]:1080/", "socks5", HostPort("2001:db8::2", 1080), None),
    ],
)
def test_via_takes_what_a_policy_via_takes(
    url: str, scheme: str, address: HostPort, user: str | None
) -> None:
    verdict = via(url)
    assert verdict.action is Action.VIA and verdict.via is not None
    assert (verdict.via.scheme, verdict.via.address, verdict.via.username) == (
        scheme,
        address,
        user,
    )
    assert not verdict.remote_name
    assert "p@ss" not in str(verdict) and "p@ss" not in repr(verdict)


def test_via_may_ask_the_proxy_for_the_sniffed_name() -> None:
    verdict = via("socks5://198.18.2.2:1080", remote_name=True)
    assert verdict.remote_name
    assert str(verdict) == "via socks5://198.18.2.2:1080 (remote name)"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("198.18.2.2:1080", "is not a proxy URL"),
        ("ftp://198.18.2.2:21", "unknown proxy scheme 'ftp'"),
        ("socks5://198.18.2.2", "is not HOST:PORT"),
        ("socks5://user@198.18.2.2:1080", "credentials must be written user:password@"),
        (f"socks5://{'u' * 300}:p@198.18.2.2:1080", "255"),
        ("http://a%3Ab:c@198.18.2.2:3128", "without ':'"),
    ],
)
def test_a_bad_via_url_fails_when_the_verdict_is_made(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"^via: ") as raised:
        via(url)
    assert message in str(raised.value)


@pytest.mark.parametrize("make", [redirect, via])
def test_a_target_that_is_not_text_is_a_type_error(make: Any) -> None:
    with pytest.raises(TypeError, match=r"takes a .* string, not int"):
        make(443)


@pytest.mark.parametrize(
    "fields",
    [
        {"action": Action.REDIRECT},
        {"action": Action.ALLOW, "to": HostPort("198.18.2.2", 80)},
        {"action": Action.VIA},
        {"action": Action.RESET, "remote_name": True},
    ],
)
def test_a_verdict_made_by_hand_must_hold_together(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Verdict(**fields)


def test_a_verdict_is_immutable() -> None:
    verdict = redirect("198.18.2.2:80")
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.to = None  # type: ignore[misc]


# --- the Session protocol --------------------------------------------------------------------

SESSION_MEMBERS = {
    "id", "client", "dst", "rule", "action", "sniffed", "tls", "bytes_up", "bytes_down",
    "reason", "state", "claim", "send_to_client", "send_to_upstream", "close", "reset",
}  # fmt: skip


def test_every_session_member_is_there_and_documented() -> None:
    members = {
        name: value
        for name, value in vars(Session).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    }
    assert set(members) == SESSION_MEMBERS
    for name, value in members.items():
        assert inspect.getdoc(value), f"Session.{name} has no docstring"


class _PlainSession:
    """What the engine will hand hooks: plain attributes satisfy the protocol's properties."""

    def __init__(self) -> None:
        self.id = "01kbj9dq70001"
        self.client: Address = ("198.18.1.2", 40000)
        self.dst: Address = ("198.18.2.2", 443)
        self.rule: str | None = None
        self.action = "allow"
        self.sniffed: Sniffed | None = None
        self.tls: api.InterceptedTLS | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.reason: str | None = None
        self.state: dict[str, Any] = {}
        self.sent: list[tuple[str, bytes]] = []

    def claim(self) -> None:
        self.sent.append(("claim", b""))

    def send_to_client(self, data: bytes) -> None:
        self.sent.append(("client", data))

    def send_to_upstream(self, data: bytes) -> None:
        self.sent.append(("upstream", data))

    def close(self) -> None:
        self.sent.append(("close", b""))

    def reset(self) -> None:
        self.sent.append(("reset", b""))


def _session_start(session: Session) -> Verdict | None:
    """An addon's hook, type-checked against the protocol (mypy runs on the tests)."""
    session.state["seen"] = True
    session.claim()
    if session.sniffed is not None and session.sniffed.sni == "ads.example":
        return reset()
    return None


def test_a_plain_class_is_a_session() -> None:
    session = _PlainSession()
    assert _session_start(session) is None
    session.sniffed = Sniffed("tls", TlsHello("ads.example", ("h2",), "1.3", ech=False))
    assert _session_start(session) == reset()
    assert session.state == {"seen": True}
    assert session.sent == [("claim", b""), ("claim", b"")]


def test_the_module_says_what_it_exports() -> None:
    assert all(hasattr(api, name) for name in api.__all__)


# --- sniffed facts, as an addon reads them ----------------------------------------------------


def test_tls_facts() -> None:
    sniffed = Sniffed("tls", TlsHello("www.example", ("h2", "http/1.1"), "1.3", ech=True))
    assert (sniffed.proto, sniffed.sni, sniffed.alpn, sniffed.tls_offered, sniffed.ech) == (
        "tls",
        "www.example",
        ("h2", "http/1.1"),
        "1.3",
        True,
    )
    assert sniffed.http_host is None and sniffed.http_method is None


def test_http_facts_from_real_bytes() -> None:
    sniffed = classify(b"POST /up HTTP/1.1\r\nHost: Upload.Example:8080\r\n\r\n")
    assert isinstance(sniffed, Sniffed)
    assert (sniffed.proto, sniffed.http_host, sniffed.http_method) == (
        "http",
        "upload.example",
        "POST",
    )
    assert (sniffed.sni, sniffed.alpn, sniffed.tls_offered, sniffed.ech) == (None,) * 4


@pytest.mark.parametrize(
    "sniffed", [Sniffed("ssh", SshBanner("SSH-2.0-x")), Sniffed("unknown"), Sniffed("silent")]
)
def test_other_protocols_have_none_of_the_facts(sniffed: Sniffed) -> None:
    facts = (sniffed.sni, sniffed.alpn, sniffed.tls_offered, sniffed.ech, sniffed.http_host,
             sniffed.http_method)  # fmt: skip
    assert facts == (None,) * 6
