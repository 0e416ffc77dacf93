"""The lab's peers: a server and clients that prove bytes arrive intact and ends arrive as sent.

Protocol (one TCP connection per exchange, the first line is the request):

* ``UPLOAD [RATE]\\n`` then any bytes, then the client half-closes: the server reads to EOF (at
  most RATE bytes/s if given: a slow reader) and answers one JSON line ``{"peer": "ip:port",
  "bytes": N, "sha256": "..."}`` -- the reply travels after the client's FIN, which is exactly
  the half-close a proxy must carry.
* ``DOWNLOAD N SEED\\n``: the server sends N bytes of the deterministic stream for SEED, then FIN;
  the client regenerates the stream and compares sha256.
* ``ECHO\\n``: the server echoes every byte until the client's FIN, then sends its own FIN.
* ``HOLD\\n``: the server reads until the client's FIN and then just holds the connection open,
  never sending its own FIN (a peer that forgets to close).
* ``ABORT N SEED\\n``: the server sends N bytes of the stream, waits until the client side has
  acknowledged all of them, then resets the connection (RST): whatever the client then lacks was
  lost on the way, not by the server.

The server prints one JSON line per finished connection (`peer`, `request`, `end`: "eof",
"reset" or "aborted", `bytes_in`, `bytes_out`) so tests can see what the server saw. Run it as
``python -m tproxy.lab.peers serve --port P`` (IPv4 and IPv6); each client command prints one
JSON verdict.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import json
import random
import resource
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from tproxy.core.endpoint import Endpoint, parse_endpoint
from tproxy.interception.sockopts import LINGER_RESET, unacknowledged_bytes

CHUNK_BYTES = 1 << 20


def pattern_chunks(seed: int, total_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The deterministic byte stream for `seed`, in chunks, `total_bytes` long."""
    rng = random.Random(seed)
    left = total_bytes
    while left > 0:
        n = min(chunk_bytes, left)
        yield rng.randbytes(n)
        left -= n


