"""The addons in examples/, driven hook by hook with a fake session: real HTTP/1 requests and
responses cut at every offset into two chunks and into random chunkings (hypothesis), several
messages per connection; the bytes that come out are exactly the expected ones (unchanged where
an addon passes them through), and garbage never makes a hook raise."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
import tracemalloc
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tproxy.addons import http1
from tproxy.addons.api import InterceptedTLS, reset
from tproxy.addons.loader import MODULE_PREFIX, load_addon_file, module_name
from tproxy.core.options import ConfigError
from tproxy.sniffers.classify import Sniffed
from tproxy.sniffers.facts import HttpRequest

NOT_YET_INTERCEPTED = InterceptedTLS(None, None, None, None, upstream_verified=False, failure=None)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FRAMED = ("http_log.py", "rewrite_response.py", "block_uploads.py")


def _load(name: str, **env: str) -> types.ModuleType:
    """Load examples/NAME as tproxy does, with exactly the TPROXY_* variables `env`."""
    path = str(EXAMPLES / name)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TPROXY_")}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        load_addon_file(path)
    return sys.modules[module_name(path)]


@pytest.fixture(scope="module", autouse=True)
def _forget_addon_modules() -> Iterator[None]:
    yield
    for name in [k for k in sys.modules if k.startswith(MODULE_PREFIX)]:
        del sys.modules[name]


@dataclass
class FakeSession:
    """What a hook is given, recording what the addon asks for."""

    sniffed: Sniffed | None = field(
        default_factory=lambda: Sniffed("http", HttpRequest("GET", "example.test", "/"))
    )
    id: str = "0Q3H5V8K2M4PX"
    client: tuple[str, int] = ("198.18.0.2", 41000)
    dst: tuple[str, int] = ("198.18.2.2", 80)
    state: dict[str, Any] = field(default_factory=dict)
    claimed: bool = False
    to_client: list[bytes] = field(default_factory=list)
    to_upstream: list[bytes] = field(default_factory=list)
    closed: bool = False
    was_reset: bool = False
    client_shut: bool = False  # send_to_client raises, as after the client's FIN was sent
    tls: InterceptedTLS | None = None  # set: a `tls = "intercept"` rule decrypts the session

    def claim(self) -> None:
        self.claimed = True

    def send_to_client(self, data: bytes) -> None:
        if self.client_shut or self.closed:
            raise RuntimeError("the client's side is shut")
        self.to_client.append(bytes(data))

    def send_to_upstream(self, data: bytes) -> None:
        self.to_upstream.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def reset(self) -> None:
        self.was_reset = True


def _call(hook: Callable[..., Any], *args: Any) -> bytes:
    out = hook(*args)
    assert isinstance(out, bytes | bytearray | memoryview), out
    return bytes(out)


def _relay(
    addon: types.ModuleType,
    client_chunks: list[bytes],
    server_chunks: list[bytes],
    session: FakeSession | None = None,
) -> tuple[bytes, bytes, FakeSession]:
    """Run a claimed session's hooks: every client chunk, the client's FIN, then every server
    chunk (each response after its request), the server's FIN, the end. Returns what went to
    the upstream and to the client."""
    session = session or FakeSession()
    addon.session_start(session)
    assert session.claimed
    up = b"".join(_call(addon.client_data, session, chunk) for chunk in client_chunks)
    if hasattr(addon, "client_eof"):
        up += _call(addon.client_eof, session)
    down = b""
    if hasattr(addon, "server_data"):
        down = b"".join(_call(addon.server_data, session, chunk) for chunk in server_chunks)
    if hasattr(addon, "server_eof"):
        down += _call(addon.server_eof, session)
    if hasattr(addon, "session_end"):
        addon.session_end(session)
    return up, down, session


def _cut(data: bytes, offsets: list[int]) -> list[bytes]:
    cuts = [0, *sorted(set(offsets)), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts)]


def _two_ways(data: bytes) -> Iterator[list[bytes]]:
    """`data` cut at every offset into two chunks."""
    for offset in range(len(data) + 1):
        yield [data[:offset], data[offset:]]


def _chunkings(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=40).map(lambda cuts: _cut(data, cuts))


# --- one keep-alive connection: five requests (pipelined), seven responses -------------------

REQUESTS = (
    b"GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"
    b"POST /upload HTTP/1.1\r\nHost: example.test\r\nContent-Length: 11\r\n"
    b"Expect: 100-continue\r\n\r\nhello there"
    b"PUT /c HTTP/1.1\r\nHost: example.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=x\r\nhello\r\n0\r\nTrailer: yes\r\n\r\n"
    b"HEAD / HTTP/1.1\r\nHost: example.test\r\n\r\n"
    b"\r\nGET /again HTTP/1.1\r\nHost: example.test\r\n\r\n"
    b"GET /gz HTTP/1.1\r\nHost: example.test\r\n\r\n"
    b'GET /\xc3\xa9"\\x HTTP/1.0\r\nHost: example.test\r\n\r\n'
)
RESPONSE_LINES = [
    '"GET / HTTP/1.1" 200',
    '"POST /upload HTTP/1.1" 201',
    '"PUT /c HTTP/1.1" 204',
    '"HEAD / HTTP/1.1" 200',
    '"GET /again HTTP/1.1" 200',
    '"GET /gz HTTP/1.1" 200',
    '"GET /\\xc3\\xa9\\x22\\x5cx HTTP/1.0" 200',
]
GZIP_BODY = b"\x1f\x8b\x08\x00hello\x00\xff"
RESPONSES = [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 12\r\n\r\nhello world\n",
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\nX-Rewritten-By: nginx\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n",  # to HEAD: no body
    b"HTTP/1.1 200 OK\r\nx-rewritten-by: someone\r\nContent-Length:  24 \r\n\r\n"
    b"hello, hello, and hellO\n",
    b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(GZIP_BODY)
    + GZIP_BODY,
    b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello until the server's FIN\n",
]
REWRITTEN = [
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\n"
    b"X-Rewritten-By: tproxy\r\n\r\ngoodbye world\n",
    RESPONSES[1],
    RESPONSES[2],
    RESPONSES[3],
    b"HTTP/1.1 200 OK\r\nContent-Length: 28\r\nX-Rewritten-By: tproxy\r\n\r\n"
    b"goodbye, goodbye, and hellO\n",
    RESPONSES[5],
    RESPONSES[6],
]
ALL_RESPONSES = b"".join(RESPONSES)


# --- more connections: pipelining past the bound, a declined and an accepted upgrade ------


def _pipelined_gets(count: int) -> tuple[bytes, bytes]:
    """`count` pipelined GETs of /0, /1, ... and their responses, each status telling which
    request it answers (200 + i)."""
    requests = b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(count))
    responses = b"".join(
        b"HTTP/1.1 %d OK\r\nContent-Length: 0\r\n\r\n" % (200 + i) for i in range(count)
    )
    return requests, responses


UPGRADE_DECLINED = [
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    b"HEAD /big HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n",
]


UPGRADE_DECLINED_ANSWERS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    b"HTTP/1.1 200 OK\r\nContent-Length: 30\r\n\r\n",  # to HEAD: no body
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\nnope!",
]


def _turns(
    addon: types.ModuleType, requests: list[bytes], responses: list[bytes]
) -> tuple[list[bytes], FakeSession]:
    """Each request, then its response: what the client got for each."""
    session = FakeSession()
    addon.session_start(session)
    got = []
    for request, response in zip(requests, responses, strict=True):
        assert _call(addon.client_data, session, request) == request
        got.append(_call(addon.server_data, session, response))
    return got, session


WEBSOCKET = (
    b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


SWITCHED = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


CONNECT = b"CONNECT example.test:443 HTTP/1.1\r\nHost: example.test:443\r\n\r\n"


def test_each_example_loads_with_its_hooks() -> None:
    hooks = {
        "http_log.py": ["session_start", "client_data", "server_data", "session_end"],
        "rewrite_response.py": ["session_start", "client_data", "server_data", "server_eof"],
        "block_uploads.py": ["session_start", "client_data", "client_eof"],
        "fault_injector.py": ["session_start", "client_data", "server_data"],
    }
    for name, expected in hooks.items():
        [addon] = load_addon_file(str(EXAMPLES / name))
        assert [hook.name for hook in addon.hooks] == expected, name
        assert addon.sniff is (name != "fault_injector.py")
        assert [h.is_async for h in addon.hooks] == [name == "fault_injector.py"] * len(expected)


@pytest.mark.parametrize("name", ["http_log.py", "rewrite_response.py"])
@pytest.mark.parametrize("sniffed", [None, Sniffed("tls"), Sniffed("silent"), Sniffed("unknown")])
def test_the_http_examples_claim_only_http(name: str, sniffed: Sniffed | None) -> None:
    session = FakeSession(sniffed=sniffed)
    assert _load(name).session_start(session) is None
    assert not session.claimed and session.state == {}


@pytest.mark.parametrize("name", ["http_log.py", "rewrite_response.py", "block_uploads.py"])
def test_the_http_examples_claim_what_tproxy_intercepts(name: str) -> None:
    """In `session_start` of a session a `tls = "intercept"` rule decrypts, `session.tls` is
    set (both legs still None): the examples claim it, to see its plaintext."""
    session = FakeSession(sniffed=Sniffed("tls"), tls=NOT_YET_INTERCEPTED)
    assert _load(name).session_start(session) is None
    assert session.claimed


# --- the framer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def framing() -> types.ModuleType:
    """`tproxy.addons.http1`, as the examples import it (http_log, logging to /dev/null, for the
    test that feeds it garbage)."""
    return _load("http_log.py", TPROXY_HTTP_LOG=os.devnull)


def _framed(
    framing: types.ModuleType, chunks: list[bytes], response: bool
) -> tuple[list[Any], bytes]:
    """The framer's pieces for `chunks` (for responses: after REQUESTS were framed, so that
    it knows which answers a HEAD), and what it holds at the end."""
    framer = requests = framing.HTTP1Framer(response=False)
    if response:
        requests.feed(REQUESTS)
        framer = framing.HTTP1Framer(response=True, connection=requests.connection)
    pieces = [piece for chunk in chunks for piece in framer.feed(chunk)]
    return pieces, bytes(framer.pending)


def test_the_framer_finds_every_message_however_cut(framing: types.ModuleType) -> None:
    for chunks in _two_ways(REQUESTS):
        pieces, pending = _framed(framing, chunks, response=False)
        assert b"".join(p.raw for p in pieces) == REQUESTS and pending == b""
        heads = [p.head.start_line for p in pieces if p.kind == "head"]
        assert len(heads) == 7 and [p.kind for p in pieces].count("end") == 7
    for chunks in _two_ways(ALL_RESPONSES):
        pieces, pending = _framed(framing, chunks, response=True)
        assert b"".join(p.raw for p in pieces) == ALL_RESPONSES and pending == b""
        statuses = [p.head.status for p in pieces if p.kind == "head"]
        assert statuses == [200, 100, 201, 204, 200, 200, 200, 200]
        assert [p.kind for p in pieces].count("end") == 7  # the last one ends at the FIN


@pytest.mark.parametrize(
    "stream", [b"GET /" + b"a" * 70_000, b"\r\n" * 40_000, b"GET / HTTP/1.1\r\nX: " + b"b" * 70_000]
)
def test_the_framer_gives_up_on_a_head_over_64_kib_quickly(
    framing: types.ModuleType, stream: bytes
) -> None:
    """Byte by byte (a read per byte), the framer gives up at 64 KiB, holding nothing."""
    framer = framing.HTTP1Framer(response=False)
    pieces = [piece for i in range(len(stream)) for piece in framer.feed(stream[i : i + 1])]
    assert [p.kind for p in pieces][-1] == "opaque" and framer.state == "opaque"
    assert b"".join(p.raw for p in pieces) == stream and not framer.pending


HTTPISH = st.lists(
    st.sampled_from([REQUESTS[:40], REQUESTS[40:130], *RESPONSES, b"\r\n", b"0\r\n", b":"])
    | st.binary(max_size=30),
    max_size=12,
).map(b"".join)


@given(st.data())
def test_the_framer_returns_every_byte_of_anything(
    framing: types.ModuleType, data: st.DataObject
) -> None:
    stream = data.draw(HTTPISH)
    chunks = data.draw(_chunkings(stream))
    for response in (False, True):
        pieces, pending = _framed(framing, chunks, response)
        assert b"".join(p.raw for p in pieces) + pending == stream


@given(st.data())
def test_the_framer_frames_the_same_messages_however_cut(
    framing: types.ModuleType, data: st.DataObject
) -> None:
    """The heads and the message ends do not depend on the chunks (only how body and opaque
    bytes are cut into pieces does)."""
    stream = data.draw(HTTPISH)
    chunks = data.draw(_chunkings(stream))
    for response in (False, True):
        whole, whole_pending = _framed(framing, [stream], response)
        cut, cut_pending = _framed(framing, chunks, response)

        def messages(pieces: list[Any]) -> list[Any]:
            return [(p.kind, p.raw, p.head) for p in pieces if p.kind in ("head", "end")]

        assert messages(cut) == messages(whole)
        assert ("opaque" in [p.kind for p in cut]) == ("opaque" in [p.kind for p in whole])
        assert b"".join(p.raw for p in cut) + cut_pending == stream
        assert cut_pending == whole_pending


CLIENT_PARTS = st.sampled_from(
    [REQUESTS[:40], REQUESTS[40:130], REQUESTS, WEBSOCKET, CONNECT, *UPGRADE_DECLINED,
     b"GET /" + b"l" * 300 + b" HTTP/1.1\r\n\r\n", b"\x81\x85abcd", b"\r\n"]
) | st.binary(max_size=20)  # fmt: skip


SERVER_PARTS = st.sampled_from(
    [*RESPONSES, SWITCHED, b"HTTP/1.1 200 Connection established\r\n\r\n",
     *UPGRADE_DECLINED_ANSWERS, b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n"]
) | st.binary(max_size=20)  # fmt: skip


@given(st.data())
def test_the_two_framers_of_a_connection_pair_in_order_and_stop_together(
    framing: types.ModuleType, data: st.DataObject
) -> None:
    """Client and server chunks in any order: every byte comes back on each side, the waiting
    requests stay within their bounds, a response is paired only with the request its place
    says it answers, and after a 101 (or a 2xx to a CONNECT) the client's side is opaque."""
    client = data.draw(_chunkings(b"".join(data.draw(st.lists(CLIENT_PARTS, max_size=40)))))
    server = data.draw(_chunkings(b"".join(data.draw(st.lists(SERVER_PARTS, max_size=40)))))
    up = framing.HTTP1Framer(response=False)
    down = framing.HTTP1Framer(response=True, connection=up.connection)
    connection = up.connection
    fed_up, fed_down, got_up, got_down = b"", b"", [], []
    turns = data.draw(st.permutations([True] * len(client) + [False] * len(server)))
    for from_client in turns:
        if from_client:
            switched = connection.switched
            chunk = client.pop(0)
            fed_up += chunk
            pieces = up.feed(chunk)
            if switched:
                assert all(p.kind == "opaque" for p in pieces)
            got_up += pieces
        else:
            chunk = server.pop(0)
            fed_down += chunk
            got_down += down.feed(chunk)
        assert len(connection.waiting) <= http1.MAX_WAITING_REQUESTS
        kept = sum(len(r.method) + len(r.start_line) for r in connection.waiting)
        assert connection.waiting_bytes == kept <= http1.MAX_WAITING_BYTES
    assert b"".join(p.raw for p in got_up) + up.pending == fed_up
    assert b"".join(p.raw for p in got_down) + down.pending == fed_down
    requests = [p.head.start_line[:200] for p in got_up if p.kind == "head"]
    answered = [p.head.request.start_line for p in got_down if p.head and p.head.request]
    assert answered == requests[: len(answered)]


