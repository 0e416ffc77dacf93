"""The pinned A/B's scraper: `GET /metrics` once a second, as Prometheus would, one line each.

`python -m bench.pinned_scrape HOST:PORT` asks tproxy's metrics endpoint (`--metrics-listen`)
for its exposition every `INTERVAL_S`, on a fixed schedule, with Prometheus's Accept header (so
the supervisor renders what Prometheus would get) on a new connection each time (the endpoint
answers one request per connection), and prints one JSON line per scrape: `{"closed": N}`, the
sessions its `tproxy_sessions_closed_total` counted, or `{"error": WHY}`. It runs until it is
stopped (SIGTERM). `bench.pinned` starts it on wrk's CPU, so the scrapes cost the proxy's CPU
only what the proxy does to answer them.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Final

from bench.pinned_engine import parse_hostport

INTERVAL_S: Final = 1.0
TIMEOUT_S: Final = 5.0
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024
# Prometheus 2's Accept header for a scrape (its default scrape protocols).
ACCEPT: Final = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
_CLOSED: Final = b"tproxy_sessions_closed_total"
_CLOSED_TYPES: Final = (b"tproxy_sessions_closed", _CLOSED)  # OpenMetrics's name, the text's


class ScrapeError(Exception):
    """The endpoint did not answer with an exposition; the message says why."""


def render_request(host: str, port: int) -> bytes:
    return (f"GET /metrics HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: {ACCEPT}\r\n"
            "User-Agent: bench.pinned_scrape\r\nConnection: close\r\n\r\n").encode()  # fmt: skip


def parse_response(data: bytes) -> bytes:
    """The body of a 200 response read to its end (the endpoint closes after it).

    Raises:
        ScrapeError: no complete 200 response.
    """
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ScrapeError(f"no complete response head ({len(data)} bytes)")
    status = head.split(b"\r\n", 1)[0]
    if status.split(b" ", 2)[1:2] != [b"200"]:
        raise ScrapeError(f"answered {status.decode(errors='replace')!r}")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and int(value) != len(body):
            raise ScrapeError(f"{len(body)} bytes of body for Content-Length {int(value)}")
    return body


def closed_sessions(body: bytes) -> int:
    """The sum of `tproxy_sessions_closed_total`'s samples in an exposition (either format).

    Raises:
        ScrapeError: the exposition has no such metric.
    """
    total = 0.0
    found = False
    for line in body.splitlines():
        if line.startswith(_CLOSED) and line[len(_CLOSED) : len(_CLOSED) + 1] in (b"{", b" "):
            total += float(line.rsplit(b" ", 1)[1])
            found = True
        elif line.startswith(b"# TYPE ") and line.split()[2] in _CLOSED_TYPES:  # no samples yet
            found = True
    if not found:
        raise ScrapeError("no tproxy_sessions_closed_total in the exposition")
    return int(total)


def scrape(addr: tuple[str, int]) -> int:
    """One scrape: the sessions the endpoint at `addr` counted as closed.

    Raises:
        OSError: the connection failed.
        ScrapeError: the answer was not an exposition.
    """
    with socket.create_connection(addr, timeout=TIMEOUT_S) as sock:
        sock.sendall(render_request(*addr))
        chunks = []
        size = 0
        while chunk := sock.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise ScrapeError(f"more than {MAX_RESPONSE_BYTES} bytes of answer")
    return closed_sessions(parse_response(b"".join(chunks)))


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m bench.pinned_scrape HOST:PORT", file=sys.stderr)
        return 2
    addr = parse_hostport(argv[0])
    next_at = time.monotonic()
    while True:
        line: dict[str, int | str]
        try:
            line = {"closed": scrape(addr)}
        except (OSError, ScrapeError, ValueError) as exc:
            line = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(line), flush=True)
        next_at += INTERVAL_S
        time.sleep(max(0.0, next_at - time.monotonic()))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
