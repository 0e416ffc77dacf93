"""`tproxy sessions` on the real path, default workers: a TLS session held open through the
router is listed, over the control socket, with its worker, its SNI (sniffed as the bytes
passed, no policy needed) and its byte counts; the table shows it too."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from tests.integration.conftest import apply_rules, held_tls_session, start_proxy
from tproxy.lab.services import TLS_NAME, TLS_PORT
from tproxy.lab.topology import Lab, wait_until


def test_a_held_tls_session_is_listed_with_its_sni_and_byte_counts(lab: Lab) -> None:
    with held_tls_session(lab) as proxy:

        def held() -> list[dict[str, Any]]:
            done = lab.run(lab.router, [sys.executable, "-m", "tproxy", "sessions", "--json"])
            workers = json.loads(done.stdout)["workers"]
            return [s | {"worker": w["worker"]} for w in workers for s in w["sessions"]]

        wait_until(lambda: any(s["bytes_down"] for s in held()), 10, "the handshake relayed")
        time.sleep(0.2)
        [session] = held()
        opened = proxy.named("session_open")[0]
        assert session["id"] == opened["session"] and session["worker"] == opened["worker"]
        assert session["sni"] == TLS_NAME and session["relay"] == "splice", session
        assert session["client"].startswith(f"{lab.client.ipv4}:"), session
        assert session["dst"] == f"{lab.server.ipv4}:{TLS_PORT}", session
        assert session["bytes_up"] > 200 and session["bytes_down"] > 200, session  # the handshake
        table = lab.run(lab.router, [sys.executable, "-m", "tproxy", "sessions"]).stdout.decode()
        assert opened["session"] in table and TLS_NAME in table, table
        assert table.rstrip().endswith("1 live sessions"), table


def test_without_a_running_proxy_it_says_so_in_one_line(lab: Lab) -> None:
    done = lab.run(lab.router, [sys.executable, "-m", "tproxy", "sessions"], check=False)
    lines = done.stderr.decode().splitlines()
    assert done.returncode == 1 and len(lines) == 1, lines
    assert "no tproxy answers on the control socket" in lines[0], lines


# A server that accepts one connection, echoes, and says how it ended: "eof" or "reset".
ONE_CONNECTION_SERVER = """
import socket, sys
listener = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
conn, _ = listener.accept()
try:
    while True:
        data = conn.recv(4096)
        if not data:
            print("eof", flush=True)
            break
        conn.sendall(data)
except ConnectionResetError:
    print("reset", flush=True)
"""

# A client that sends a line, reads its echo, says "held", then waits for the end: "eof" or
# "reset".
HOLDING_CLIENT = """
import socket, sys
sock = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
sock.sendall(b"hello\\n")
assert sock.recv(16) == b"hello\\n"
print("held", flush=True)
try:
    print("eof" if sock.recv(16) == b"" else "data", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
"""

KILL_PORT = 7070


def test_kill_resets_the_session_on_both_sides(lab: Lab) -> None:
    server = lab.start(lab.server, [sys.executable, "-c", ONE_CONNECTION_SERVER, str(KILL_PORT)],
                       stdout=subprocess.PIPE)  # fmt: skip
    assert server.stdout is not None and server.stdout.readline() == b"listening\n"
    apply_rules(lab, "--ports", str(KILL_PORT))
    proxy = start_proxy(lab, default_workers=True)
    client = lab.start(lab.client, [sys.executable, "-c", HOLDING_CLIENT, str(lab.server.ipv4),
                                    str(KILL_PORT)], stdout=subprocess.PIPE)  # fmt: skip
    assert client.stdout is not None and client.stdout.readline() == b"held\n"
    [opened] = proxy.named("session_open")
    done = lab.run(lab.router, [sys.executable, "-m", "tproxy", "kill", opened["session"]])
    assert f"session {opened['session']} reset on both sides" in done.stdout.decode()
    assert client.stdout.readline() == b"reset\n"
    assert server.stdout.readline() == b"reset\n"
    close = proxy.wait_for(lambda e: e.get("event") == "session_close", "the close")[0]
    assert (close["session"], close["reason"]) == (opened["session"], "killed"), close
    # Not a live session (any more): one line, status 1.
    again = lab.run(lab.router, [sys.executable, "-m", "tproxy", "kill", opened["session"]],
                    check=False)  # fmt: skip
    assert again.returncode == 1 and "no live session" in again.stderr.decode(), again