def test_a_waiting_request_keeps_only_its_method_and_the_start_of_its_line(
    framing: types.ModuleType,
) -> None:
    framer = framing.HTTP1Framer(response=False)
    long_line = b"GET /" + b"x" * 1000 + b" HTTP/1.1"
    framer.feed(long_line + b"\r\nHost: a\r\n" + b"X: y\r\n" * 1000 + b"\r\n")
    [request] = framer.connection.waiting
    assert (request.method, request.start_line) == (b"GET", long_line[:200])
    # 4 KiB of request lines: the 21st such request is not recorded, nor any after it.
    for _ in range(30):
        framer.feed(long_line + b"\r\n\r\n")
    assert len(framer.connection.waiting) == 4096 // 203 and framer.connection.requests_lost
    framer.connection.waiting.clear()
    framer.connection.waiting_bytes = 0
    framer.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert not framer.connection.waiting  # lost once: pairing cannot start again


@pytest.mark.parametrize(
    ("stream", "response"),
    [
        (b"GET / HTTP/1.1\r\nX: \x00", False),  # a byte no head holds
        (b"\x16\x03\x01\x02\x00\x01", False),  # a TLS ClientHello
        (b"EHLO mail.example.test\r\n", False),  # a first line that is no request line
        (b"SSH-2.0-OpenSSH_9.6\r\n", True),  # nor a status line
        (b"\x81\x85abcd TOP", False),  # a WebSocket frame: no method before a space
        (b"HTTP/2 200", True),  # no "HTTP/1."
    ],
)
def test_the_framer_stops_at_once_on_what_is_not_http1(
    framing: types.ModuleType, stream: bytes, response: bool
) -> None:
    """Without waiting for the end of a head that will never come."""
    framer = framing.HTTP1Framer(response=response)
    assert [(p.kind, p.raw) for p in framer.feed(stream)] == [("opaque", stream)]
    assert not framer.inside_message and not framer.pending


