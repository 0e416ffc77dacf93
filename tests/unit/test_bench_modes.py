from __future__ import annotations

import dataclasses
import ipaddress
import os
import ssl
import sys
from pathlib import Path
from typing import Any

import pytest
from bench.clients import client_addresses
from bench.measure import HTTP_PORT, HTTPS_SCRIPT, TLS_PORT, parse_wrk, render_wrk_argv, wrk_url
from bench.mitm import ensure_mitmdump, render_mitmdump_argv, render_mitmproxy_ca, venv_dir
from bench.modes import (
    BULK,
    CONN_RATE,
    LATENCY,
    SPECS,
    STREAM1,
    TLS_CONN_RATE,
    TLS_KEEPALIVE,
    TLS_NAME,
    Interception,
    addon_path,
    cpus,
    render_haproxy_cfg,
    render_tls_policy,
    render_tproxy_argv,
)
from bench.policy import NAME_RULES, RULES, render_policy
from bench.report import (
    ADDON_CONTEXT,
    ADDON_TARGETS,
    CAPTURE_CONTEXT,
    CAPTURE_TARGETS,
    CONTEXT,
    INTERCEPT_CONTEXT,
    INTERCEPT_TARGETS,
    MODES,
    POLICY_TARGETS,
    TARGETS,
)

from tproxy.addons.loader import load_addon_file
from tproxy.lab.topology import Lab
from tproxy.policy.decide import SessionFacts, SniffedFacts, decide
from tproxy.policy.matcher import Matcher, Waiting, address_of
from tproxy.policy.model import Action, TLSMode, parse_policy
from tproxy.sniffers.facts import HttpRequest
from tproxy.sniffers.http import sniff_http
from tproxy.tls.ca import create_ca


def _measures(mode: str, metric: str) -> bool:
    """Whether the mode's tests produce the metric (CPU per connection: a proxy's conn/s)."""
    spec = SPECS[mode]
    if metric in ("stream1_up", "stream1_down", "cpu_per_gib"):
        return bool({BULK, STREAM1} & spec.tests) and (
            metric != "cpu_per_gib" or spec.proxy != "routing"
        )
    if metric.startswith("stream"):
        return BULK in spec.tests
    if metric == "cpu_per_conn":
        return CONN_RATE in spec.tests and spec.proxy != "routing"
    if metric in ("tls_conn_rate", "tls_cpu_per_conn"):
        return TLS_CONN_RATE in spec.tests
    if metric == "tls_rss":
        return bool(spec.tls)
    if metric in ("tls_keepalive_rps", "tls_cpu_per_request"):
        return TLS_KEEPALIVE in spec.tests
    return (LATENCY if metric.startswith("latency") else metric) in spec.tests


def test_every_mode_has_a_spec_and_every_comparison_is_measured_on_both_sides() -> None:
    assert set(SPECS) == set(MODES)
    for comparison in [*TARGETS, *POLICY_TARGETS, *CAPTURE_TARGETS, *CAPTURE_CONTEXT,
                       *ADDON_TARGETS, *ADDON_CONTEXT, *INTERCEPT_TARGETS, *INTERCEPT_CONTEXT,
                       *CONTEXT]:  # fmt: skip
        assert _measures(comparison.subject, comparison.metric), comparison
        if comparison.versus is not None:
            assert _measures(comparison.versus, comparison.metric), comparison


def test_the_policy_mode_is_tproxy_splice_plus_the_policy_running_what_its_rows_need() -> None:
    splice, policy = SPECS["tproxy-splice"], SPECS["tproxy-policy"]
    assert (policy.proxy, policy.splice, policy.log) == (splice.proxy, splice.splice, splice.log)
    assert policy.policy and not splice.policy
    assert policy.tests == {STREAM1, CONN_RATE}


def test_the_capture_modes_differ_from_their_references_only_in_capturing() -> None:
    copy, capture = SPECS["tproxy-copy"], SPECS["tproxy-capture"]
    assert (capture.proxy, capture.log, capture.capture) == (copy.proxy, copy.log, "all")
    assert capture.tests == {STREAM1} and BULK in copy.tests
    policy, configured = SPECS["tproxy-policy"], SPECS["tproxy-policy-capture"]
    assert dataclasses.replace(configured, capture="", tests=policy.tests) == policy
    assert configured.tests == {CONN_RATE}