def pattern_sha256(seed: int, total_bytes: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(seed, total_bytes):
        digest.update(chunk)
    return digest.hexdigest()


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the server ------------------------------------------------------------------------------


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.bytes_in = 0
        self.bytes_out = 0

    async def read(self, n: int) -> bytes:
        data = await self.reader.read(n)
        self.bytes_in += len(data)
        return data

    async def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.bytes_out += len(data)
        await self.writer.drain()


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    conn = _Connection(reader, writer)
    peer = Endpoint.from_sockaddr(writer.get_extra_info("peername"))
    request: list[str] = []
    end = "eof"
    try:
        request = (await reader.readline()).decode(errors="replace").split()
        verb = request[0] if request else ""
        if verb == "UPLOAD":
            rate = float(request[1]) if len(request) > 1 else 0.0
            await _serve_upload(conn, peer, rate)
        elif verb == "DOWNLOAD":
            for chunk in pattern_chunks(int(request[2]), int(request[1])):
                await conn.write(chunk)
            writer.write_eof()
            while await conn.read(CHUNK_BYTES):
                pass
        elif verb == "ECHO":
            while data := await conn.read(65536):
                await conn.write(data)
            writer.write_eof()
        elif verb == "HOLD":
            while await conn.read(65536):
                pass
            await asyncio.sleep(3600)  # hold: the proxy's half-closed limit must end this
        elif verb == "ABORT":
            for chunk in pattern_chunks(int(request[2]), int(request[1])):
                await conn.write(chunk)
            sock = writer.get_extra_info("socket")
            while unacknowledged_bytes(sock):
                await asyncio.sleep(0.001)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            writer.transport.abort()
            end = "aborted"
    except (ConnectionResetError, BrokenPipeError):
        end = "reset"
    finally:
        record = {"peer": str(peer), "request": " ".join(request), "end": end,
                  "bytes_in": conn.bytes_in, "bytes_out": conn.bytes_out}  # fmt: skip
        print(json.dumps(record), flush=True)
        writer.close()


async def _serve_upload(conn: _Connection, peer: Endpoint, rate: float) -> None:
    digest, total = hashlib.sha256(), 0
    started = time.monotonic()
    # A slow reader reads small chunks and sleeps to keep its rate.
    chunk_bytes = 65536 if rate <= 0 else max(1024, int(rate / 50))
    while chunk := await conn.read(chunk_bytes):
        digest.update(chunk)
        total += len(chunk)
        if rate > 0:
            ahead_s = total / rate - (time.monotonic() - started)
            if ahead_s > 0:
                await asyncio.sleep(ahead_s)
    reply = {"peer": str(peer), "bytes": total, "sha256": digest.hexdigest()}
    await conn.write(json.dumps(reply).encode() + b"\n")


async def serve(port: int) -> None:
    _raise_nofile()
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    server = await asyncio.start_server(_handle, sock=sock, backlog=4096)
    async with server:
        await server.serve_forever()


# --- the clients -----------------------------------------------------------------------------


def _connect(to: Endpoint, timeout_s: float, source: str | None = None) -> socket.socket:
    """Connected to `to`, from `source` (one of this host's addresses) when given."""
    bind = None if source is None else (source, 0)
    return socket.create_connection(to.sockaddr, timeout=timeout_s, source_address=bind)


def upload(
    to: Endpoint, total_bytes: int, seed: int, timeout_s: float, *, rate: float = 0,
    abort: bool = False, source: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Send the stream, half-close, read the server's verdict; or, with `abort`, reset instead."""
    request = b"UPLOAD\n" if rate <= 0 else f"UPLOAD {rate:g}\n".encode()
    with _connect(to, timeout_s, source) as sock:
        sock.sendall(request)
        for chunk in pattern_chunks(seed, total_bytes):
            sock.sendall(chunk)
        if abort:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            return {"request_bytes": len(request), "sent": total_bytes, "aborted": True,
                    "intact": True}  # fmt: skip
        sock.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    verdict = json.loads(reply)
    expected = pattern_sha256(seed, total_bytes)
    return {
        "request_bytes": len(request),
        "sent": total_bytes,
        "sent_sha256": expected,
        "reply_bytes": len(reply),
        "server": verdict,
        "intact": verdict["sha256"] == expected and verdict["bytes"] == total_bytes,
    }


def download(
    server: Endpoint, total_bytes: int, seed: int, timeout_s: float, *, abort: bool = False,
    read_rate: float = 0, source: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Ask for the stream, read to the end, compare with the stream regenerated here.

    With `abort` the server resets after sending; with `read_rate` this client reads slowly
    (bytes/s), so data is still queued in whatever is in between when the reset comes.
    """
    digest, received = hashlib.sha256(), 0
    verb = "ABORT" if abort else "DOWNLOAD"
    request = f"{verb} {total_bytes} {seed}\n".encode()
    end = "eof"
    started = time.monotonic()
    with _connect(server, timeout_s, source) as sock:
        if read_rate > 0:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(request)
        read_bytes = 65536 if read_rate <= 0 else max(1024, int(read_rate / 50))
        try:
            while chunk := sock.recv(read_bytes):
                digest.update(chunk)
                received += len(chunk)
                if read_rate > 0:
                    ahead_s = received / read_rate - (time.monotonic() - started)
                    if ahead_s > 0:
                        time.sleep(ahead_s)
        except OSError as exc:
            end = _outcome(exc)
    expected = pattern_sha256(seed, total_bytes)
    return {
        "request_bytes": len(request),
        "received": received,
        "received_sha256": digest.hexdigest(),
        "end": end,
        "intact": received == total_bytes and digest.hexdigest() == expected,
    }


def probe(to: Endpoint, send: bytes, timeout_s: float, half_close: bool = False) -> dict[str, Any]:
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
        except ConnectionResetError:
            # The handshake completed and a reset followed before connect() returned (a loaded
            # machine): what the client saw is a connection that was then reset, not a refusal
            # (a reset answering the SYN is ECONNREFUSED).
            result["read"] = "ECONNRESET"
            return result
        except OSError as exc:
            result["connect"] = _outcome(exc)
            return result
        try:
            if send:
                sock.sendall(send)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            while chunk := sock.recv(65536):
                result["received"] += len(chunk)
            result["read"] = "eof"
        except OSError as exc:
            result["read"] = _outcome(exc)
        return result
    finally:
        sock.close()
        result["elapsed_s"] = round(time.monotonic() - started, 3)


def chatter(to: Endpoint, interval_s: float, duration_s: float) -> dict[str, Any]:
    """An ECHO session that sends one byte every `interval_s` for `duration_s`: does it live?"""
    exchanged = 0
    with _connect(to, 5) as sock:
        sock.sendall(b"ECHO\n")
        deadline_at = time.monotonic() + duration_s
        try:
            while time.monotonic() < deadline_at:
                sock.sendall(b"x")
                if sock.recv(1) != b"x":
                    return {"survived": False, "exchanged": exchanged, "end": "eof"}
                exchanged += 1
                time.sleep(interval_s)
        except OSError as exc:
            return {"survived": False, "exchanged": exchanged, "end": _outcome(exc)}
    return {"survived": True, "exchanged": exchanged, "end": None}


async def _swarm_one(
    to: Endpoint,
    payload: bytes,
    connected: asyncio.Barrier,
    established: asyncio.Barrier,
    source: str | None = None,
) -> str:
    loop = asyncio.get_running_loop()
    sock = socket.socket(to.family, socket.SOCK_STREAM)
    sock.setblocking(False)
    outcome = ""
    try:
        try:
            if source is not None:
                sock.bind((source, 0))
            await loop.sock_connect(sock, to.sockaddr)
        except OSError as exc:
            outcome = _outcome(exc)
        await connected.wait()
        if not outcome:
            try:
                # Phase 2: one byte through and back proves the session reached the server.
                await loop.sock_sendall(sock, b"ECHO\n" + payload[:1])
                if await loop.sock_recv(sock, 1) != payload[:1]:
                    outcome = "eof"
            except OSError as exc:
                outcome = _outcome(exc)
        await established.wait()
        if outcome:
            return outcome
        try:
            await loop.sock_sendall(sock, payload[1:])
            sock.shutdown(socket.SHUT_WR)
            echoed = bytearray(payload[:1])
            while chunk := await loop.sock_recv(sock, 65536):
                echoed += chunk
        except OSError as exc:
            return _outcome(exc)
        return "intact" if echoed == payload else "corrupt"
    finally:
        sock.close()


async def swarm(
    to: Endpoint, count: int, payload_bytes: int, timeout_s: float = 60, source: str | None = None
) -> dict[str, Any]:
    """`count` ECHO sessions open at the same time, each with its own payload: what happened?

    All connect first; then each proves its session works with one echoed byte (or sees it
    reset); only when every one has an answer do they exchange the rest and close. So every
    session that is served is open at the same time as all the others. `source`: the client
    address to connect from (one of this host's).
    """
    _raise_nofile()
    connected, established = asyncio.Barrier(count), asyncio.Barrier(count)
    payloads = [random.Random(i).randbytes(payload_bytes) for i in range(count)]
    started = time.monotonic()

    async def bounded(payload: bytes) -> str:
        try:
            async with asyncio.timeout(timeout_s):
                return await _swarm_one(to, payload, connected, established, source)
        except TimeoutError:
            return "timeout"

    outcomes = await asyncio.gather(*(bounded(p) for p in payloads))
    counts = Counter(outcomes)
    return {"outcomes": dict(counts), "elapsed_s": round(time.monotonic() - started, 3)}


async def hold(to: Endpoint, count: int, source: str | None = None) -> None:
    """Open `count` ECHO sessions, prove each with one echoed byte, print the tally, then hold
    them all open, idle, until stdin closes (for measuring what an idle session costs)."""
    _raise_nofile()
    loop = asyncio.get_running_loop()
    socks: list[socket.socket] = []
    ready = 0
    for start in range(0, count, 500):  # in waves, so the listen backlogs never overflow
        wave = []
        for _ in range(start, min(count, start + 500)):
            sock = socket.socket(to.family, socket.SOCK_STREAM)
            sock.setblocking(False)
            if source is not None:
                sock.bind((source, 0))
            wave.append(sock)
        results = await asyncio.gather(
            *(_hold_one(loop, sock, to) for sock in wave), return_exceptions=True
        )
        ready += sum(1 for r in results if r is True)
        socks.extend(wave)
    print(json.dumps({"ready": ready}), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)
    for sock in socks:
        sock.close()


async def _hold_one(loop: asyncio.AbstractEventLoop, sock: socket.socket, to: Endpoint) -> bool:
    await loop.sock_connect(sock, to.sockaddr)
    await loop.sock_sendall(sock, b"ECHO\nx")
    return await loop.sock_recv(sock, 1) == b"x"


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
        cmd.add_argument("--timeout", type=float, default=60.0)
        cmd.add_argument("--rate", type=float, default=0, help="slow side's bytes/s")
        cmd.add_argument("--abort", action="store_true", help="reset at the end instead of FIN")
        cmd.add_argument("--source", help="connect from this address (one of this host's)")
    probe_cmd = commands.add_parser("probe")
    probe_cmd.add_argument("endpoint", type=parse_endpoint)
    probe_cmd.add_argument("--send", default="")
    probe_cmd.add_argument("--timeout", type=float, default=5.0)
    probe_cmd.add_argument(
        "--half-close", action="store_true", help="shut down writing after --send"
    )
    chatter_cmd = commands.add_parser("chatter")
    chatter_cmd.add_argument("endpoint", type=parse_endpoint)
    chatter_cmd.add_argument("--interval", type=float, default=0.5)
    chatter_cmd.add_argument("--duration", type=float, default=4.0)
    swarm_cmd = commands.add_parser("swarm")
    swarm_cmd.add_argument("endpoint", type=parse_endpoint)
    swarm_cmd.add_argument("--count", type=int, required=True)
    swarm_cmd.add_argument("--bytes", type=int, default=10_000)
    swarm_cmd.add_argument("--source", help="connect from this address (one of this host's)")
    hold_cmd = commands.add_parser("hold")
    hold_cmd.add_argument("endpoint", type=parse_endpoint)
    hold_cmd.add_argument("--count", type=int, required=True)
    hold_cmd.add_argument("--source", help="connect from this address (one of this host's)")
    args = parser.parse_args(argv)

    if args.command == "hold":
        asyncio.run(hold(args.endpoint, args.count, args.source))
        return 0
    if args.command == "serve":
        asyncio.run(serve(args.port))
        return 0
    if args.command == "upload":
        result = upload(args.endpoint, args.bytes, args.seed, args.timeout, rate=args.rate,
                        abort=args.abort, source=args.source)  # fmt: skip
    elif args.command == "download":
        result = download(args.endpoint, args.bytes, args.seed, args.timeout, abort=args.abort,
                          read_rate=args.rate, source=args.source)  # fmt: skip
    elif args.command == "probe":
        result = probe(args.endpoint, args.send.encode(), args.timeout, args.half_close)
    elif args.command == "chatter":
        result = chatter(args.endpoint, args.interval, args.duration)
    else:
        result = asyncio.run(swarm(args.endpoint, args.count, args.bytes, source=args.source))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
