"""`tproxy lab`: the demo a newcomer runs first, on the same lab the integration tests use."""

from __future__ import annotations

import json
import sys
import time

from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import HTTP_PORT, PEER_PORT, start_nginx, start_peer_server
from tproxy.lab.topology import Lab, LabError
from tproxy.observability.events import parse_json_event

TRANSFER_BYTES = 64 * 1024 * 1024

_DIAGRAM = """\
  client ({client})            router ({router})              server ({server})
  198.18.1.2  2001:db8:1::2 ── 198.18.1.1 | 198.18.2.1 ── 198.18.2.2  2001:db8:2::2
                               nftables TPROXY -> tproxy :1800"""
_BRIDGE_DIAGRAM = """\
  client ({client})        bridge ({router})                   server ({server})
  198.18.3.2  2001:db8:3::2 ── br0 (198.18.3.1, 2001:db8:3::1) ── 198.18.3.3  2001:db8:3::3
                        one subnet; nft's bridge family lifts TCP off br0 -> TPROXY -> :1800"""


def _say(text: str) -> None:
    print(text, flush=True)


def _step(text: str) -> None:
    _say(f"\n== {text}")


def run_demo(keep_going: bool = False, bridge: bool = False) -> int:
    """Build the lab, show interception working over IPv4 and IPv6, tear it down; exit status.

    `bridge`: the bridge variant (client and server in one subnet, a Linux bridge between).
    """
    ok = True
    with Lab(bridge=bridge) as lab:
        if bridge:
            _step("three network namespaces: one subnet, a Linux bridge in the middle")
            diagram = _BRIDGE_DIAGRAM
        else:
            _step("three network namespaces, wired as a routed path")
            diagram = _DIAGRAM
        _say(diagram.format(client=lab.client.netns, router=lab.router.netns,
                            server=lab.server.netns))  # fmt: skip

        apply = ["rules", "apply", "--ports", f"{HTTP_PORT},{PEER_PORT}"]
        if bridge:
            apply += ["--bridge", lab.BRIDGE]
        _step(f"{lab.router.role}: tproxy {' '.join(apply)}")
        applied = lab.run(lab.router, [sys.executable, "-m", "tproxy", *apply])
        _say(applied.stdout.decode().rstrip())

        _step(f"{lab.router.role}: tproxy run --spoof-source")
        proxy = ProxyProcess(lab, lab.router, ["--spoof-source"])
        listening = proxy.wait_listening()
        _say(f"listening on {', '.join(listening['listen'])}")

        _step("server: nginx on port 80, a checksum server on port 9000")
        start_nginx(lab, lab.server)
        start_peer_server(lab, lab.server)

        for family in (4, 6):
            server = lab.server.endpoint(HTTP_PORT, family)
            url = f"http://{server}/"
            _step(f"client: curl {url}")
            result = lab.run(lab.client, ["curl", "-sS", "--max-time", "10", url], check=False)
            body = result.stdout.decode(errors="replace").strip()
            _say(body or result.stderr.decode(errors="replace").strip())
            client_ip = str(lab.client.ipv4 if family == 4 else lab.client.ipv6)
            ok &= result.returncode == 0 and body.endswith(client_ip)

        for family in (4, 6):
            peer = lab.server.endpoint(PEER_PORT, family)
            for direction in ("upload", "download"):
                _step(f"client: {direction} 64 MiB to {peer}, sha256 compared end to end")
                started = time.monotonic()
                result = lab.run(lab.client, [sys.executable, "-m", "tproxy.lab.peers", direction,
                                              str(peer), "--bytes", str(TRANSFER_BYTES)],
                                 check=False)  # fmt: skip
                elapsed = time.monotonic() - started
                try:
                    verdict = json.loads(result.stdout)
                except ValueError:
                    verdict = {"intact": False}
                intact = bool(verdict.get("intact"))
                seen = verdict.get("server", {}).get("peer")
                extra = f", the server saw {seen}" if seen else ""
                _say(f"{'intact' if intact else 'CORRUPTED OR FAILED'} in {elapsed:.2f} s{extra}")
                ok &= intact

        _step("the proxy's session log")
        proxy.wait_for(lambda e: e.get("event") == "session_close", "sessions to close",
                       count=6)  # fmt: skip
        for record in proxy.snapshot():
            event = parse_json_event(record)
            if event is not None:
                _say(f"  {event.text()}")

        if keep_going:
            _step("the lab stays up until Ctrl-C; try for example:")
            _say(f"  ip netns exec {lab.client.netns} curl http://{lab.server.ipv4}/")
            _say(f"  ip netns exec {lab.router.netns} tproxy doctor")
            try:
                while proxy.proc.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass

        proxy.stop()
        _step("tearing down: namespaces, processes and rules go with the lab")
    _say("\nall checks passed: the server saw the client's own address, bytes arrived intact"
         if ok else "\nSOME CHECKS FAILED (see above)")  # fmt: skip
    if not ok:
        raise LabError("the demo's traffic did not get through as expected")
    return 0