def test_the_addon_modes_are_tproxy_splice_plus_an_addon_running_what_their_rows_need() -> None:
    splice = SPECS["tproxy-splice"]
    unclaimed, identity = SPECS["tproxy-addon"], SPECS["tproxy-addon-identity"]
    for spec in (unclaimed, identity):
        assert dataclasses.replace(spec, addon="", tests=splice.tests) == splice
    assert unclaimed.addon == "unclaimed" and unclaimed.tests == {STREAM1, CONN_RATE}
    assert identity.addon == "identity" and identity.tests == {STREAM1}


def test_a_tproxy_modes_command_line() -> None:
    assert render_tproxy_argv(SPECS["tproxy-splice"], 2) == [
        sys.executable, "-m", "tproxy", "run", "--log-format", "json", "--spoof-source",
        "--relay", "splice", "--workers", "2",
    ]  # fmt: skip
    addon = render_tproxy_argv(SPECS["tproxy-addon"], 2)
    assert addon == [*render_tproxy_argv(SPECS["tproxy-splice"], 2), "--addon",
                     str(addon_path("unclaimed"))]  # fmt: skip
    assert Path(addon[-1]).is_file() and Path(addon[-1]).is_absolute()
    capture = render_tproxy_argv(SPECS["tproxy-policy-capture"], 2, Path("/p.toml"), Path("/c"))
    assert capture[-6:] == ["--policy", "/p.toml", "--capture-dir", "/c",
                            "--capture-max-bytes", "1T"]  # fmt: skip
    assert render_tproxy_argv(SPECS["tproxy-capture"], 1, None, Path("/c"))[-1] == "--capture-all"


class _Session:
    """What the bench addons touch of a session."""

    def __init__(self) -> None:
        self.claims = 0
        self.state: dict[str, Any] = {}

    def claim(self) -> None:
        self.claims += 1


def test_the_unclaimed_addon_has_start_and_end_and_claims_nothing() -> None:
    (addon,) = load_addon_file(str(addon_path("unclaimed")))
    assert [hook.name for hook in addon.hooks] == ["session_start", "session_end"]
    assert not addon.sniff and not any(hook.is_async for hook in addon.hooks)
    session = _Session()
    assert [hook.fn(session) for hook in addon.hooks] == [None, None]
    assert session.claims == 0


def test_the_identity_addon_claims_every_session_and_passes_each_chunk_unchanged() -> None:
    (addon,) = load_addon_file(str(addon_path("identity")))
    hooks = {hook.name: hook.fn for hook in addon.hooks}
    assert list(hooks) == ["session_start", "client_data", "server_data"]
    assert not addon.sniff
    session = _Session()
    assert hooks["session_start"](session) is None
    assert session.claims == 1
    chunk = bytes(range(256)) * 256
    assert hooks["client_data"](session, chunk) is chunk
    assert hooks["server_data"](session, b"") == b""


def test_the_capturing_bench_policy_is_the_bench_policy_capturing_on_rules_it_never_meets() -> None:
    plain, capturing = parse_policy(render_policy()), parse_policy(render_policy(capture=True))
    assert [dataclasses.replace(r, capture=False) for r in capturing.rules] == list(plain.rules)
    captured = [r for r in capturing.rules if r.capture]
    assert len(captured) == 22 and {r.action for r in captured} == {Action.REDIRECT}
    # Every benchmark connection goes to the server: none of those rules is its verdict.
    server = Lab().server.ipv4
    matcher = Matcher(capturing)
    for client in client_addresses(4):
        waiting = matcher.first(address_of(ipaddress.ip_address(client)), address_of(server),
                                HTTP_PORT)  # fmt: skip
        assert isinstance(waiting, Waiting)
        verdict = matcher.with_facts(waiting, address_of(ipaddress.ip_address(client)),
                                     address_of(server), HTTP_PORT,
                                     SniffedFacts("http", None, str(server)))  # fmt: skip
        assert (verdict.action, verdict.capture) == (Action.ALLOW, False)


def _wrk_host_sniffed() -> str:
    """The Host wrk sends (its URL's host:port), as tproxy's sniffer reads it."""
    host_header = wrk_url(Lab()).split("/")[2]
    head = f"GET / HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n"
    found = sniff_http(head.encode())
    assert isinstance(found, HttpRequest) and found.host is not None
    return found.host