def test_the_framer_is_inside_a_message_until_it_ends(framing: types.ModuleType) -> None:
    framer = framing.HTTP1Framer(response=False)
    steps = [(b"GET / HT", True), (b"TP/1.1\r\n\r\n", False), (b"POST / HTTP", True),
             (b"/1.1\r\nContent-Length: 2\r\n\r\na", True), (b"b", False)]  # fmt: skip
    for chunk, inside in steps:
        framer.feed(chunk)
        assert framer.inside_message is inside, chunk


# --- http_log --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def log_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("http_log") / "http.log"


@pytest.fixture(scope="module")
def http_log(log_path: Path) -> types.ModuleType:
    return _load("http_log.py", TPROXY_HTTP_LOG=str(log_path))


def _logged(log_path: Path) -> list[str]:
    """The log's lines without their time stamps; the log emptied."""
    lines = log_path.read_text().splitlines() if log_path.exists() else []
    log_path.write_text("")
    for line in lines:
        assert line.isascii() and line.isprintable()
    return [line.split(" ", 1)[1] for line in lines]


def _expected_log(lines: list[str]) -> list[str]:
    return [f"0Q3H5V8K2M4PX 198.18.0.2:41000 -> 198.18.2.2:80 {line}" for line in lines]


def test_http_log_logs_each_request_and_status_however_cut(
    http_log: types.ModuleType, log_path: Path
) -> None:
    _logged(log_path)
    for chunks in _two_ways(REQUESTS):
        up, down, _ = _relay(http_log, chunks, [ALL_RESPONSES])
        assert (up, down) == (REQUESTS, ALL_RESPONSES)
        assert _logged(log_path) == _expected_log(RESPONSE_LINES)
    for chunks in _two_ways(ALL_RESPONSES):
        up, down, _ = _relay(http_log, [REQUESTS], chunks)
        assert (up, down) == (REQUESTS, ALL_RESPONSES)
        assert _logged(log_path) == _expected_log(RESPONSE_LINES)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_http_log_random_chunkings(
    http_log: types.ModuleType, log_path: Path, data: st.DataObject
) -> None:
    _logged(log_path)
    client = data.draw(_chunkings(REQUESTS))
    server = data.draw(_chunkings(ALL_RESPONSES))
    up, down, _ = _relay(http_log, client, server)
    assert (up, down) == (REQUESTS, ALL_RESPONSES)
    assert _logged(log_path) == _expected_log(RESPONSE_LINES)


