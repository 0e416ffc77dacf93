"""Real upstream proxies in the lab, for the `via` tests: microsocks (SOCKS5) and tinyproxy
(HTTP CONNECT), each started in a lab namespace with `Lab.start` (so the lab kills it by PID on
teardown, and the context manager stops it earlier), plus a hosts file for the proxy's namespace
so it can resolve names, and a client that drives our pure handshake over a real socket.

Which destination was the proxy asked for? microsocks prints one line per tunnel it opened,
`client[FD] CLIENT_IP: connected to HOST:PORT`, HOST as the client sent it (a name stays a
name, an IPv6 address has no brackets), and nothing for a failed one; tinyproxy at `LogLevel
Info` logs each request line (`Request (file descriptor N): CONNECT HOST:PORT HTTP/1.1`) and
each refusal.

Run as a script (`python upstream_proxies.py JSON`, in a namespace: `through_proxy` does that),
this file is the client: it connects to the proxy, runs `handshake_for(...)` to the end, then
exchanges bytes with the destination, and prints one JSON verdict.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import re
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tproxy.lab.services import wait_listening
from tproxy.lab.topology import Host, Lab, LabError, stop_process, wait_until
from tproxy.policy.model import parse_upstream_proxy
from tproxy.upstream.handshake import Established, Refused, Send, handshake_for

NETNS_ETC = Path("/etc/netns")


# --- the proxies -------------------------------------------------------------------------------


def _tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not Path(path).exists():
        raise LabError(f"{name} was not found: run scripts/bootstrap")
    return path


def _workdir(lab: Lab, what: str) -> Path:
    workdir = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-{what}-"))
    lab.cleanup_paths.append(workdir)
    return workdir


@dataclass
class RunningProxy:
    """A proxy running in the lab: its `url` for a `via` rule and its log."""

    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class Microsocks(RunningProxy):
    def connected_to(self) -> list[str]:
        """HOST:PORT of every tunnel microsocks opened, in order (IPv6 without brackets)."""
        return re.findall(r": connected to (\S+)$", self.log(), re.MULTILINE)


class Tinyproxy(RunningProxy):
    def requested(self) -> list[str]:
        """HOST:PORT of every CONNECT tinyproxy was asked for, in order."""
        return re.findall(r"Request \(file descriptor \d+\): CONNECT (\S+) ", self.log())

    def refused_ports(self) -> list[int]:
        return [int(p) for p in re.findall(r"Refused CONNECT method on port (\d+)", self.log())]


def _url(scheme: str, listen_ip: str, port: int, user: str | None, password: str | None) -> str:
    host = f"[{listen_ip}]" if ":" in listen_ip else listen_ip
    auth = f"{user}:{password}@" if user is not None else ""
    return f"{scheme}://{auth}{host}:{port}"


@contextmanager
def microsocks(
    lab: Lab,
    host: Host,
    listen_ip: str,
    port: int = 1080,
    *,
    user: str | None = None,
    password: str | None = None,
) -> Iterator[Microsocks]:
    """microsocks listening on `listen_ip`:`port` in `host`; with `user` and `password` it
    accepts only RFC 1929 username/password (`-u -P`), else only no authentication."""
    workdir = _workdir(lab, "microsocks")
    argv = [_tool("microsocks"), "-i", listen_ip, "-p", str(port)]
    if user is not None:
        argv += ["-u", user, "-P", password or ""]
    log_path = workdir / "microsocks.log"
    with log_path.open("wb") as out:
        proc = lab.start(host, argv, stdout=out, stderr=out)
    try:
        wait_listening(lab, host, port, "microsocks")
        yield Microsocks(_url("socks5", listen_ip, port, user, password), log_path)
    finally:
        stop_process(proc)
        lab.forget(proc)


_TINYPROXY_CONF = """\
Port {port}
Listen {listen_ip}
Timeout 30
MaxClients 32
LogFile "{log}"
LogLevel Info
DisableViaHeader Yes
"""


@contextmanager
def tinyproxy(
    lab: Lab,
    host: Host,
    listen_ip: str,
    port: int = 8888,
    *,
    allow: Sequence[str] = ("198.18.0.0/15", "2001:db8::/32"),
    connect_ports: Sequence[int] = (80, 9000),
    user: str | None = None,
    password: str | None = None,
) -> Iterator[Tinyproxy]:
    """tinyproxy in the foreground (`-d`) on `listen_ip`:`port` only, in `host`.

    Args:
        allow: client networks it serves (`Allow`); others get 403.
        connect_ports: the ports CONNECT may reach (`ConnectPort`); any other port is
            refused with "403 Access violation". (tinyproxy has no deny list: with no
            ConnectPort line every port would be allowed.)
        user, password: require Proxy-Authorization Basic (`BasicAuth`), else 407.
    """
    workdir = _workdir(lab, "tinyproxy")
    log_path = workdir / "tinyproxy.log"
    conf = _TINYPROXY_CONF.format(port=port, listen_ip=listen_ip, log=log_path)
    conf += "".join(f"Allow {network}\n" for network in allow)
    conf += "".join(f"ConnectPort {p}\n" for p in connect_ports)
    if user is not None:
        conf += f"BasicAuth {user} {password}\n"
    conf_path = workdir / "tinyproxy.conf"
    conf_path.write_text(conf)
    stderr_path = workdir / "tinyproxy.stderr"
    with stderr_path.open("wb") as out:
        proc = lab.start(host, [_tool("tinyproxy"), "-d", "-c", str(conf_path)], out, out)
    try:
        wait_listening(lab, host, port, "tinyproxy")
        yield Tinyproxy(_url("http", listen_ip, port, user, password), log_path)
    finally:
        stop_process(proc)
        lab.forget(proc)


@contextmanager
def netns_hosts(lab: Lab, host: Host, names: Mapping[str, str]) -> Iterator[Path]:
    """Give `host`'s namespace its own /etc/hosts with `names` (name -> address), for
    processes started after this (`ip netns exec` bind-mounts /etc/netns/NS/hosts over
    /etc/hosts when it starts a command, see ip-netns(8)). Its resolv.conf points at
    127.0.0.1, where nothing answers: any other name fails at once, inside the namespace.
    The directory is removed on exit (and by the lab's teardown, whichever comes first).
    """
    made_etc = not NETNS_ETC.exists()
    directory = NETNS_ETC / host.netns
    directory.mkdir(parents=True, exist_ok=False)

    def remove() -> None:
        shutil.rmtree(directory, ignore_errors=True)
        if made_etc:
            with contextlib.suppress(OSError):  # only if empty: another lab may use it now
                NETNS_ETC.rmdir()

    lab.on_destroy(remove)
    try:
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{address} {name}" for name, address in names.items()]
        (directory / "hosts").write_text("\n".join(lines) + "\n")
        (directory / "resolv.conf").write_text("nameserver 127.0.0.1\noptions attempts:1\n")
        yield directory / "hosts"
    finally:
        remove()


def through_proxy(
    lab: Lab,
    host: Host,
    proxy_url: str,
    dest_host: str,
    dest_port: int,
    *,
    exchange: str = "http",
    echo_bytes: int = 0,
) -> dict[str, Any]:
    """Run this file as the client in `host`'s namespace; return its verdict (see `main`)."""
    request = {
        "proxy": proxy_url,
        "host": dest_host,
        "port": dest_port,
        "exchange": exchange,
        "echo_bytes": echo_bytes,
    }
    result = lab.run(host, [sys.executable, __file__, json.dumps(request)], 60, check=False)
    try:
        verdict: dict[str, Any] = json.loads(result.stdout)
    except ValueError:
        raise LabError(
            f"the proxy client printed no verdict: {result.stderr.decode(errors='replace')}"
        ) from None
    return verdict


def wait_logged(proxy: RunningProxy, text: str, timeout_s: float = 5) -> None:
    """Wait until `text` is in the proxy's log (it may write it after answering us)."""
    wait_until(lambda: text in proxy.log(), timeout_s, f"{text!r} in {proxy.log_path}")


# --- the client (run as a script in a namespace) -----------------------------------------------


def main(request: dict[str, Any]) -> dict[str, Any]:
    """Connect to the proxy, run the handshake, then exchange bytes with the destination.

    Verdict: `answers` (the class name of each answer, NeedMore included), `sent` (every
    message we wrote to the proxy, hex), `outcome` ("established", "refused", or "eof" when
    the proxy closed first), `detail` and `refused` for a refusal; after the tunnel is up,
    for exchange "http" the `response` to a GET (leftover included), for "echo" whether the
    peer server's ECHO sent back the same `echo_bytes` random bytes (`echo_ok`).
    """
    proxy = parse_upstream_proxy(request["proxy"])
    handshake = handshake_for(proxy, request["host"], request["port"])
    verdict: dict[str, Any] = {"answers": [], "sent": []}
    with socket.create_connection((proxy.address.host, proxy.address.port), timeout=10) as sock:
        first = handshake.start()
        sock.sendall(first)
        verdict["sent"].append(first.hex())
        while True:
            data = sock.recv(65536)
            if not data:
                verdict["outcome"] = "eof"
                return verdict
            answer = handshake.receive(data)
            verdict["answers"].append(type(answer).__name__)
            if isinstance(answer, Send):
                sock.sendall(answer.data)
                verdict["sent"].append(answer.data.hex())
            elif isinstance(answer, Refused):
                verdict.update(outcome="refused", detail=answer.detail, refused=answer.refused)
                return verdict
            elif isinstance(answer, Established):
                verdict["outcome"] = "established"
                break
        if request["exchange"] == "http":
            sock.sendall(b"GET / HTTP/1.1\r\nHost: upstream.test\r\nConnection: close\r\n\r\n")
            response = answer.leftover + _read_to_eof(sock)
            verdict["response"] = response.decode(errors="replace")
        else:
            payload = random.Random(request["echo_bytes"]).randbytes(request["echo_bytes"])
            sock.sendall(b"ECHO\n")
            # Send from a thread while this one reads: the echo comes back as we send, and the
            # buffers on the way may hold less than the whole payload.
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            echoed = bytearray(answer.leftover)
            while len(echoed) < len(payload):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                echoed += chunk
            sender.join()
            verdict["echo_ok"] = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
            verdict["echoed_bytes"] = len(echoed)
    return verdict


def _read_to_eof(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
