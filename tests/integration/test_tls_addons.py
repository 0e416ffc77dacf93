"""The plaintext of intercepted sessions goes where bytes go (issue 13), on the real path with the
default workers: curl trusting our CA through the router to nginx over TLS. The example addons
see it -- `http_log.py` logs the request line and status, `rewrite_response.py` changes the
body's length and adds its header, curl reads the page whole -- and a capturing rule's pcapng
holds the plaintext on the original ports, as tshark reads it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tests.integration.conftest import apply_rules, tproxy_cli
from tests.integration.test_addon_examples import EXAMPLES
from tests.unit.test_capture_pcapng import followed, tshark
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import TLS_NAME, TLS_PORT, start_tls_nginx
from tproxy.lab.topology import Lab

POLICY = f"""
[[rule]]
name = "inspect"
sni = ["{TLS_NAME}"]
action = "allow"
tls = "intercept"
capture = true
"""


def _proxy(lab: Lab, server_cert: Path, *examples: str, **env: str) -> tuple[ProxyProcess, Path]:
    """`tproxy run` with the default workers, a fresh CA, the policy above (captures into a
    directory of its own), the examples as addons and `env` in its environment; our CA's
    certificate (for curl) and the capture directory."""
    folder = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-tls-addons-"))
    lab.cleanup_paths.append(folder)
    tproxy_cli(lab, lab.router, "ca", "create", str(folder / "ca"))
    (folder / "policy.toml").write_text(POLICY)
    captures = folder / "captures"
    captures.mkdir(mode=0o700)
    args = ["--ca", str(folder / "ca"), "--upstream-ca", str(server_cert), "--policy",
            str(folder / "policy.toml"), "--capture-dir", str(captures)]  # fmt: skip
    for name in examples:
        args += ["--addon", str(EXAMPLES / name)]
    wrapper = ["env", *(f"{name}={value}" for name, value in env.items())]
    proxy = ProxyProcess(lab, lab.router, args, wrapper=wrapper)
    proxy.wait_listening()
    return proxy, folder / "ca" / "ca.crt"


def _curl(lab: Lab, ca: Path, *options: str) -> tuple[str, str, str]:
    """curl -v --cacert CA https://NAME/: (status, body, curl's stderr)."""
    argv = ["curl", "-sS", "-v", "--max-time", "10", "--http1.1", "--cacert", str(ca),
            "-w", "\n%{http_code}", "--resolve", f"{TLS_NAME}:{TLS_PORT}:{lab.server.ipv4}",
            *options, f"https://{TLS_NAME}:{TLS_PORT}/"]  # fmt: skip
    done = lab.run(lab.client, argv, check=False)
    body, _, status = done.stdout.decode(errors="replace").rpartition("\n")
    return status, body, done.stderr.decode(errors="replace")


def _close(proxy: ProxyProcess) -> dict[str, Any]:
    [close] = proxy.wait_for(lambda e: e.get("event") == "session_close", "the close")
    return close


def test_the_example_addons_see_and_rewrite_the_plaintext_of_an_intercepted_session(
    lab: Lab,
) -> None:
    server_cert = start_tls_nginx(lab, lab.server)
    apply_rules(lab, "--ports", str(TLS_PORT))
    log = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-http-log-")) / "http.log"
    lab.cleanup_paths.append(log.parent)
    proxy, ca = _proxy(lab, server_cert, "http_log.py", "rewrite_response.py",
                       TPROXY_HTTP_LOG=str(log), TPROXY_REWRITE_FROM="hello",
                       TPROXY_REWRITE_TO="a much longer greeting")  # fmt: skip
    status, body, stderr = _curl(lab, ca, "-H", "X-Probe: 1")
    assert status == "200", stderr
    assert "issuer: CN=tproxy interception CA" in stderr, stderr  # decrypted by us
    assert body.startswith("a much longer greeting from the server"), body
    assert "< X-Rewritten-By: tproxy" in stderr, stderr
    close = _close(proxy)
    assert (close["reason"], close["relay"], close["tls_intercepted"]) == (
        "closed", "addon", True,
    ), close  # fmt: skip
    assert [Path(a).name for a in close["addons"]] == ["http_log.py", "rewrite_response.py"]
    # The request line as the client sent it inside TLS, and the status nginx answered.
    [line] = log.read_text().splitlines()
    assert line.endswith(f'-> {lab.server.ipv4}:{TLS_PORT} "GET / HTTP/1.1" 200'), line
    assert close["session"] in line, line


def test_a_capture_of_an_intercepted_session_holds_its_plaintext_on_the_original_ports(
    lab: Lab,
) -> None:
    server_cert = start_tls_nginx(lab, lab.server)
    apply_rules(lab, "--ports", str(TLS_PORT))
    proxy, ca = _proxy(lab, server_cert)
    status, body, stderr = _curl(lab, ca)
    assert status == "200", stderr
    close = _close(proxy)
    assert (close["relay"], close["tls_intercepted"]) == ("tls", True), close
    capture = Path(close["capture"])
    # tshark sees a TCP conversation between the client and the original destination, and
    # inside it the plaintext: the request up, nginx's response down.
    conversation = tshark(capture, "-T", "fields", "-e", "ip.src", "-e", "tcp.srcport",
                          "-e", "ip.dst", "-e", "tcp.dstport", "-c", "1")  # fmt: skip
    assert conversation.split()[2:] == [str(lab.server.ipv4), str(TLS_PORT)], conversation
    up, down = followed(tshark(capture, "-q", "-z", "follow,tcp,raw,0"))
    assert up.startswith(b"GET / HTTP/1.1\r\nHost: " + TLS_NAME.encode()), up
    assert down.startswith(b"HTTP/1.1 200 OK\r\n") and body.encode() in down, down