def test_http_log_logs_requests_without_a_response_at_the_end(
    http_log: types.ModuleType, log_path: Path
) -> None:
    _logged(log_path)
    _relay(http_log, [REQUESTS], [RESPONSES[0]])
    unanswered = [line.rsplit(" ", 1)[0] + " -" for line in RESPONSE_LINES[1:]]
    assert _logged(log_path) == _expected_log([RESPONSE_LINES[0], *unanswered])


def test_http_log_brackets_ipv6_addresses(http_log: types.ModuleType, log_path: Path) -> None:
    _logged(log_path)
    session = FakeSession(client=("2001:db8:1::2", 41000), dst=("2001:db8:2::2", 80))
    _relay(http_log, [REQUESTS[:38]], [RESPONSES[0]], session)
    assert _logged(log_path) == [
        '0Q3H5V8K2M4PX [2001:db8:1::2]:41000 -> [2001:db8:2::2]:80 "GET / HTTP/1.1" 200'
    ]


def test_http_log_cuts_and_escapes_what_the_client_sent(
    http_log: types.ModuleType, log_path: Path
) -> None:
    _logged(log_path)
    request = b"GET /" + b'\xff"\\' * 100 + b" HTTP/1.1\r\n\r\n"
    _relay(http_log, [request], [RESPONSES[0]])
    [line] = _logged(log_path)
    # 200 characters at most, and an escape is never cut: 5 + 48 escapes of 4 characters.
    assert line.endswith(' "GET /' + "\\xff\\x22\\x5c" * 16 + '" 200')


