"""The TLS passthrough memory is shared by every worker (issue 13): a name one worker learned
must not be intercepted is passed through by the other worker too, and by a worker restarted
later, on the real path with two workers.

Each client address is steered to one worker, so the test picks two client addresses that the
steering program sends to different workers, and an upstream that asks for a client certificate
(openssl s_server -Verify 1): that is remembered by name, for every client. The first client,
on one worker, makes it known (`upstream_wants_client_cert`); the second, on the other worker,
then reaches the real server, which it gives its own client certificate: the page over the
server's own certificate, the close event's `passthrough` saying why."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from tests.integration.conftest import apply_rules, client_per_worker, start_proxy, tproxy_cli
from tproxy.core.endpoint import IPAddress
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import TLS_NAME, TLS_PORT
from tproxy.lab.topology import Lab, wait_until

WORKERS = 2
POLICY = f"""
[[rule]]
name = "inspect"
sni = ["{TLS_NAME}"]
action = "allow"
tls = "intercept"
"""


def _server_wanting_a_client_certificate(lab: Lab, folder: Path) -> tuple[Path, Path]:
    """openssl s_server (IPv4) that requires a client certificate signed by its own
    self-signed one (so that one, with its key, is a client certificate it accepts); it answers
    any request with a status page. Returns (key, certificate)."""
    key, cert = folder / "server.key", folder / "server.crt"
    lab.run(lab.server, ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out",
                         str(cert), "-days", "1", "-subj", f"/CN={TLS_NAME}",
                         "-addext", f"subjectAltName=DNS:{TLS_NAME}"])  # fmt: skip
    lab.start(lab.server, ["openssl", "s_server", "-accept", f"0.0.0.0:{TLS_PORT}",
                           "-cert", str(cert), "-key", str(key), "-Verify", "1",
                           "-CAfile", str(cert), "-www", "-quiet"])  # fmt: skip
    wait_until(
        lambda: bool(lab.run(lab.server, ["ss", "-Hltn", f"sport = :{TLS_PORT}"],
                             check=False).stdout.strip()),
        10, "openssl s_server to listen",
    )  # fmt: skip
    return key, cert


def _curl(lab: Lab, source: IPAddress, *options: str) -> Any:
    argv = ["curl", "-sS", "-v", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}",
            "--interface", str(source), "--resolve", f"{TLS_NAME}:{TLS_PORT}:{lab.server.ipv4}",
            *options, f"https://{TLS_NAME}:{TLS_PORT}/"]  # fmt: skip
    return lab.run(lab.client, argv, check=False)


def _closes(proxy: ProxyProcess, count: int) -> list[dict[str, Any]]:
    return proxy.wait_for(lambda e: e.get("event") == "session_close", f"{count} closes",
                          count=count)  # fmt: skip


def _listing(proxy: ProxyProcess) -> dict[str, Any]:
    """SIGUSR1: the supervisor asks every worker for its sessions, over its channel. Also a
    round trip through every channel: a worker answers in the order its channel delivers, so
    what the supervisor passed on to it before has been merged once the listing is out."""
    count = len(proxy.named("sessions"))
    proxy.signal(signal.SIGUSR1)
    listing = proxy.wait_for(lambda e: e.get("event") == "sessions", "a listing", count=count + 1)
    assert listing[-1]["missing"] == [], listing[-1]
    return listing[-1]


def test_a_name_one_worker_learned_passes_through_on_the_other_and_after_a_restart(
    lab: Lab,
) -> None:
    folder = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-shared-"))
    lab.cleanup_paths.append(folder)
    key, server_cert = _server_wanting_a_client_certificate(lab, folder)
    clients = client_per_worker(lab, WORKERS)
    first, second = clients[1], clients[2]
    apply_rules(lab, "--ports", str(TLS_PORT))
    tproxy_cli(lab, lab.router, "ca", "create", str(folder / "ca"))
    (folder / "policy.toml").write_text(POLICY)
    proxy = start_proxy(lab, "--workers", str(WORKERS), "--ca", str(folder / "ca"),
                        "--policy", str(folder / "policy.toml"),
                        "--upstream-ca", str(server_cert))  # fmt: skip
    proxy.wait_for(lambda e: e.get("event") == "listening", "every worker", count=WORKERS)
    ours = str(folder / "ca" / "ca.crt")
    has_a_client_cert = ("--cacert", str(server_cert), "--cert", str(server_cert),
                         "--key", str(key))  # fmt: skip

    # Worker 1 intercepts the first client's session and learns the upstream wants a client
    # certificate: the session ends so, and worker 1 remembers the name.
    refused = _curl(lab, first, "--cacert", ours)
    assert refused.returncode != 0, refused.stderr
    learned = _closes(proxy, 1)[0]
    assert (learned["worker"], learned["reason"]) == (1, "upstream_wants_client_cert"), learned
    _listing(proxy)  # (what worker 1 learned is now in worker 2's memory too)

    # Worker 2 never saw that name fail, yet passes the second client's first session to it
    # through: the real server's certificate, the page for the client certificate given.
    passed = _curl(lab, second, *has_a_client_cert)
    stderr = passed.stderr.decode(errors="replace")
    assert passed.stdout.decode() == "200", stderr
    assert f"issuer: CN={TLS_NAME}" in stderr, stderr
    close = _closes(proxy, 2)[1]
    assert close["client"].startswith(f"{second}:"), close
    assert (close["worker"], close["passthrough"], close["relay"]) == (
        2, "upstream_wants_client_cert", "splice",
    ), close  # fmt: skip
    assert close["tls_intercepted"] is None and close["reason"] == "closed", close
    notices = [(n["worker"], n["message"]) for n in proxy.named("notice")]
    learners = [w for w, message in notices if f"{TLS_NAME} passes through" in message]
    assert learners == [1], notices  # worker 2 learned it from worker 1 only

    # Worker 2 dies and comes back with empty memory of its own: the supervisor's copy tells it.
    pid = next(w["pid"] for w in _listing(proxy)["workers"] if w["worker"] == 2)
    os.kill(pid, signal.SIGKILL)
    proxy.wait_for(lambda e: e.get("event") == "listening", "worker 2 again", count=WORKERS + 1)
    again = _curl(lab, second, *has_a_client_cert)
    assert again.stdout.decode() == "200", again.stderr
    close = _closes(proxy, 3)[2]
    assert (close["worker"], close["passthrough"]) == (2, "upstream_wants_client_cert"), close
    assert proxy.stop() == 0
