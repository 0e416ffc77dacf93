"""What each session is, read from its first bytes as they pass through the router: TLS with its
server name and ALPN, HTTP with its Host, and a client that says nothing. Issue 10, first step:
no policy yet, so nothing waits for the facts; they are recorded on the close event."""

from __future__ import annotations

import pytest

from tests.integration.conftest import apply_rules, client_json, curl, start_proxy
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import HTTP_PORT, PEER_PORT, TLS_PORT, start_tls_server
from tproxy.lab.services import TLS_NAME as NAME
from tproxy.lab.topology import Lab


@pytest.mark.parametrize("family", [4, 6])
def test_tls_and_http_sessions_say_what_they_are(served_lab: Lab, family: int) -> None:
    lab = served_lab
    start_tls_server(lab, lab.server)
    apply_rules(lab, "--ports", f"{HTTP_PORT},{TLS_PORT}")
    proxy = start_proxy(lab, default_workers=True)  # what users run: a worker per CPU
    server = lab.server.ipv4 if family == 4 else lab.server.ipv6
    resolved = f"{NAME}:{TLS_PORT}:{server if family == 4 else f'[{server}]'}"
    argv = ["curl", "-sS", "-k", "--max-time", "10", "--resolve", resolved, "-o", "/dev/null",
            "-w", "%{http_code} %{http_version}", f"https://{NAME}/"]  # fmt: skip
    result = lab.run(lab.client, argv, check=False)
    assert result.stdout.decode().startswith("200 "), result.stderr.decode()
    http = lab.server.endpoint(HTTP_PORT, family)
    argv = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-H",
            "Host: Site.Example.TEST:8080", f"http://{http}/"]  # fmt: skip
    assert lab.run(lab.client, argv, check=False).returncode == 0

    closes = proxy.wait_for(lambda e: e.get("event") == "session_close", "2 closes", count=2)
    tls, plain = closes
    assert tls["dst"] == str(lab.server.endpoint(TLS_PORT, family))
    assert (tls["proto"], tls["sni"], tls["alpn"]) == ("tls", NAME, ["h2", "http/1.1"])
    assert (tls["tls_offered"], tls["ech"], tls["http_host"]) == ("1.3", False, None)
    assert (plain["proto"], plain["http_host"], plain["http_method"]) == (
        "http", "site.example.test", "GET",
    )  # fmt: skip
    assert (plain["sni"], plain["alpn"]) == (None, None)
    assert all(c["reason"] == "closed" and c["relay"] == "splice" for c in closes)


def test_a_client_that_says_nothing_is_silent_and_a_refused_one_has_no_proto(
    served_lab: Lab,
) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", f"{PEER_PORT},81")
    proxy = start_proxy(lab)
    # Connects, sends nothing, gives up after a second: the peer server waits for a request.
    quiet = client_json(lab, ["probe", str(lab.server.endpoint(PEER_PORT)), "--timeout", "1"])
    assert quiet["connect"] == "ok", quiet
    refused = client_json(lab, ["probe", str(lab.server.endpoint(81)), "--send", "GET /\r\n"])
    assert refused["read"] in ("ECONNRESET", "ECONNREFUSED"), refused
    closes = proxy.wait_for(lambda e: e.get("event") == "session_close", "2 closes", count=2)
    by_port = {c["dst"].rsplit(":", 1)[1]: c for c in closes}
    assert by_port[str(PEER_PORT)]["proto"] == "silent"
    assert (by_port["81"]["reason"], by_port["81"]["proto"]) == ("upstream_refused", None)


def test_the_text_log_quotes_what_the_client_named(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(HTTP_PORT))
    proxy = ProxyProcess(lab, lab.router, ["--workers", "1"], log_format="text")
    proxy.wait_for(lambda e: " listening on " in e.get("line", ""), "tproxy to listen")
    code, _ = curl(lab, f"http://{lab.server.endpoint(HTTP_PORT)}/")
    assert code == 200
    line = proxy.wait_for(lambda e: " closed (" in e.get("line", ""), "the text close line")[0]
    host = lab.server.ipv4
    assert f', splice, http "GET" host="{host}", 0 active sessions' in line["line"]
