"""The lab's checksum peers: a server and clients that prove bytes arrive intact, end to end.

Protocol (one TCP connection per transfer, first line is the request):

* ``UPLOAD\\n`` then any bytes, then the client half-closes: the server reads to EOF and answers
  one JSON line ``{"peer": "ip:port", "bytes": N, "sha256": "..."}`` -- so the reply travels
  after the client's FIN, which is exactly the half-close a proxy must carry.
* ``DOWNLOAD N SEED\\n``: the server sends N bytes of the deterministic stream for SEED, then
  FIN; the client regenerates the stream and compares sha256.

Run as ``python -m tproxy.lab.peers serve --port P`` (IPv4 and IPv6), and ``upload`` /
``download`` for the client side; each client prints one JSON object. ``probe`` connects anywhere
and reports what a client saw: refused, reset, clean EOF or a timeout.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import random
import socket
import socketserver
import sys
import time
from collections.abc import Iterator
from typing import Any

from tproxy.core.endpoint import Endpoint, parse_endpoint

CHUNK_BYTES = 1 << 20


def pattern_chunks(seed: int, total_bytes: int) -> Iterator[bytes]:
    """The deterministic byte stream for `seed`, in chunks, `total_bytes` long."""
    rng = random.Random(seed)
    left = total_bytes
    while left > 0:
        n = min(CHUNK_BYTES, left)
        yield rng.randbytes(n)
        left -= n


def pattern_sha256(seed: int, total_bytes: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(seed, total_bytes):
        digest.update(chunk)
    return digest.hexdigest()


def _read_line(sock: socket.socket) -> bytes:
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return bytes(line)


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        request = _read_line(sock).split()
        peer = Endpoint.from_sockaddr(self.client_address)
        try:
            if request[:1] == [b"UPLOAD"]:
                digest, total = hashlib.sha256(), 0
                while chunk := sock.recv(CHUNK_BYTES):
                    digest.update(chunk)
                    total += len(chunk)
                reply = {"peer": str(peer), "bytes": total, "sha256": digest.hexdigest()}
                sock.sendall(json.dumps(reply).encode() + b"\n")
            elif request[:1] == [b"DOWNLOAD"] and len(request) == 3:
                for chunk in pattern_chunks(int(request[2]), int(request[1])):
                    sock.sendall(chunk)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(CHUNK_BYTES):
                    pass
        except OSError:
            pass  # the client went away: nothing to answer


class _DualStackServer(socketserver.ThreadingTCPServer):
    address_family = socket.AF_INET6
    allow_reuse_address = True
    daemon_threads = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def serve(port: int) -> None:
    with _DualStackServer(("::", port), _Handler) as server:
        server.serve_forever()


def upload(to: Endpoint, total_bytes: int, seed: int, timeout_s: float) -> dict[str, Any]:
    """Send the stream, half-close, read the server's verdict."""
    with socket.create_connection(to.sockaddr, timeout=timeout_s) as sock:
        sock.sendall(b"UPLOAD\n")
        for chunk in pattern_chunks(seed, total_bytes):
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    verdict = json.loads(reply)
    expected = pattern_sha256(seed, total_bytes)
    return {
        "sent": total_bytes,
        "sent_sha256": expected,
        "reply_bytes": len(reply),
        "server": verdict,
        "intact": verdict["sha256"] == expected and verdict["bytes"] == total_bytes,
    }


def download(source: Endpoint, total_bytes: int, seed: int, timeout_s: float) -> dict[str, Any]:
    """Ask for the stream, read to EOF, compare with the stream regenerated here."""
    digest, received = hashlib.sha256(), 0
    request = f"DOWNLOAD {total_bytes} {seed}\n".encode()
    with socket.create_connection(source.sockaddr, timeout=timeout_s) as sock:
        sock.sendall(request)
        while chunk := sock.recv(CHUNK_BYTES):
            digest.update(chunk)
            received += len(chunk)
    expected = pattern_sha256(seed, total_bytes)
    return {
        "request_bytes": len(request),
        "received": received,
        "received_sha256": digest.hexdigest(),
        "intact": received == total_bytes and digest.hexdigest() == expected,
    }


def probe(to: Endpoint, send: bytes, timeout_s: float) -> dict[str, Any]:
    """Connect, send `send`, read until EOF, an error or the timeout: what did the client see?

    `connect` and `read` are "ok"/"eof"/"timeout" or the errno name (ECONNREFUSED, ECONNRESET):
    the difference between a refusal, a reset and a clean close is exactly what tests look at.
    """
    started = time.monotonic()
    result: dict[str, Any] = {"connect": "ok", "read": None, "received": 0}
    sock = socket.socket(to.family, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        try:
            sock.connect(to.sockaddr)
        except OSError as exc:
            result["connect"] = _outcome(exc)
            return result
        try:
            if send:
                sock.sendall(send)
            while chunk := sock.recv(65536):
                result["received"] += len(chunk)
            result["read"] = "eof"
        except OSError as exc:
            result["read"] = _outcome(exc)
        return result
    finally:
        sock.close()
        result["elapsed_s"] = round(time.monotonic() - started, 3)


def _outcome(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tproxy.lab.peers")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve")
    serve_cmd.add_argument("--port", type=int, required=True)
    for name in ("upload", "download"):
        cmd = commands.add_parser(name)
        cmd.add_argument("endpoint", type=parse_endpoint)
        cmd.add_argument("--bytes", type=int, required=True)
        cmd.add_argument("--seed", type=int, default=1)
        cmd.add_argument("--timeout", type=float, default=30.0)
    probe_cmd = commands.add_parser("probe")
    probe_cmd.add_argument("endpoint", type=parse_endpoint)
    probe_cmd.add_argument("--send", default="")
    probe_cmd.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(probe(args.endpoint, args.send.encode(), args.timeout)))
        return 0
    if args.command == "serve":
        serve(args.port)
        return 0
    transfer = upload if args.command == "upload" else download
    result = transfer(args.endpoint, args.bytes, args.seed, args.timeout)
    print(json.dumps(result))
    return 0 if result["intact"] else 1


if __name__ == "__main__":
    sys.exit(main())