@given(st.data())
def test_http_log_passes_garbage_unchanged(framing: types.ModuleType, data: st.DataObject) -> None:
    http_log = framing  # logging to /dev/null
    client, server = data.draw(HTTPISH), data.draw(HTTPISH)
    up, down, _ = _relay(http_log, data.draw(_chunkings(client)), data.draw(_chunkings(server)))
    assert (up, down) == (client, server)


def test_http_log_never_pairs_a_status_with_the_wrong_request(
    http_log: types.ModuleType, log_path: Path
) -> None:
    """More requests waiting than it remembers: the ones it remembers are logged with their
    own statuses, the rest not at all (never with another request's status)."""
    _logged(log_path)
    requests, responses = _pipelined_gets(130)
    assert _relay(http_log, [requests], [responses])[:2] == (requests, responses)
    lines = _logged(log_path)
    assert len(lines) >= 16
    for line in lines:
        request, status = line.split('"')[1], int(line.rsplit(" ", 1)[1])
        assert request == f"GET /{status - 200} HTTP/1.1", line


@pytest.mark.parametrize("name", ["http_log.py", "rewrite_response.py"])
def test_a_session_of_huge_unanswered_heads_holds_little_memory(name: str) -> None:
    """A client pipelining heads of 16 KiB of tiny headers to a server that never answers:
    what the addon keeps per session stays small (it was whole parsed heads, 128 of them)."""
    addon = _load(name, TPROXY_HTTP_LOG=os.devnull)
    head = b"GET / HTTP/1.1\r\n" + b"ab:\r\n" * 3200 + b"\r\n"
    session = FakeSession()
    addon.session_start(session)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(48):
            addon.client_data(session, head)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 256 * 1024, held


def test_http_log_after_a_declined_upgrade(http_log: types.ModuleType, log_path: Path) -> None:
    """`Upgrade: h2c` answered 200 (curl --http2 on http://): still HTTP/1.1, still logged."""
    _logged(log_path)
    got, session = _turns(http_log, UPGRADE_DECLINED, UPGRADE_DECLINED_ANSWERS)
    http_log.session_end(session)
    assert got == UPGRADE_DECLINED_ANSWERS
    assert _logged(log_path) == _expected_log(
        ['"GET / HTTP/1.1" 200', '"HEAD /big HTTP/1.1" 200', '"GET /x HTTP/1.1" 404']
    )


def test_http_log_logs_a_websocket_upgrade_with_its_101(
    http_log: types.ModuleType, log_path: Path
) -> None:
    _logged(log_path)
    frames = b"\x81\x85abcdGET / HTTP/1.1\r\n\r\n"  # after the 101, nothing is a request
    _relay(http_log, [WEBSOCKET, frames], [SWITCHED + b"\x81\x05hello"])
    assert _logged(log_path) == _expected_log(['"GET /chat HTTP/1.1" 101'])


