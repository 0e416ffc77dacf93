"""Raw TCP peers for the policy tests: exact bytes in chosen segments, and servers that say what
they got. Run as a script inside a lab namespace (`python wire.py COMMAND ...`); every client
command prints one JSON line.

* `sink --port P`: per connection, read to EOF, answer `{"bytes": N, "sha256": ...}` and close;
  print the same with the peer's address (one line per connection: what the server saw).
* `banner --port P --text T`: a server-first protocol: send T at once, then read to EOF.
* `send ENDPOINT --file F [--segment N] [--gap S]`: send F in N-byte writes S seconds apart
  (TCP_NODELAY: one segment each), half-close, read the answer to EOF.
* `first-bytes ENDPOINT`: connect, send nothing, time the server's first bytes.
* `fuzz ENDPOINT --count N --seed S`: N connections, each sending random bytes (random lengths,
  some shaped like truncated or oversized TLS records), half-closing and reading to the end;
  counts how each ended.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import hashlib
import json
import random
import socket
import sys
import time
from typing import Any


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _outcome(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _connect(to: tuple[str, int], timeout_s: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in to[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect(to)
    return sock


def send(to: tuple[str, int], data: bytes, segment: int, gap_s: float) -> dict[str, Any]:
    result: dict[str, Any] = {"connect": "ok", "read": None, "reply": ""}
    try:
        sock = _connect(to, 20)
    except OSError as exc:
        return {**result, "connect": _outcome(exc)}
    with sock:
        try:
            for at in range(0, len(data), segment or len(data) or 1):
                sock.send(data[at : at + (segment or len(data))])
                if gap_s:
                    time.sleep(gap_s)
            # ENOTCONN once reset: the recv below reports the reset itself.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            result["read"], result["reply"] = "eof", reply.decode(errors="replace")
        except OSError as exc:
            result["read"] = _outcome(exc)
    return result


def first_bytes(to: tuple[str, int], timeout_s: float) -> dict[str, Any]:
    started = time.monotonic()
    with _connect(to, timeout_s) as sock:
        try:
            data = sock.recv(4096)
        except OSError as exc:
            return {"read": _outcome(exc), "elapsed_s": time.monotonic() - started}
    return {"read": "ok", "data": data.decode(errors="replace"),
            "elapsed_s": round(time.monotonic() - started, 3)}  # fmt: skip


def _fuzz_payload(rng: random.Random) -> bytes:
    shape = rng.randrange(4)
    if shape == 0:  # random bytes of a random length
        return rng.randbytes(rng.randrange(1, 3000))
    if shape == 1:  # a TLS handshake record whose length lies (longer than what follows)
        body = rng.randbytes(rng.randrange(0, 200))
        length = rng.randrange(len(body) + 1, 1 << 16)
        return b"\x16\x03\x01" + length.to_bytes(2, "big") + b"\x01" + body
    if shape == 2:  # an oversized record: more than the sniffer holds
        return b"\x16\x03\x01\xff\xff\x01\xff\xff\xff" + rng.randbytes(17_000)
    return b"\x16\x03" + rng.randbytes(rng.randrange(0, 8))  # truncated header


async def _fuzz_one(to: tuple[str, int], payload: bytes, ends: dict[str, int]) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*to), 20)
    except (OSError, TimeoutError) as exc:
        key = f"connect {_outcome(exc) if isinstance(exc, OSError) else 'timeout'}"
        ends[key] = ends.get(key, 0) + 1
        return
    try:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), 30)
        key = "answered" if reply.startswith(b'{"bytes": ') else "no answer"
        if key == "answered" and json.loads(reply)["bytes"] != len(payload):
            key = "altered"
    except (OSError, TimeoutError) as exc:
        key = _outcome(exc) if isinstance(exc, OSError) else "timeout"
    finally:
        writer.close()
    ends[key] = ends.get(key, 0) + 1


async def fuzz(to: tuple[str, int], count: int, seed: int, concurrency: int) -> dict[str, Any]:
    rng = random.Random(seed)
    ends: dict[str, int] = {}
    limit = asyncio.Semaphore(concurrency)

    async def one(payload: bytes) -> None:
        async with limit:
            await _fuzz_one(to, payload, ends)

    await asyncio.gather(*(one(_fuzz_payload(rng)) for _ in range(count)))
    return {"ends": ends}


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.count = 0
        self.peer = ""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}"

    def data_received(self, data: bytes) -> None:
        self.digest.update(data)
        self.count += len(data)

    def eof_received(self) -> bool:
        answer = {"bytes": self.count, "sha256": self.digest.hexdigest()}
        assert self.transport is not None
        self.transport.write(json.dumps(answer).encode() + b"\n")
        self.transport.close()
        print(json.dumps({"peer": self.peer, **answer}), flush=True)
        return True


class _Banner(asyncio.Protocol):
    def __init__(self, text: bytes) -> None:
        self.text = text

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.text)
        peer = transport.get_extra_info("peername")
        print(json.dumps({"peer": f"{peer[0]}:{peer[1]}"}), flush=True)

    def eof_received(self) -> bool:
        return False


async def serve(port: int, factory: Any) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(factory, host, port, reuse_address=True)
               for host in ("0.0.0.0", "::")]  # fmt: skip
    print(json.dumps({"listening": port}), flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def main() -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    sink_cmd = commands.add_parser("sink")
    sink_cmd.add_argument("--port", type=int, required=True)
    banner_cmd = commands.add_parser("banner")
    banner_cmd.add_argument("--port", type=int, required=True)
    banner_cmd.add_argument("--text", required=True)
    send_cmd = commands.add_parser("send")
    send_cmd.add_argument("endpoint", type=_endpoint)
    send_cmd.add_argument("--file", required=True)
    send_cmd.add_argument("--segment", type=int, default=0)
    send_cmd.add_argument("--gap", type=float, default=0.0)
    first_cmd = commands.add_parser("first-bytes")
    first_cmd.add_argument("endpoint", type=_endpoint)
    first_cmd.add_argument("--timeout", type=float, default=10.0)
    fuzz_cmd = commands.add_parser("fuzz")
    fuzz_cmd.add_argument("endpoint", type=_endpoint)
    fuzz_cmd.add_argument("--count", type=int, required=True)
    fuzz_cmd.add_argument("--seed", type=int, default=1)
    fuzz_cmd.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args()
    if args.command == "sink":
        asyncio.run(serve(args.port, _Sink))
    elif args.command == "banner":
        text = args.text.encode()
        asyncio.run(serve(args.port, lambda: _Banner(text)))
    elif args.command == "send":
        with open(args.file, "rb") as data:
            print(json.dumps(send(args.endpoint, data.read(), args.segment, args.gap)))
    elif args.command == "first-bytes":
        print(json.dumps(first_bytes(args.endpoint, args.timeout)))
    else:
        print(json.dumps(asyncio.run(fuzz(args.endpoint, args.count, args.seed,
                                          args.concurrency))))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
