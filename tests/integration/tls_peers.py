"""TLS peers for the interception bad-input tests: a TLS echo server that says what it saw, a
server that never answers, a well-behaved TLS client, and a raw client that sends chosen bytes.
Run as a script inside a lab namespace (`python tls_peers.py COMMAND ...`); every command
prints JSON lines.

* `echo --port P --cert C --key K [--max-tls 1.2] [--handshake-timeout S]`: a TLS server (IPv4
  and IPv6) echoing every plaintext byte until the client's close_notify (answered with its
  own) or EOF. One line per connection once it ends: `peer`, `raw_in` (bytes read off the
  socket) and `raw_sha256` (of them), `hellos` (ClientHellos its TLS read: more than one is a
  renegotiation), `handshake` (completed), `echoed` (plaintext bytes), `end` (`close_notify`,
  `eof`, `reset`, `timeout`: the handshake took longer than S, or `tls_error`) and `error`.
* `mute --port P`: accepts and reads, never writes. One line per connection once it ends:
  `peer`, `raw_in`, `end` (`eof` or `reset`).
* `exchange ENDPOINT --name N --ca CA --bytes N [--hold]`: TLS to ENDPOINT for N (verified
  against CA), sends N random bytes in two halves, each echoed back, then close_notify and
  reads to the end. With `--hold`, prints `{"holding": true}` after the first half and waits
  for a line on stdin first. Last line: `ok` (every byte came back intact), `version`,
  `issuer`, `sent`, `echoed`, `error`.
* `raw ENDPOINT --file F --then wait|fin|rst [--timeout S]`: sends F's bytes in one write, then
  waits (`wait`), half-closes (`fin`) or resets (`rst`: SO_LINGER 0), and reads what comes back
  until EOF, a reset or S seconds. Prints `local` (its address), `end` (`eof`, `reset`,
  `timeout`, or `rst` when it reset), `received` (bytes), `records` (the TLS records' content
  types), `alerts` (the alert descriptions among them), `elapsed_s`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socket
import ssl
import struct
import sys
import threading
import time
from typing import Any

_READ_BYTES = 1 << 16
_ALERT = 21


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _print(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def _listen(port: int) -> socket.socket:
    """One dual-stack listener: IPv4 clients appear as IPv4-mapped IPv6 addresses."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", port))
    sock.listen(64)
    return sock


def _peer(conn: socket.socket) -> str:
    host, port = conn.getpeername()[:2]
    return f"{host.removeprefix('::ffff:')}:{port}"


def _serve(port: int, handle: Any) -> None:
    listener = _listen(port)
    _print({"listening": port})
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


# --- the echo server ---------------------------------------------------------------------------


class _Counted(ssl.SSLObject):
    """An SSLObject that counts the ClientHellos it read (`_msg_callback`, as tproxy.tls.legs)."""

    hellos = 0


def _count_hellos(  # noqa: PLR0917 -- OpenSSL's message callback, called positionally
    conn: object, direction: str, version: object, content_type: int, msg_type: int, data: bytes
) -> None:
    if content_type == 22 and msg_type == 1 and direction == "read" and isinstance(conn, _Counted):
        conn.hellos += 1


def _echo_context(cert: str, key: str, max_tls: str | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    if max_tls == "1.2":
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.sslobject_class = _Counted
    context._msg_callback = _count_hellos  # type: ignore[attr-defined]
    return context


def _echo_one(conn: socket.socket, context: ssl.SSLContext, handshake_timeout_s: float) -> None:
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_side=True)
    seen: dict[str, Any] = {"peer": _peer(conn), "raw_in": 0, "hellos": 0, "handshake": False,
                            "echoed": 0, "end": None, "error": None}  # fmt: skip
    digest = hashlib.sha256()
    conn.settimeout(handshake_timeout_s)
    try:
        while seen["end"] is None:
            try:
                data = conn.recv(_READ_BYTES)
            except TimeoutError:
                seen["end"] = "timeout"
                break
            except ConnectionResetError:
                seen["end"] = "reset"
                break
            seen["raw_in"] += len(data)
            digest.update(data)
            if data:
                incoming.write(data)
            else:
                incoming.write_eof()
            try:
                if not seen["handshake"]:
                    obj.do_handshake()
                    seen["handshake"] = True
                    conn.settimeout(None)
                while chunk := obj.read(_READ_BYTES):
                    obj.write(chunk)
                    seen["echoed"] += len(chunk)
                # SSLObject.read returns b"" for the client's close_notify: answer it.
                seen["end"] = "close_notify"
                with contextlib.suppress(ssl.SSLError):
                    obj.unwrap()
            except ssl.SSLWantReadError:
                if not data:
                    seen["end"] = "eof"
            except ssl.SSLZeroReturnError:
                seen["end"] = "close_notify"
            except ssl.SSLEOFError:
                seen["end"] = "eof"
            except ssl.SSLError as exc:
                seen["end"], seen["error"] = "tls_error", str(exc.reason or exc)
            with contextlib.suppress(OSError):
                if outgoing.pending:
                    conn.sendall(outgoing.read())
    except OSError as exc:
        seen["end"], seen["error"] = "reset", str(exc)
    finally:
        conn.close()
    seen["hellos"] = obj.hellos if isinstance(obj, _Counted) else 0
    seen["raw_sha256"] = digest.hexdigest()
    _print(seen)