@pytest.mark.parametrize("path", ["/nonexistent-dir/http.log", "/dev/full"])
def test_http_log_that_cannot_write_its_file_says_so_once_and_passes_the_bytes(
    path: str, capfd: pytest.CaptureFixture[str]
) -> None:
    addon = _load("http_log.py", TPROXY_HTTP_LOG=path)
    for _ in range(3):
        up, down, _ = _relay(addon, [REQUESTS], [ALL_RESPONSES])  # no hook raises
        assert (up, down) == (REQUESTS, ALL_RESPONSES)
    [report] = capfd.readouterr().err.splitlines()
    assert report.startswith(f"http_log: cannot write {path}: ")


def test_http_log_writes_whole_lines_through_short_writes_on_one_descriptor(
    log_path: Path,
) -> None:
    addon = _load("http_log.py", TPROXY_HTTP_LOG=str(log_path))
    _logged(log_path)
    real_write, real_open = os.write, os.open
    opened = []

    def short_write(fd: int, data: bytes) -> int:
        return real_write(fd, bytes(data)[:7])

    def counted_open(*args: Any) -> int:
        opened.append(args[0])
        return real_open(*args)

    with mock.patch.object(os, "write", short_write), mock.patch.object(os, "open", counted_open):
        for _ in range(2):
            _relay(addon, [REQUESTS], [ALL_RESPONSES])
    assert _logged(log_path) == _expected_log(RESPONSE_LINES) * 2
    assert opened == [str(log_path)]


# --- rewrite_response ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rewrite() -> types.ModuleType:
    return _load("rewrite_response.py")


def test_rewrite_changes_each_response_of_a_connection_however_cut(
    rewrite: types.ModuleType,
) -> None:
    expected = b"".join(REWRITTEN)
    for chunks in _two_ways(ALL_RESPONSES):
        assert _relay(rewrite, [REQUESTS], chunks)[:2] == (REQUESTS, expected)
    for chunks in _two_ways(REQUESTS):
        assert _relay(rewrite, chunks, [ALL_RESPONSES])[:2] == (REQUESTS, expected)


@given(st.data())
def test_rewrite_random_chunkings(rewrite: types.ModuleType, data: st.DataObject) -> None:
    client = data.draw(_chunkings(REQUESTS))
    server = data.draw(_chunkings(ALL_RESPONSES))
    assert _relay(rewrite, client, server)[:2] == (REQUESTS, b"".join(REWRITTEN))


def test_rewrite_holds_a_response_back_until_its_body_is_complete(
    rewrite: types.ModuleType,
) -> None:
    session = FakeSession()
    rewrite.session_start(session)
    rewrite.client_data(session, REQUESTS)
    first = RESPONSES[0]
    assert rewrite.server_data(session, first[:-1]) == b""
    assert rewrite.server_data(session, first[-1:] + RESPONSES[1][:10]) == REWRITTEN[0]
    # A chunked body streams.
    assert rewrite.server_data(session, RESPONSES[1][10:-3]) == RESPONSES[1][:-3]


def test_rewrite_passes_a_response_cut_short_at_the_server_fin(rewrite: types.ModuleType) -> None:
    for cut in range(len(RESPONSES[0])):
        assert _relay(rewrite, [REQUESTS], [RESPONSES[0][:cut]])[1] == RESPONSES[0][:cut]


def test_rewrite_passes_a_body_over_its_bound_unchanged(rewrite: types.ModuleType) -> None:
    big = b"hello" * (rewrite.MAX_BODY_BYTES // 5 + 1)
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big
    session = FakeSession()
    rewrite.session_start(session)
    rewrite.client_data(session, b"GET / HTTP/1.1\r\n\r\n")
    assert rewrite.server_data(session, response[:1000]) == response[:1000]  # streams
    assert rewrite.server_data(session, response[1000:]) == response[1000:]


def test_rewrite_with_the_text_and_replacement_configured() -> None:
    configured = _load("rewrite_response.py", TPROXY_REWRITE_FROM="world",
                       TPROXY_REWRITE_TO="")  # fmt: skip
    expected = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 7\r\n"
        b"X-Rewritten-By: tproxy\r\n\r\nhello \n"
    )
    assert _relay(configured, [REQUESTS], [RESPONSES[0]])[1] == expected
    header_only = _load("rewrite_response.py", TPROXY_REWRITE_FROM="")
    expected = RESPONSES[0].replace(b"\r\n\r\n", b"\r\nX-Rewritten-By: tproxy\r\n\r\n")
    assert _relay(header_only, [REQUESTS], [RESPONSES[0]])[1] == expected


@given(st.data())
def test_rewrite_passes_garbage_unchanged(rewrite: types.ModuleType, data: st.DataObject) -> None:
    client = data.draw(HTTPISH)
    server = data.draw(st.binary(max_size=300) | HTTPISH.filter(lambda s: b"hello" not in s))
    up, down, _ = _relay(rewrite, data.draw(_chunkings(client)), data.draw(_chunkings(server)))
    assert up == client
    if b"X-Rewritten-By: tproxy" not in down:  # no response it could rewrite
        assert down == server