def test_the_bench_policy_has_50_rules_and_sniffs_every_bench_connection_then_allows_it() -> None:
    policy = parse_policy(render_policy())
    assert len(policy.rules) == RULES == 50
    assert [rule.needs_facts for rule in policy.rules] == [False] * 45 + [True] * NAME_RULES
    assert {rule.action for rule in policy.rules[:45]} == {Action.RESET, Action.REDIRECT}
    server = Lab().server.ipv4
    host = _wrk_host_sniffed()
    assert host == str(server)
    matcher = Matcher(policy)
    for client in client_addresses(4):
        facts = SessionFacts(ipaddress.ip_address(client), server, HTTP_PORT)
        first = decide(policy, facts)
        assert first.need_facts and first.waiting_for == "names-1"
        sniffed = SniffedFacts("http", None, host)
        final = decide(policy, SessionFacts(facts.client, server, HTTP_PORT, sniffed))
        assert (final.action, final.rule, final.need_facts) == (Action.ALLOW, None, False)
        # The engine's compiled matcher agrees.
        waiting = matcher.first(address_of(facts.client), address_of(server), HTTP_PORT)
        assert isinstance(waiting, Waiting) and waiting.rule == "names-1"
        verdict = matcher.with_facts(
            waiting, address_of(facts.client), address_of(server), HTTP_PORT, sniffed
        )
        assert (verdict.action, verdict.rule) == (Action.ALLOW, None)


def test_the_bench_policy_address_rules_decide_their_own_traffic_without_waiting() -> None:
    """The 45 address rules are live rules: a session to their addresses is decided by one of
    them at accept (the first that matches: some networks overlap)."""
    policy = parse_policy(render_policy())
    client = ipaddress.ip_address(client_addresses(4)[0])
    for rule in policy.rules[:45]:
        assert rule.dst is not None
        port = rule.ports[0].first if rule.ports else 443
        verdict = decide(policy, SessionFacts(client, rule.dst[-1].network_address, port))
        assert verdict.rule is not None and verdict.rule.startswith("addr-")
        assert not verdict.need_facts


def test_the_connection_rate_runs_with_and_without_logs_and_both_splice_modes() -> None:
    variants = {(s.proxy, s.splice, s.log) for s in SPECS.values() if CONN_RATE in s.tests}
    for splice in ("forced", "auto"):
        assert {("haproxy", splice, True), ("haproxy", splice, False)} <= variants
    assert {("tproxy", "splice", True), ("tproxy", "splice", False)} <= variants


def test_threads_follow_the_cpus_this_process_may_use() -> None:
    assert cpus() == len(os.sched_getaffinity(0))


def test_haproxy_threads_splice_and_logging_are_explicit() -> None:
    logged = render_haproxy_cfg(3, "forced", log=True).splitlines()
    assert "    nbthread 3" in logged
    assert "    log stdout format raw local0" in logged
    assert {"    log global", "    option tcplog"} <= set(logged)
    assert {"    option splice-request", "    option splice-response"} <= set(logged)
    quiet = render_haproxy_cfg(3, "auto", log=False)
    assert "    option splice-auto\n" in quiet
    assert "log" not in quiet
    assert "splice-request" not in quiet


def test_the_interception_modes_run_the_two_https_tests_and_differ_only_in_what_they_are() -> None:
    intercept, passthrough = SPECS["tproxy-intercept"], SPECS["tproxy-tls-passthrough"]
    mitmproxy = SPECS["mitmproxy"]
    for spec in (intercept, passthrough, mitmproxy):
        assert spec.tests == {TLS_CONN_RATE, TLS_KEEPALIVE}
    # tproxy as tproxy-splice runs, plus the rule: intercepting or passing the same HTTPS.
    splice = SPECS["tproxy-splice"]
    assert dataclasses.replace(intercept, tls="", tests=splice.tests) == splice
    assert dataclasses.replace(intercept, tls="passthrough") == passthrough
    assert (mitmproxy.proxy, mitmproxy.tls, mitmproxy.log) == ("mitmproxy", "intercept", False)
    # No other mode speaks HTTPS: the full run's other rows are unchanged.
    assert {name for name, spec in SPECS.items() if spec.tls} == {
        "tproxy-intercept", "tproxy-tls-passthrough", "mitmproxy"
    }  # fmt: skip


@pytest.mark.parametrize("tls", ["intercept", "passthrough"])
def test_the_interception_policy_gives_the_bench_name_its_tls_and_allows_the_rest(
    tls: str,
) -> None:
    policy = parse_policy(render_tls_policy(tls))
    (rule,) = policy.rules
    assert (rule.action, rule.tls) == (Action.ALLOW, TLSMode(tls))
    client, server = ipaddress.ip_address(client_addresses(4)[0]), Lab().server.ipv4
    facts = SessionFacts(client, server, TLS_PORT, SniffedFacts("tls", TLS_NAME, None))
    verdict = decide(policy, facts)
    assert (verdict.action, verdict.rule) == (Action.ALLOW, "bench-https")
    other = SessionFacts(client, server, TLS_PORT, SniffedFacts("tls", "www.example.test", None))
    assert decide(policy, other).rule is None