# --- the mute server ---------------------------------------------------------------------------


def _mute_one(conn: socket.socket) -> None:
    seen: dict[str, Any] = {"peer": _peer(conn), "raw_in": 0, "end": None}
    with conn:
        try:
            while data := conn.recv(_READ_BYTES):
                seen["raw_in"] += len(data)
            seen["end"] = "eof"
        except OSError:
            seen["end"] = "reset"
    _print(seen)


# --- clients -----------------------------------------------------------------------------------


def _connect(to: tuple[str, int], timeout_s: float) -> socket.socket:
    family = socket.AF_INET6 if ":" in to[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.connect(to)
    return sock


def _recv_exactly(tls: ssl.SSLSocket, count: int) -> bytes:
    got = bytearray()
    while len(got) < count:
        chunk = tls.recv(min(_READ_BYTES, count - len(got)))
        if not chunk:
            break
        got += chunk
    return bytes(got)


def exchange(to: tuple[str, int], name: str, ca: str, count: int, hold: bool) -> dict[str, Any]:
    payload = os.urandom(count)
    half = count // 2
    result: dict[str, Any] = {"ok": False, "sent": 0, "echoed": 0, "error": None}
    context = ssl.create_default_context(cafile=ca)
    try:
        with (
            _connect(to, 30) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            cert: dict[str, Any] = dict(tls.getpeercert() or {})
            issuer = {key: value for ((key, value),) in cert.get("issuer", ())}
            result["version"], result["issuer"] = tls.version(), issuer.get("commonName")
            echoed = b""
            for at, part in enumerate((payload[:half], payload[half:])):
                if at == 1 and hold:
                    _print({"holding": True})
                    sys.stdin.readline()
                tls.sendall(part)
                result["sent"] += len(part)
                echoed += _recv_exactly(tls, len(part))
                result["echoed"] = len(echoed)
            tls.unwrap()  # our close_notify, then the server's
            result["ok"] = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    except (OSError, ValueError) as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    return result


def _records(data: bytes) -> tuple[list[int], list[int]]:
    """The content types of the TLS records in `data`, and the alerts' descriptions."""
    types: list[int] = []
    alerts: list[int] = []
    pos = 0
    while pos + 5 <= len(data):
        kind, _, length = struct.unpack_from(">BHH", data, pos)
        types.append(kind)
        if kind == _ALERT and pos + 7 <= len(data):
            alerts.append(data[pos + 6])
        pos += 5 + length
    return types, alerts


def raw(to: tuple[str, int], data: bytes, then: str, timeout_s: float) -> dict[str, Any]:
    sock = _connect(to, 10)
    local = sock.getsockname()
    result: dict[str, Any] = {"local": f"{local[0]}:{local[1]}"}
    started = time.monotonic()
    received = b""
    with sock:
        sock.sendall(data)
        if then == "rst":
            time.sleep(0.2)  # (its bytes are read by the proxy before the reset comes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            result["end"] = "rst"
        else:
            if then == "fin":
                sock.shutdown(socket.SHUT_WR)
            sock.settimeout(timeout_s)
            try:
                while chunk := sock.recv(_READ_BYTES):
                    received += chunk
                result["end"] = "eof"
            except TimeoutError:
                result["end"] = "timeout"
            except ConnectionResetError:
                result["end"] = "reset"
    types, alerts = _records(received)
    result.update(received=len(received), records=types, alerts=alerts,
                  elapsed_s=round(time.monotonic() - started, 3))  # fmt: skip
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    echo_cmd = commands.add_parser("echo")
    echo_cmd.add_argument("--port", type=int, required=True)
    echo_cmd.add_argument("--cert", required=True)
    echo_cmd.add_argument("--key", required=True)
    echo_cmd.add_argument("--max-tls", choices=("1.2",))
    echo_cmd.add_argument("--handshake-timeout", type=float, default=60.0)
    mute_cmd = commands.add_parser("mute")
    mute_cmd.add_argument("--port", type=int, required=True)
    exchange_cmd = commands.add_parser("exchange")
    exchange_cmd.add_argument("endpoint", type=_endpoint)
    exchange_cmd.add_argument("--name", required=True)
    exchange_cmd.add_argument("--ca", required=True)
    exchange_cmd.add_argument("--bytes", type=int, required=True)
    exchange_cmd.add_argument("--hold", action="store_true")
    raw_cmd = commands.add_parser("raw")
    raw_cmd.add_argument("endpoint", type=_endpoint)
    raw_cmd.add_argument("--file", required=True)
    raw_cmd.add_argument("--then", choices=("wait", "fin", "rst"), required=True)
    raw_cmd.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args()
    if args.command == "echo":
        context = _echo_context(args.cert, args.key, args.max_tls)
        timeout_s = args.handshake_timeout
        _serve(args.port, lambda conn: _echo_one(conn, context, timeout_s))
    elif args.command == "mute":
        _serve(args.port, _mute_one)
    elif args.command == "exchange":
        _print(exchange(args.endpoint, args.name, args.ca, args.bytes, args.hold))
    else:
        with open(args.file, "rb") as f:
            _print(raw(args.endpoint, f.read(), args.then, args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