def test_rewrite_with_too_many_waiting_requests_passes_the_rest_unchanged(
    rewrite: types.ModuleType,
) -> None:
    """Past the requests it remembers, rewrite cannot tell which response answers a HEAD:
    it passes them byte for byte rather than guess."""
    requests = b"GET / HTTP/1.1\r\n\r\n" * 130 + b"HEAD / HTTP/1.1\r\n\r\n"
    get = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    responses = get * 130 + head
    up, down, _ = _relay(rewrite, [requests], [responses])
    assert up == requests and down.endswith(get * 60 + head)


def test_rewrite_after_a_declined_upgrade(rewrite: types.ModuleType) -> None:
    got, _ = _turns(rewrite, UPGRADE_DECLINED, UPGRADE_DECLINED_ANSWERS)
    assert got == [
        b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nX-Rewritten-By: tproxy\r\n\r\ngoodbye",
        UPGRADE_DECLINED_ANSWERS[1],  # the HEAD's answer: no body, not held
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\nX-Rewritten-By: tproxy\r\n\r\nnope!",
    ]


def test_rewrite_passes_everything_after_a_101(rewrite: types.ModuleType) -> None:
    down = SWITCHED + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    got, _ = _turns(rewrite, [WEBSOCKET], [down])
    assert got == [down]


# --- block_uploads ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def block() -> types.ModuleType:
    return _load("block_uploads.py")


def _post(body: bytes, target: bytes = b"/upload") -> bytes:
    return b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (
        target, len(body), body,
    )  # fmt: skip


CLEAN = (
    b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nTOP-\r\n0\r\n\r\n"
    + b"GET /TOP-SECRE HTTP/1.1\r\n\r\n"
    + _post(b"a" * 50 + b"TOP-SECRE")  # ends like the marker starts: must not be stalled
)
SECRET = _post(b"b" * 30 + b"my TOP-SECRET plans" + b"c" * 30)
FIRST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def _upload(block: types.ModuleType, chunks: list[bytes]) -> tuple[bytes, FakeSession]:
    """What the client's chunks send upstream before the client's FIN, the session."""
    session = FakeSession()
    block.session_start(session)
    assert session.claimed
    return b"".join(_call(block.client_data, session, c) for c in chunks), session


def test_block_passes_clean_uploads_whole_before_the_client_fin(block: types.ModuleType) -> None:
    for chunks in _two_ways(CLEAN):
        up, session = _upload(block, chunks)
        assert up == CLEAN  # nothing held back once every request is complete
        assert _call(block.client_eof, session) == b""
        assert not session.closed and session.to_client == []


def _assert_blocked(block: types.ModuleType, stream: bytes, chunks: list[bytes]) -> None:
    up, session = _upload(block, chunks)
    # Not a byte of the marker: what could start it was held back.
    assert up == stream[: len(up)] and len(up) <= stream.index(block.MARKER)
    assert session.to_client == [block.FORBIDDEN] and session.closed and not session.was_reset
    assert _call(block.client_eof, session) == b""


def test_block_stops_an_upload_with_the_marker_however_cut(block: types.ModuleType) -> None:
    stream = FIRST + SECRET + FIRST
    for chunks in _two_ways(stream):
        _assert_blocked(block, stream, chunks)


@given(st.data())
def test_block_random_chunkings(block: types.ModuleType, data: st.DataObject) -> None:
    up, session = _upload(block, data.draw(_chunkings(CLEAN)))
    assert up == CLEAN and not session.closed
    stream = FIRST + SECRET + FIRST
    _assert_blocked(block, stream, data.draw(_chunkings(stream)))


def test_block_streams_a_body_and_holds_back_only_a_possible_marker_start(
    block: types.ModuleType,
) -> None:
    session = FakeSession()
    block.session_start(session)
    head = b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n"
    assert block.client_data(session, head + b"x" * 20) == head + b"x" * 20
    assert block.client_data(session, b"y" * 10 + b"TOP-S") == b"y" * 10
    assert block.client_data(session, b"TOP") == b"TOP-S"  # not the marker: "TOP" may start one
    assert block.client_data(session, b"-SECRET") == b""
    assert session.closed and session.to_client == [block.FORBIDDEN]
    assert block.client_data(session, b"more") == b""  # anything after: dropped


def test_block_finds_the_marker_in_the_request_line(block: types.ModuleType) -> None:
    _assert_blocked(block, b"GET /TOP-SECRET HTTP/1.1\r\n\r\n", [b"GET /TOP-SECRET HTTP/1.1\r\n"])


def test_block_when_the_client_side_is_shut_still_closes(block: types.ModuleType) -> None:
    session = FakeSession(client_shut=True)
    block.session_start(session)
    assert block.client_data(session, SECRET) == b""
    assert session.closed and session.to_client == []


def test_block_with_a_marker_configured() -> None:
    configured = _load("block_uploads.py", TPROXY_BLOCK_MARKER="xyz")
    upload = _post(b"abcxyz")
    _assert_blocked(configured, upload, [upload[:-1], upload[-1:]])
    with pytest.raises(ConfigError, match="TPROXY_BLOCK_MARKER must not be empty"):
        _load("block_uploads.py", TPROXY_BLOCK_MARKER="")


