"""TLS interception on the real path (issue 13, step 3b), default workers, real clients: curl
trusting our CA through the router to openssl s_server in the server namespace gets the page
over a certificate our CA issued for the name, and `--keylog` gets both legs' secrets; a client
that does not trust our CA fails its handshake, and with `passthrough_on_client_reject` its next
connection to that name reaches the real server's certificate; an upstream whose certificate
does not verify resets the client (`upstream_cert_invalid`) unless the rule says
`upstream_verify = false`; a session no intercept rule matches is never decrypted."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.integration.conftest import apply_rules, start_proxy, tproxy_cli
from tests.unit.test_capture_pcapng import tshark
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import TLS_NAME, TLS_PORT, start_tls_nginx, start_tls_server
from tproxy.lab.topology import Host, Lab

POLICY = """
[[rule]]
name = "inspect"
sni = ["{name}"]
action = "allow"
tls = "intercept"
{extra}
"""


def _files(lab: Lab) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-tls-"))
    lab.cleanup_paths.append(folder)
    return folder


def _proxy(
    lab: Lab, *, upstream_ca: Path | None, extra: str = "", keylog: Path | None = None
) -> tuple[ProxyProcess, Path]:
    folder = _files(lab)
    tproxy_cli(lab, lab.router, "ca", "create", str(folder / "ca"))
    policy = folder / "policy.toml"
    policy.write_text(POLICY.format(name=TLS_NAME, extra=extra))
    args = ["--ca", str(folder / "ca"), "--policy", str(policy)]
    if upstream_ca is not None:
        args += ["--upstream-ca", str(upstream_ca)]
    if keylog is not None:
        args += ["--keylog", str(keylog)]
    return start_proxy(lab, *args, default_workers=True), folder / "ca" / "ca.crt"


def _curl(lab: Lab, *options: str, name: str = TLS_NAME, family: int = 4) -> Any:
    """curl -v https://NAME/ to the server's address (`--resolve`): the completed process."""
    address = lab.server.ipv4 if family == 4 else f"[{lab.server.ipv6}]"
    argv = ["curl", "-sS", "-v", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
            "--resolve", f"{name}:{TLS_PORT}:{address}", *options,
            f"https://{name}:{TLS_PORT}/"]  # fmt: skip
    return lab.run(lab.client, argv, check=False)


def _closes(proxy: ProxyProcess, count: int) -> list[dict[str, Any]]:
    return proxy.wait_for(lambda e: e.get("event") == "session_close", f"{count} closes",
                          count=count)  # fmt: skip


def test_curl_trusting_our_ca_gets_the_page_over_our_certificate_v4_and_v6(lab: Lab) -> None:
    server_cert = start_tls_server(lab, lab.server)
    apply_rules(lab, "--ports", str(TLS_PORT))
    keylog = _files(lab) / "keys.log"
    proxy, ca = _proxy(lab, upstream_ca=server_cert, keylog=keylog)
    for family in (4, 6):
        done = _curl(lab, "--cacert", str(ca), family=family)
        stderr = done.stderr.decode(errors="replace")
        assert done.stdout.decode() == "200", stderr
        assert "issuer: CN=tproxy interception CA" in stderr, stderr
        assert f'subjectAltName: host "{TLS_NAME}" matched' in stderr, stderr
    closes = _closes(proxy, 2)
    for close in closes:
        assert (close["reason"], close["relay"], close["tls_intercepted"]) == (
            "closed", "tls", True,
        ), close  # fmt: skip
        assert close["client_tls"]["version"] in ("TLSv1.3", "TLSv1.2"), close
        upstream = close["upstream_tls"]
        assert upstream["subject"] == f"CN={TLS_NAME}" and upstream["verified"] is True, close
        assert close["bytes_down"] > 0 and close["sni"] == TLS_NAME
    # Both legs of both sessions in the key log (TLS 1.3's label, or TLS 1.2's), 0600.
    assert stat.S_IMODE(keylog.stat().st_mode) == 0o600
    lines = [line.split() for line in keylog.read_text().splitlines() if line[:1] != "#"]
    randoms = {w[1] for w in lines if w[0] in ("CLIENT_TRAFFIC_SECRET_0", "CLIENT_RANDOM")}
    assert len(randoms) == 4, lines


