"""`tproxy lab`: the demo a newcomer runs first, on the same lab the integration tests use."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import (
    HTTP_PORT,
    PEER_PORT,
    TLS_NAME,
    TLS_PORT,
    start_nginx,
    start_peer_server,
    start_tls_server,
)
from tproxy.lab.topology import Lab, LabError
from tproxy.observability.events import parse_json_event

TRANSFER_BYTES = 64 * 1024 * 1024
AD_NAME = "www.ads.example"
RESET_RULE = "no-ads"
CAPTURE_RULE = "capture-web"

# The demo's policy, written to the lab's temp dir and shown as it is: the transfers' port
# decides at accept (no waiting); plain HTTP is captured; a name rule resets ads by TLS SNI or
# HTTP Host.
POLICY = f"""\
default = "allow"
sniff_timeout_s = 1.0

[[rule]]
name = "transfers"             # by port: decided at accept, nothing waits
ports = [{PEER_PORT}]
action = "allow"

[[rule]]
name = "{CAPTURE_RULE}"           # plain HTTP: each session written as a pcapng file
ports = [{HTTP_PORT}]
action = "allow"
capture = true

[[rule]]
name = "{RESET_RULE}"                # by name: the TLS SNI or the HTTP Host
sni_or_host = ["*.ads.example"]
action = "reset"
"""

ROUTED_DIAGRAM = """\
  client ({client})            router ({router})              server ({server})
  198.18.1.2  2001:db8:1::2 ── 198.18.1.1 | 198.18.2.1 ── 198.18.2.2  2001:db8:2::2
                               nftables TPROXY -> tproxy :1800"""
BRIDGE_DIAGRAM = """\
  client ({client})        bridge ({router})                   server ({server})
  198.18.3.2  2001:db8:3::2 ── br0 (198.18.3.1, 2001:db8:3::1) ── 198.18.3.3  2001:db8:3::3
                        one subnet; nft's bridge family lifts TCP off br0 -> TPROXY -> :1800"""


def say(text: str) -> None:
    print(text, flush=True)


def step(text: str) -> None:
    say(f"\n== {text}")


def run_demo(keep_going: bool = False, bridge: bool = False) -> int:
    """Build the lab, show interception working over IPv4 and IPv6, tear it down; exit status.

    `bridge`: the bridge variant (client and server in one subnet, a Linux bridge between).
    """
    ok = True
    with Lab(bridge=bridge) as lab:
        if bridge:
            step("three network namespaces: one subnet, a Linux bridge in the middle")
            diagram = BRIDGE_DIAGRAM
        else:
            step("three network namespaces, wired as a routed path")
            diagram = ROUTED_DIAGRAM
        say(diagram.format(client=lab.client.netns, router=lab.router.netns,
                            server=lab.server.netns))  # fmt: skip

        apply = ["rules", "apply", "--ports", f"{HTTP_PORT},{TLS_PORT},{PEER_PORT}"]
        if bridge:
            apply += ["--bridge", lab.BRIDGE]
        step(f"{lab.router.role}: tproxy {' '.join(apply)}")
        applied = lab.run(lab.router, [sys.executable, "-m", "tproxy", *apply])
        say(applied.stdout.decode().rstrip())

        workdir = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-policy-"))
        lab.cleanup_paths.append(workdir)
        policy = workdir / "policy.toml"
        policy.write_text(POLICY)
        captures = workdir / "captures"
        captures.mkdir(mode=0o700)
        step(f"{lab.router.role}: tproxy run --spoof-source --policy {policy} --capture-dir "
              f"{captures}")  # fmt: skip
        say("\n".join(f"  {line}".rstrip() for line in POLICY.splitlines()))
        proxy = ProxyProcess(lab, lab.router, ["--spoof-source", "--policy", str(policy),
                                               "--capture-dir", str(captures)])  # fmt: skip
        listening = proxy.wait_listening()
        say(f"listening on {', '.join(listening['listen'])}")

        step(f"server: nginx on port {HTTP_PORT}, openssl s_server on {TLS_PORT} (a throw-away "
              f"certificate for {TLS_NAME}), a checksum server on {PEER_PORT}")  # fmt: skip
        start_nginx(lab, lab.server)
        start_tls_server(lab, lab.server)
        start_peer_server(lab, lab.server)

        for family in (4, 6):
            server = lab.server.endpoint(HTTP_PORT, family)
            url = f"http://{server}/"
            step(f"client: curl -H 'Host: {TLS_NAME}' {url}")
            argv = ["curl", "-sS", "--max-time", "10", "-H", f"Host: {TLS_NAME}", url]
            result = lab.run(lab.client, argv, check=False)
            body = result.stdout.decode(errors="replace").strip()
            say(body or result.stderr.decode(errors="replace").strip())
            client_ip = str(lab.client.ipv4 if family == 4 else lab.client.ipv6)
            ok &= result.returncode == 0 and body.endswith(client_ip)

        resolve = f":{TLS_PORT}:{lab.server.ipv4}"
        step(f"client: curl -k --resolve {TLS_NAME}{resolve} https://{TLS_NAME}/")
        result = _curl_https(lab, TLS_NAME, resolve)
        answer = result.stdout.decode(errors="replace").split()
        if result.returncode == 0 and answer[:1] == ["200"]:
            say("status 200 over TLS (-k: the server's certificate is a throw-away one)")
        else:
            say(result.stderr.decode(errors="replace").strip() or f"answered {answer}")
            ok = False

        step(f"client: curl -k --resolve {AD_NAME}{resolve} https://{AD_NAME}/")
        result = _curl_https(lab, AD_NAME, resolve)
        error = result.stderr.decode(errors="replace").strip()
        if result.returncode != 0 and "reset" in error.lower():
            say(f"{error}\n-> reset by rule {RESET_RULE}, as the policy says: the proxy read "
                 f"{AD_NAME} in the ClientHello, nothing connected to the server")  # fmt: skip
        else:
            say(f"NOT RESET ({result.returncode}): {error or 'the request went through'}")
            ok = False

        for family in (4, 6):
            peer = lab.server.endpoint(PEER_PORT, family)
            for direction in ("upload", "download"):
                step(f"client: {direction} 64 MiB to {peer}, sha256 compared end to end")
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
                say(f"{'intact' if intact else 'CORRUPTED OR FAILED'} in {elapsed:.2f} s{extra}")
                ok &= intact

        step("the proxy's session log: sni= alpn= and host= are what each client's first bytes "
              "said, rule \"...\" what decided")  # fmt: skip
        closes = proxy.wait_for(lambda e: e.get("event") == "session_close", "sessions to close",
                                count=8)  # fmt: skip
        for record in proxy.snapshot():
            event = parse_json_event(record)
            if event is not None:
                say(f"  {event.text()}")
        ok &= _sessions_as_expected(closes)
        ok &= _show_a_capture(closes)

        if keep_going:
            step("the lab stays up until Ctrl-C; try for example:")
            say(f"  ip netns exec {lab.client.netns} curl http://{lab.server.ipv4}/")
            say(f"  ip netns exec {lab.client.netns} curl -k --resolve {AD_NAME}{resolve} "
                 f"https://{AD_NAME}/")  # fmt: skip
            say(f"  kill -HUP {proxy.proc.pid}   # after editing {policy}")
            say(f"  ip netns exec {lab.router.netns} tproxy doctor")
            try:
                while proxy.proc.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass

        proxy.stop()
        step("tearing down: namespaces, processes and rules go with the lab")
    say("\nall checks passed: the server saw the client's own address, bytes arrived intact, "
         f"the log names each site, the policy reset {AD_NAME} and captured plain HTTP"
         if ok else "\nSOME CHECKS FAILED (see above)")  # fmt: skip
    if not ok:
        raise LabError("the demo's traffic did not get through as expected")
    return 0