@given(st.data())
def test_block_passes_garbage_without_the_marker(
    block: types.ModuleType, data: st.DataObject
) -> None:
    stream = data.draw(HTTPISH)
    chunks = data.draw(_chunkings(stream))
    up, session = _upload(block, chunks)
    up += _call(block.client_eof, session)
    if block.MARKER in stream:
        assert session.closed and block.MARKER not in up
    else:
        assert up == stream and not session.closed


@pytest.mark.parametrize("sniffed", [None, Sniffed("unknown"), Sniffed("silent")])
def test_block_scans_sessions_whose_first_bytes_said_nothing(
    block: types.ModuleType, sniffed: Sniffed | None
) -> None:
    """A client slower than the sniff timeout is sniffed `silent` or `unknown`: still scanned."""
    session = FakeSession(sniffed=sniffed)
    block.session_start(session)
    assert session.claimed
    assert _call(block.client_data, session, SECRET[:2]) == SECRET[:2]
    assert _call(block.client_data, session, SECRET[2:]) == b""
    assert session.closed and session.to_client == [block.FORBIDDEN]


@pytest.mark.parametrize("sniffed", [Sniffed("tls"), Sniffed("ssh")])
def test_block_leaves_encrypted_sessions_alone(block: types.ModuleType, sniffed: Sniffed) -> None:
    session = FakeSession(sniffed=sniffed)
    assert block.session_start(session) is None
    assert not session.claimed and session.state == {}


def test_block_does_not_stall_a_protocol_that_is_not_http(block: types.ModuleType) -> None:
    """Outside an HTTP request nothing is held back (the client may be waiting for an answer);
    a marker split across chunks is still stopped before its last byte leaves."""
    session = FakeSession(sniffed=Sniffed("unknown"))
    block.session_start(session)
    assert _call(block.client_data, session, b"\x00\x01binary TOP") == b"\x00\x01binary TOP"
    assert _call(block.client_data, session, b"-SECRET") == b""
    assert session.closed


def test_block_does_not_stall_a_websocket_after_its_upgrade(block: types.ModuleType) -> None:
    session = FakeSession()
    block.session_start(session)
    assert _call(block.client_data, session, WEBSOCKET) == WEBSOCKET
    assert _call(block.client_data, session, b"\x81\x85abcdTOP") == b"\x81\x85abcdTOP"


# --- fault_injector --------------------------------------------------------------------------


def _verdicts(addon: types.ModuleType, count: int) -> list[Any]:
    async def starts() -> list[Any]:
        return [await addon.session_start(FakeSession()) for _ in range(count)]

    return asyncio.run(starts())


def test_fault_injector_drops_all_none_or_a_seeded_share() -> None:
    assert (
        _verdicts(_load("fault_injector.py", TPROXY_FAULT_DROP_PERCENT="100"), 20) == [reset()] * 20
    )
    assert _verdicts(_load("fault_injector.py"), 20) == [None] * 20
    seeded = {"TPROXY_FAULT_DROP_PERCENT": "50", "TPROXY_FAULT_SEED": "7"}
    first = _verdicts(_load("fault_injector.py", **seeded), 100)
    assert _verdicts(_load("fault_injector.py", **seeded), 100) == first
    assert 30 <= first.count(reset()) <= 70 and first.count(None) == 100 - first.count(reset())


def test_fault_injector_delays_without_claiming() -> None:
    addon = _load("fault_injector.py", TPROXY_FAULT_DELAY_MS="50")
    session = FakeSession()
    started = time.monotonic()
    assert asyncio.run(addon.session_start(session)) is None
    assert time.monotonic() - started >= 0.05
    assert not session.claimed


def test_fault_injector_delays_each_chunk_of_the_sessions_it_claims() -> None:
    addon = _load("fault_injector.py", TPROXY_FAULT_CHUNK_DELAY_MS="30")
    session = FakeSession()

    async def run() -> tuple[bytes, bytes]:
        assert await addon.session_start(session) is None
        return await addon.client_data(session, b"up"), await addon.server_data(session, b"down")

    started = time.monotonic()
    assert asyncio.run(run()) == (b"up", b"down")
    assert time.monotonic() - started >= 0.06
    assert session.claimed


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TPROXY_FAULT_DROP_PERCENT", "ten"),
        ("TPROXY_FAULT_DROP_PERCENT", "101"),
        ("TPROXY_FAULT_DROP_PERCENT", "nan"),
        ("TPROXY_FAULT_DELAY_MS", "-1"),
        ("TPROXY_FAULT_DELAY_MS", "10000"),
        ("TPROXY_FAULT_CHUNK_DELAY_MS", "inf"),
        ("TPROXY_FAULT_SEED", "1.5"),
    ],
)
def test_fault_injector_refuses_a_wrong_setting_at_load(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"fault_injector.py:[0-9]+: ValueError: {name} must"):
        _load("fault_injector.py", **{name: value})