def test_an_upstream_that_does_not_verify_resets_the_client_unless_the_rule_says_not_to(
    lab: Lab,
) -> None:
    start_tls_server(lab, lab.server)  # self-signed: not in the system's store
    apply_rules(lab, "--ports", str(TLS_PORT))
    proxy, ca = _proxy(lab, upstream_ca=None)
    refused = _curl(lab, "--cacert", str(ca))
    assert refused.returncode != 0, refused.stderr
    close = _closes(proxy, 1)[0]
    assert (close["reason"], close["tls_intercepted"]) == ("upstream_cert_invalid", False)
    assert "certificate" in close["upstream_tls"]["error"], close
    proxy.stop()

    lax, ca = _proxy(lab, upstream_ca=None, extra="upstream_verify = false")
    done = _curl(lab, "--cacert", str(ca))
    assert done.stdout.decode() == "200", done.stderr
    close = _closes(lax, 1)[0]
    assert (close["reason"], close["tls_intercepted"]) == ("closed", True)
    assert close["upstream_tls"]["verified"] is False  # said on every such session


def test_a_client_rejecting_our_ca_then_passes_through_and_others_are_never_decrypted(
    lab: Lab,
) -> None:
    server_cert = start_tls_server(lab, lab.server)
    apply_rules(lab, "--ports", str(TLS_PORT))
    proxy, _ = _proxy(lab, upstream_ca=server_cert, extra="passthrough_on_client_reject = true")
    # Without our CA: the handshake fails on the client's side.
    rejected = _curl(lab, "--cacert", str(server_cert))
    assert rejected.returncode != 0, rejected.stderr
    first = _closes(proxy, 1)[0]
    assert (first["reason"], first["tls_intercepted"]) == ("client_tls_failed", False), first
    assert first["client_tls"]["rejected"], first
    # Its next connection to that name is passed through: the real server's certificate.
    passed = _curl(lab, "--cacert", str(server_cert))
    stderr = passed.stderr.decode(errors="replace")
    assert passed.stdout.decode() == "200", stderr
    assert f"issuer: CN={TLS_NAME}" in stderr, stderr
    # Another name matches no intercept rule: never decrypted either.
    other = _curl(lab, "-k", name="other.example.test")
    assert other.stdout.decode() == "200", other.stderr
    closes = _closes(proxy, 3)
    by_sni = {c["sni"]: c for c in closes[1:]}
    assert (by_sni[TLS_NAME]["passthrough"], by_sni[TLS_NAME]["tls_intercepted"]) == (
        "client_rejected", None,
    )  # fmt: skip
    assert by_sni[TLS_NAME]["relay"] == "splice"
    assert by_sni["other.example.test"]["relay"] == "splice"
    assert by_sni["other.example.test"]["tls_intercepted"] is None
    notices = [n["message"] for n in proxy.named("notice")]
    assert any(f"{TLS_NAME} passes through" in n for n in notices), notices