def _show_a_capture(closes: list[dict[str, Any]]) -> bool:
    """The HTTP sessions' capture files exist; tshark (when installed) follows the first."""
    paths = [Path(c["capture"]) for c in closes if c.get("capture")]
    step(f"captures by rule {CAPTURE_RULE}: what Wireshark opens, with the original addresses")
    for path in paths:
        say(f"  {path} ({path.stat().st_size if path.exists() else 'MISSING'} bytes)")
    if len(paths) != 2 or not all(path.exists() for path in paths):
        say(f"MISSING: two capture files by rule {CAPTURE_RULE}")
        return False
    tshark = shutil.which("tshark")
    if tshark is None:
        say("  (install tshark to read them here: apt install tshark)")
        return True
    say(f"  tshark -r {paths[0].name} -q -z follow,tcp,ascii,0")
    result = subprocess.run([tshark, "-r", str(paths[0]), "-q", "-z", "follow,tcp,ascii,0"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    shown = [line for line in result.stdout.splitlines() if line.strip()][:12]
    say("\n".join(f"    {line}" for line in shown))
    return result.returncode == 0 and any(line.startswith("GET / HTTP/1.1") for line in shown)


def _curl_https(lab: Lab, name: str, resolve: str) -> subprocess.CompletedProcess[bytes]:
    """curl https://NAME/ from the client, NAME resolved to the server; stdout: the status."""
    argv = ["curl", "-sS", "-k", "--max-time", "10", "--resolve", f"{name}{resolve}", "-o",
            "/dev/null", "-w", "%{http_code}", f"https://{name}/"]  # fmt: skip
    return lab.run(lab.client, argv, check=False)


def _sessions_as_expected(closes: list[dict[str, Any]]) -> bool:
    """The session log shows the HTTPS request's SNI and ALPN, the HTTP requests' Host and the
    reset by the name rule; anything missing is reported and fails the demo."""
    checks = {
        f"an HTTPS session with sni {TLS_NAME} and its ALPN": any(
            c.get("proto") == "tls" and c.get("sni") == TLS_NAME and c.get("alpn")
            and c.get("reason") == "closed" for c in closes
        ),
        f"HTTP sessions with host {TLS_NAME}": sum(
            c.get("proto") == "http" and c.get("http_host") == TLS_NAME for c in closes
        ) == 2,
        f"the session to {AD_NAME} reset by rule {RESET_RULE}": any(
            c.get("sni") == AD_NAME and c.get("rule") == RESET_RULE
            and c.get("reason") == "policy_reset" for c in closes
        ),
    }  # fmt: skip
    for what, seen in checks.items():
        if not seen:
            say(f"MISSING from the session log: {what}")
    return all(checks.values())