def test_the_interception_modes_command_lines() -> None:
    tls = Interception(Path("/ca"), Path("/server.crt"), Path("/venv/bin/mitmdump"))
    base = render_tproxy_argv(SPECS["tproxy-splice"], 2)
    intercept = render_tproxy_argv(SPECS["tproxy-intercept"], 2, Path("/p.toml"), None, tls)
    assert intercept == [*base, "--policy", "/p.toml", "--ca", "/ca", "--upstream-ca",
                         "/server.crt"]  # fmt: skip
    passthrough = render_tproxy_argv(SPECS["tproxy-tls-passthrough"], 2, Path("/p.toml"))
    assert passthrough == [*base, "--policy", "/p.toml"]
    mitmdump = render_mitmdump_argv(Path("/venv/bin/mitmdump"), Path("/conf"), Path("/s.crt"), 1800)
    assert mitmdump == [
        "/venv/bin/mitmdump", "--mode", "transparent", "--listen-port", "1800",
        "--set", "confdir=/conf", "--set", "ssl_verify_upstream_trusted_ca=/s.crt", "-q",
    ]  # fmt: skip


def test_mitmproxys_ca_file_is_the_tproxy_cas_key_then_certificate(tmp_path: Path) -> None:
    ca = create_ca(tmp_path / "ca", hostname="bench")
    key, cert = (tmp_path / "ca" / "ca.key").read_bytes(), (tmp_path / "ca" / "ca.crt").read_bytes()
    pem = render_mitmproxy_ca(key, cert)
    assert pem.startswith(key.rstrip()) and pem.endswith(cert.rstrip() + b"\n")
    # One file holding a private key and the certificate that goes with it (as mitmproxy reads
    # it, and as ssl's load_cert_chain checks it).
    (tmp_path / "mitmproxy-ca.pem").write_bytes(pem)
    ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tmp_path / "mitmproxy-ca.pem")
    assert ca.cert_pem == cert


def test_mitmproxy_lives_in_the_benchmarks_own_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert venv_dir() == tmp_path / "tproxy-bench" / "mitmproxy"
    assert not venv_dir().is_relative_to(Path(sys.prefix))
    # Installed once: an environment that has mitmdump is used as it is.
    mitmdump = venv_dir() / "bin" / "mitmdump"
    mitmdump.parent.mkdir(parents=True)
    mitmdump.touch()
    assert ensure_mitmdump() == mitmdump


def test_wrk_asks_for_the_bench_name_over_https_and_connects_to_the_server() -> None:
    lab = Lab()
    plain = render_wrk_argv(lab, ["-c", "32"], 4)
    assert plain == ["wrk", "-t1", "-d", "4s", "-c", "32", wrk_url(lab)]
    https = render_wrk_argv(lab, ["-c", "32"], 4, https=True)
    assert https == ["env", f"WRK_CONNECT_TO={lab.server.ipv4}", "wrk", "-t1", "-d", "4s",
                     "-c", "32", "-s", str(HTTPS_SCRIPT), f"https://{TLS_NAME}/"]  # fmt: skip
    # The script replaces wrk's name lookup with the address from the environment.
    script = HTTPS_SCRIPT.read_text()
    assert "function wrk.resolve(host, service)" in script
    assert 'wrk.lookup(os.getenv("WRK_CONNECT_TO"), service)' in script
    assert TLS_NAME.endswith(".bench.test")


_WRK_OUT = """Running 4s test @ https://www.bench.test/
  1 threads and 32 connections
  2974 requests in 4.01s, 554.72KB read
  Socket errors: connect 0, read 3, write 0, timeout 1
  Non-2xx or 3xx responses: 2
Requests/sec:    741.78
Transfer/sec:    138.36KB
"""


def test_wrk_output_gives_the_rate_the_requests_and_the_failures() -> None:
    assert parse_wrk(_WRK_OUT) == {"rate": 741.78, "requests": 2974, "failed": 6}
    clean = "\n".join(line for line in _WRK_OUT.splitlines() if "errors" not in line
                      and "Non-2xx" not in line)  # fmt: skip
    assert parse_wrk(clean)["failed"] == 0