def test_http2_through_interception_with_alpn_h2_end_to_end(lab: Lab) -> None:
    """curl --http2 against nginx (h2 and http/1.1): the client and the upstream legs both
    negotiate h2 (tproxy offers the client's list and presents what the upstream chose), and
    the page comes over HTTP/2."""
    server_cert = start_tls_nginx(lab, lab.server)
    apply_rules(lab, "--ports", str(TLS_PORT))
    proxy, ca = _proxy(lab, upstream_ca=server_cert)
    for option, alpn in (("--http2", "h2"), ("--http1.1", "http/1.1")):
        done = _curl(lab, "--cacert", str(ca), option)
        stderr = done.stderr.decode(errors="replace")
        assert done.stdout.decode() == "200", stderr
        assert (
            f"ALPN: server accepted {alpn}" in stderr
            or f"ALPN, server accepted to use {alpn}" in stderr
        ), stderr
    closes = _closes(proxy, 2)
    alpns = sorted((c["client_tls"]["alpn"], c["upstream_tls"]["alpn"]) for c in closes)
    assert alpns == [("h2", "h2"), ("http/1.1", "http/1.1")], closes
    # curl and nginx end without close_notify here: passed on as bare FINs, not resets.
    assert [(c["tls_intercepted"], c["reason"]) for c in closes] == [(True, "closed")] * 2


def _capture(lab: Lab, host: Host, path: Path) -> subprocess.Popen[bytes]:
    """dumpcap (tshark's capture engine) writing what crosses `host` to `path`, once it
    captures."""
    capture = lab.start(host, ["dumpcap", "-q", "-i", "any",
                               "-w", str(path)], stderr=subprocess.PIPE)  # fmt: skip
    assert capture.stderr is not None
    for line in capture.stderr:  # "Capturing on 'any'" once it listens
        if b"Capturing on" in line:
            time.sleep(2)  # (it says so as the capture opens, before packets flow into it)
            return capture
    raise AssertionError(f"dumpcap did not start capturing in {host.netns}")


def test_the_key_log_lets_tshark_decrypt_captures_taken_outside_the_proxy(lab: Lab) -> None:
    """Raw captures of the client's leg (in the client namespace) and of the upstream's (in the
    server namespace) both decrypt with `--keylog`'s file: tshark shows the request inside."""
    server_cert = start_tls_server(lab, lab.server)
    apply_rules(lab, "--ports", str(TLS_PORT))
    folder = _files(lab)
    keylog = folder / "keys.log"
    proxy, ca = _proxy(lab, upstream_ca=server_cert, keylog=keylog)
    captures = {"client": folder / "client.pcapng", "server": folder / "server.pcapng"}
    running = [_capture(lab, lab.client, captures["client"]),
               _capture(lab, lab.server, captures["server"])]  # fmt: skip
    done = _curl(lab, "--cacert", str(ca))
    assert done.stdout.decode() == "200", done.stderr
    _closes(proxy, 1)
    time.sleep(2)  # the capture ring hands packets over in blocks, not at once
    for capture in running:
        os.killpg(capture.pid, signal.SIGINT)
        capture.wait(10)
    for leg, path in captures.items():
        requests = tshark(path, "-o", f"tls.keylog_file:{keylog}", "-Y", "http.request",
                          "-T", "fields", "-e", "http.request.method",
                          "-e", "http.request.uri")  # fmt: skip
        assert requests.split() == ["GET", "/"], (leg, requests)
        # Without the key log the same capture shows no request: it was encrypted.
        assert not tshark(path, "-Y", "http.request").strip(), leg


def test_a_second_connection_to_the_same_server_resumes_its_upstream_session(lab: Lab) -> None:
    """nginx, as the benchmark's: the first intercepted connection's TLS with it is a full
    handshake, the next ones (same worker: one client) resume its session -- and the client is
    still shown our certificate for the name."""
    server_cert = start_tls_nginx(lab, lab.server)
    apply_rules(lab, "--ports", str(TLS_PORT))
    proxy, ca = _proxy(lab, upstream_ca=server_cert)
    for _ in range(3):
        done = _curl(lab, "--cacert", str(ca), "--http1.1")
        stderr = done.stderr.decode(errors="replace")
        assert done.stdout.decode() == "200", stderr
        assert "issuer: CN=tproxy interception CA" in stderr, stderr
    closes = _closes(proxy, 3)
    resumed = [c["upstream_tls"]["resumed"] for c in closes]
    assert resumed == [False, True, True], closes
    assert all(c["upstream_tls"]["verified"] for c in closes), closes
