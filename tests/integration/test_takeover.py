"""A seamless restart on the real path (`tproxy run --takeover`), default workers: under a steady
stream of new connections from the client (a few hundred a second), a new tproxy takes the
listening sockets over the control socket, serves, and the old one drains: not one connection
attempt is refused or reset, a 64 MiB download started before it finishes intact on the old
process, and the old one exits 0. A second `tproxy run` beside a running one is refused in one
line; `--takeover` with nothing running, too."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from tests.integration.conftest import apply_rules, start_proxy
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import PEER_PORT, start_peer_server
from tproxy.lab.topology import Lab, wait_until

MIB = 1 << 20

# New connections, a few at a time, until stdin closes: each sends ECHO and one byte and must
# get it back. Prints the tally: how many, and each failure's kind.
STREAM = """
import asyncio, json, socket, sys, collections
server, port = sys.argv[1], int(sys.argv[2])
tally = collections.Counter()
stop = asyncio.Event()

async def one():
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(server, port), 5)
        writer.write(b"ECHO\\nx")
        got = await asyncio.wait_for(reader.readexactly(1), 5)
        writer.close()
        tally["ok" if got == b"x" else "corrupt"] += 1
    except ConnectionRefusedError:
        tally["refused"] += 1
    except ConnectionResetError:
        tally["reset"] += 1
    except asyncio.IncompleteReadError:
        tally["eof"] += 1
    except (TimeoutError, asyncio.TimeoutError):
        tally["timeout"] += 1
    except OSError as exc:
        tally[type(exc).__name__] += 1

async def loop():
    while not stop.is_set():
        await asyncio.gather(*(one() for _ in range(4)))
        await asyncio.sleep(0.005)

async def main():
    loop_ = asyncio.get_running_loop()
    loop_.add_reader(sys.stdin.fileno(), lambda: (sys.stdin.read(), stop.set()))
    print("started", flush=True)
    start = loop_.time()
    await loop()
    print(json.dumps({"tally": dict(tally), "seconds": loop_.time() - start}), flush=True)

asyncio.run(main())
"""


def _closes(proxy: ProxyProcess) -> list[dict[str, Any]]:
    return proxy.named("session_close")


def test_a_takeover_under_load_refuses_nothing_and_the_old_one_finishes_its_sessions(
    lab: Lab,
) -> None:
    start_peer_server(lab, lab.server, PEER_PORT)
    apply_rules(lab, "--ports", str(PEER_PORT))
    old = start_proxy(lab, "--spoof-source", default_workers=True)
    server = str(lab.server.ipv4)
    stream = lab.start(lab.client, [sys.executable, "-c", STREAM, server, str(PEER_PORT)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
    download = lab.start(
        lab.client,
        [sys.executable, "-m", "tproxy.lab.peers", "download", f"{server}:{PEER_PORT}",
         "--bytes", str(64 * MIB), "--rate", str(8 * MIB), "--seed", "7"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert stream.stdout is not None and stream.stdin is not None
    assert stream.stdout.readline().strip() == b"started"
    wait_until(lambda: len(_closes(old)) >= 100, 30, "the stream running through the old one")
    new = ProxyProcess(lab, lab.router, ["--spoof-source", "--takeover"])
    try:
        new.wait_for(lambda e: e.get("event") == "listening", "every new worker", count=2)
        wait_until(lambda: old.proc.poll() is not None, 60, "the old tproxy to drain and exit")
        assert old.proc.returncode == 0, old.stderr_text()
        time.sleep(1)  # the stream goes on through the new one alone
        stream.stdin.close()
        result = json.loads(stream.stdout.readline())
        stream.wait(timeout=30)
        tally = result["tally"]
        print(f"{tally} in {result['seconds']:.1f} s")  # (for the record: the load it made)
        assert set(tally) == {"ok"} and tally["ok"] > 200, result
        assert download.stdout is not None
        verdict = json.loads(download.stdout.read())
        assert verdict["intact"] and verdict["received"] == 64 * MIB, verdict
        # The download was the old one's to the end; the new one served the stream after.
        big = [c for c in _closes(old) if c["bytes_down"] >= 64 * MIB]
        assert len(big) == 1 and big[0]["reason"] == "closed", big
        assert len(_closes(new)) > 0
        notices = [e["message"] for e in old.named("notice")]
        assert any("takeover: the new tproxy serves" in n for n in notices), notices
        # The new one answers on the control socket now: it can be taken over in turn.
        again = lab.run(lab.router, [sys.executable, "-m", "tproxy", "run"], check=False)
        assert again.returncode == 1, again
        assert "another tproxy is running" in again.stderr.decode(), again.stderr
    finally:
        new.stop()


def test_takeover_with_nothing_running_is_one_line(lab: Lab) -> None:
    done = lab.run(lab.router, [sys.executable, "-m", "tproxy", "run", "--takeover"], check=False)
    stderr = done.stderr.decode()
    assert done.returncode == 1 and stderr.count("\n") == 1, stderr
    assert "no tproxy answers on the control socket" in stderr, stderr
