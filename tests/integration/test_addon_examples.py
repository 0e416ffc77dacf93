"""The addons in examples/ on the real path: `tproxy run --addon examples/NAME.py` in the router
with the default workers, curl in the client, nginx (and a small upload server) in the server.
What a user sees: the log's lines, a response body changed in length that curl reads whole with
the header added, an upload with the marker refused (403) and never at the server while one
without it arrives intact, connections reset or delayed as asked."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.conftest import apply_rules
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import HTTP_PORT, wait_listening
from tproxy.lab.topology import Lab, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
UPLOAD_PORT = 8080

# An HTTP/1.1 server for uploads: it reads each POST/PUT body (Content-Length), answers its
# sha256, and writes one JSON line per request to its log: what the server received.
UPLOAD_SERVER = """
import hashlib, json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MARKER = b"TOP-SECRET"
LOG = open(sys.argv[2], "a", buffering=1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        length = int(self.headers.get("Content-Length", "0"))
        body = b""
        while len(body) < length:
            piece = self.rfile.read(min(65536, length - len(body)))
            if not piece:
                break
            body += piece
        seen = {"path": self.path, "bytes": len(body), "complete": len(body) == length,
                "sha256": hashlib.sha256(body).hexdigest(), "marker": MARKER in body}
        LOG.write(json.dumps(seen) + "\\n")
        if not seen["complete"]:
            self.close_connection = True
            return
        answer = json.dumps(seen).encode() + b"\\n"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    do_PUT = do_POST

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Handler).serve_forever()
"""


def _workdir(lab: Lab, what: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-{what}-"))
    lab.cleanup_paths.append(path)
    return path


def _proxy(lab: Lab, *examples: str, **env: str) -> ProxyProcess:
    """`tproxy run --addon examples/EXAMPLE ...` with the default workers (as `start_proxy`
    with `default_workers=True`), `env` in its environment."""
    wrapper = ["env", *(f"{name}={value}" for name, value in env.items())]
    addons = [arg for example in examples for arg in ("--addon", str(EXAMPLES / example))]
    proxy = ProxyProcess(lab, lab.router, addons, wrapper=wrapper)
    proxy.wait_listening()
    proxy.wait_for(lambda e: e.get("event") == "listening", "every worker",
                   count=os.cpu_count() or 1)  # fmt: skip
    return proxy


def _closes(proxy: ProxyProcess, count: int) -> list[dict[str, Any]]:
    return proxy.wait_for(lambda e: e.get("event") == "session_close", f"{count} closes",
                          count=count)  # fmt: skip


def _curl(lab: Lab, *args: str) -> tuple[int, bytes, str]:
    """curl ARGS in the client: its exit status, its stdout and its stderr."""
    result = lab.run(lab.client, ["curl", "-sS", "--max-time", "10", *args], check=False)
    return result.returncode, result.stdout, result.stderr.decode(errors="replace")


NGINX_BODY = re.compile(rb"hello from the server; it saw you as [0-9.]+\n")
"""What the lab's nginx answers (the address it saw: the router's, as tproxy does not spoof by
default)."""


def _assert_claimed(close: dict[str, Any], *examples: str) -> None:
    assert (close["reason"], close["relay"]) == ("closed", "addon"), close
    assert close["addons"] == [str(EXAMPLES / example) for example in examples], close


def test_http_log_logs_each_request_of_a_keep_alive_connection(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(HTTP_PORT))
    log = _workdir(lab, "http-log") / "http.log"
    proxy = _proxy(lab, "http_log.py", TPROXY_HTTP_LOG=str(log))
    url = f"http://{lab.server.endpoint(HTTP_PORT)}"
    # One connection, three requests: curl reuses it across --next; the HEAD's response has a
    # Content-Length and no body.
    argv = ["-o", "/dev/null", f"{url}/one", "--next", "-sS", "-I", f"{url}/two",
            "--next", "-sS", "-o", "/dev/null", f"{url}/three"]  # fmt: skip
    code, _, stderr = _curl(lab, *argv)
    assert code == 0, stderr
    [close] = _closes(proxy, 1)
    _assert_claimed(close, "http_log.py")
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, 5, "3 lines")
    lines = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    where = f"{close['session']} {close['client']} -> {close['dst']}"
    assert lines == [
        f'{where} "GET /one HTTP/1.1" 200',
        f'{where} "HEAD /two HTTP/1.1" 200',
        f'{where} "GET /three HTTP/1.1" 200',
    ]


def test_rewrite_response_changes_the_body_length_and_adds_the_header(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(HTTP_PORT))
    proxy = _proxy(lab, "rewrite_response.py")
    url = f"http://{lab.server.endpoint(HTTP_PORT)}/"
    # Two responses on one keep-alive connection: each rewritten, each read whole by curl.
    code, out, stderr = _curl(lab, "-D", "-", url, url)
    assert code == 0, stderr  # no "transfer closed with outstanding read data remaining"
    responses = out.split(b"HTTP/1.1 200 OK\r\n")[1:]
    assert len(responses) == 2
    for response in responses:
        head, _, got = response.partition(b"\r\n\r\n")
        assert NGINX_BODY.fullmatch(got.replace(b"goodbye", b"hello")), got
        assert got.startswith(b"goodbye from the server")
        headers = {k.lower(): v for k, _, v in (line.partition(b": ") for line in
                                                 head.split(b"\r\n"))}  # fmt: skip
        assert headers[b"content-length"] == str(len(got)).encode()
        assert headers[b"x-rewritten-by"] == b"tproxy"
    [close] = _closes(proxy, 1)
    _assert_claimed(close, "rewrite_response.py")
    assert close["bytes_down"] == len(out)


def _start_upload_server(lab: Lab) -> Path:
    """The upload server in the server namespace; returns its log."""
    workdir = _workdir(lab, "uploads")
    script = workdir / "upload_server.py"
    script.write_text(UPLOAD_SERVER)
    log = workdir / "uploads.jsonl"
    lab.start(lab.server, [sys.executable, str(script), str(UPLOAD_PORT), str(log)])
    wait_listening(lab, lab.server, UPLOAD_PORT, "the upload server")
    return log


def _uploads(lab: Lab) -> tuple[bytes, Callable[[str], tuple[int, bytes, str]]]:
    """A 300 kB file without the marker (`clean`) and the same with the marker in its middle
    (`secret`), and a function that POSTs one of them to the upload server with curl."""
    files = _workdir(lab, "files")
    clean = random.Random(12).randbytes(300_000)
    assert b"TOP-SECRET" not in clean
    (files / "clean").write_bytes(clean)
    (files / "secret").write_bytes(clean[:150_000] + b" TOP-SECRET " + clean[150_000:])
    url = f"http://{lab.server.endpoint(UPLOAD_PORT)}"

    def upload(name: str) -> tuple[int, bytes, str]:
        return _curl(lab, "-H", "Expect:", "--data-binary", f"@{files / name}",
                     "-w", "\n%{http_code}", f"{url}/{name}")  # fmt: skip

    return clean, upload


def test_block_uploads_refuses_the_marker_and_passes_the_rest(lab: Lab) -> None:
    log = _start_upload_server(lab)
    apply_rules(lab, "--ports", str(UPLOAD_PORT))
    proxy = _proxy(lab, "block_uploads.py")
    clean, upload = _uploads(lab)
    code, out, stderr = upload("clean")
    assert code == 0 and out.endswith(b"\n200"), (out, stderr)
    assert json.loads(out.rpartition(b"\n")[0])["sha256"] == hashlib.sha256(clean).hexdigest()

    code, out, stderr = upload("secret")
    assert out.endswith(b"\n403"), (code, out, stderr)
    assert b"blocked by tproxy" in out

    closes = _closes(proxy, 2)
    for close in closes:
        assert close["relay"] == "addon" and close["addons"] == [
            str(EXAMPLES / "block_uploads.py")
        ], close
    assert sorted(c["reason"] for c in closes) == ["addon_close", "closed"]
    blocked = next(c for c in closes if c["reason"] == "addon_close")
    assert blocked["bytes_up"] < 150_000 + 200

    def seen() -> list[dict[str, Any]]:
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    wait_until(lambda: len(seen()) >= 2, 5, "the server to log both uploads")
    by_path = {entry["path"]: entry for entry in seen()}
    assert by_path["/clean"]["complete"] and by_path["/clean"]["bytes"] == len(clean)
    assert by_path["/secret"]["marker"] is False and not by_path["/secret"]["complete"]


def test_chained_block_uploads_then_http_log(lab: Lab) -> None:
    """Two addons claim each session: http_log sees what block_uploads passed on, and not the
    403 block_uploads sent itself, so the blocked request is logged without a status."""
    _start_upload_server(lab)
    apply_rules(lab, "--ports", str(UPLOAD_PORT))
    log = _workdir(lab, "http-log") / "http.log"
    proxy = _proxy(lab, "block_uploads.py", "http_log.py", TPROXY_HTTP_LOG=str(log))
    _, upload = _uploads(lab)
    assert upload("clean")[1].endswith(b"\n200")
    assert upload("secret")[1].endswith(b"\n403")
    closes = _closes(proxy, 2)
    claimers = [str(EXAMPLES / name) for name in ("block_uploads.py", "http_log.py")]
    assert all(c["relay"] == "addon" and c["addons"] == claimers for c in closes), closes
    wait_until(lambda: log.exists() and len(log.read_text().splitlines()) >= 2, 5, "2 lines")
    lines = sorted(line.rsplit('"', 2)[1:] for line in log.read_text().splitlines())
    assert lines == [["POST /clean HTTP/1.1", " 200"], ["POST /secret HTTP/1.1", " -"]]


def test_fault_injector_resets_every_connection_at_100_percent(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(HTTP_PORT))
    proxy = _proxy(lab, "fault_injector.py", TPROXY_FAULT_DROP_PERCENT="100")
    url = f"http://{lab.server.endpoint(HTTP_PORT)}/"
    for _ in range(3):
        # The reset reaches curl before it has seen its connect complete: exit 7 ("Couldn't
        # connect"), as it sends its request: 55 ("Send failure: Connection reset by peer"), or
        # while it waits for the answer: 56 ("Recv failure: Connection reset by peer").
        code, _, stderr = _curl(lab, "-o", "/dev/null", url)
        assert code in (7, 55, 56), stderr
    closes = _closes(proxy, 3)
    for close in closes:
        assert (close["reason"], close["rule"], close["relay"]) == (
            "policy_reset", f"addon:{EXAMPLES / 'fault_injector.py'}", None,
        ), close  # fmt: skip
    assert not proxy.named("upstream_connected")


def test_fault_injector_delays_each_connection(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(HTTP_PORT))
    proxy = _proxy(lab, "fault_injector.py", TPROXY_FAULT_DROP_PERCENT="0",
                   TPROXY_FAULT_DELAY_MS="300")  # fmt: skip
    url = f"http://{lab.server.endpoint(HTTP_PORT)}/"
    for _ in range(2):
        code, out, stderr = _curl(lab, "-w", "\n%{time_total}", url)
        body, _, elapsed = out.rpartition(b"\n")
        assert code == 0 and NGINX_BODY.fullmatch(body), (out, stderr)
        assert float(elapsed) >= 0.3
    closes = _closes(proxy, 2)
    for close in closes:
        # Nothing claimed: the bytes kept the zero-copy path.
        assert (close["reason"], close["relay"]) == ("closed", "splice"), close
        assert close["addons"] is None, close


def test_fault_injector_delays_each_chunk(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(HTTP_PORT))
    proxy = _proxy(lab, "fault_injector.py", TPROXY_FAULT_CHUNK_DELAY_MS="200")
    url = f"http://{lab.server.endpoint(HTTP_PORT)}/"
    code, out, stderr = _curl(lab, "-w", "\n%{time_total}", url)
    body, _, elapsed = out.rpartition(b"\n")
    assert code == 0 and NGINX_BODY.fullmatch(body), (out, stderr)
    assert float(elapsed) >= 0.4  # the request's chunk, then the response's
    [close] = _closes(proxy, 1)
    _assert_claimed(close, "fault_injector.py")


# A client whose first bytes come after the sniff timeout (1 s): "PO", a pause, then the rest
# of an upload with the marker. It prints what it got back.
SLOW_CLIENT = """
import socket, sys, time
request = (b"POST /slow HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 16\\r\\n\\r\\n"
           b"here: TOP-SECRET")
with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10) as sock:
    sock.sendall(request[:2])
    time.sleep(1.5)
    sock.sendall(request[2:])
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
sys.stdout.buffer.write(got)
"""


def test_block_uploads_scans_a_client_slower_than_the_sniff_timeout(lab: Lab) -> None:
    """Sniffed `unknown` (its first bytes came late), the session is still claimed: 403, and
    the server never sees the marker."""
    log = _start_upload_server(lab)
    apply_rules(lab, "--ports", str(UPLOAD_PORT))
    proxy = _proxy(lab, "block_uploads.py")
    argv = [sys.executable, "-c", SLOW_CLIENT, str(lab.server.ipv4), str(UPLOAD_PORT)]
    result = lab.run(lab.client, argv, check=False)
    assert result.stdout.startswith(b"HTTP/1.1 403 Forbidden\r\n"), result
    [close] = _closes(proxy, 1)
    assert close["proto"] == "unknown" and close["reason"] == "addon_close", close
    assert close["addons"] == [str(EXAMPLES / "block_uploads.py")], close
    seen = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    assert all(not entry["marker"] for entry in seen), seen
