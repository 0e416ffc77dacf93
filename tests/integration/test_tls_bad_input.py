"""TLS interception against bad input on the real path (issue 13's "bad input" acceptance item),
default workers: a ClientHello that is garbage after its SNI, a client that stops mid-hello
(silent, FIN, RST), a client that never answers our handshake, an upstream that never answers
ours, TLS 1.2 renegotiation and TLS 1.3 KeyUpdate. Each ends only its own session, as its close
event says, while two well-behaved intercepted sessions from the same client (so on the same
worker) -- one held open across the bad case, one started while it is still going on --
complete with every byte intact, and the proxy keeps running.

What the client sees of a failed interception handshake is a reset (docs/events.md's close
reasons), never a TLS alert of ours: the legs' alerts are dropped with the session.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import random
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import apply_rules, start_proxy, tproxy_cli
from tproxy.lab.proxy_process import Event, ProxyProcess
from tproxy.lab.services import TLS_NAME, TLS_PORT, wait_listening
from tproxy.lab.topology import Lab, wait_until

PEERS = Path(__file__).with_name("tls_peers.py")
MUTE_PORT = 8443  # accepts, reads, never answers
TLS12_PORT = 9443  # the echo server again, TLS 1.2 at most (renegotiation is TLS 1.2's)
S_SERVER_PORT = 9444  # for a test's own openssl s_server
HANDSHAKE_TIMEOUT_S = 2.0  # --tls-handshake-timeout
SNIFF_TIMEOUT_S = 1.0  # the policy's sniff_timeout_s
SERVER_HANDSHAKE_TIMEOUT_S = 4.0  # the echo server gives up on a handshake after this
SLACK_S = 10.0  # the sweep runs about once a second; the machine is shared and noisy

POLICY = f"""
sniff_timeout_s = {SNIFF_TIMEOUT_S}

[[rule]]
name = "inspect"
sni = ["*.example.test"]
action = "allow"
tls = "intercept"
"""


class _Lines:
    """A process's stdout lines, read by a thread, so a test can wait for one with a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self._lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.decode(errors="replace"))

    def wait_for(self, text: str, timeout_s: float = 20) -> str:
        deadline_at = time.monotonic() + timeout_s
        while True:
            left = deadline_at - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                raise AssertionError(
                    f"no line with {text!r} in {timeout_s:g} s: {self.seen}"
                ) from None
            self.seen.append(line)
            if text in line:
                return line

    def write(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()


class _Server:
    """A `tls_peers.py` server in the server namespace; `ends()`: one dict per connection."""

    def __init__(self, lab: Lab, folder: Path, port: int, *args: str) -> None:
        self._log = folder / f"server-{port}.jsonl"
        with self._log.open("wb") as out:
            lab.start(lab.server, [sys.executable, str(PEERS), *args, "--port", str(port)],
                      stdout=out)  # fmt: skip
        wait_listening(lab, lab.server, port, f"the {args[0]} server")

    def ends(self) -> list[dict[str, Any]]:
        lines = self._log.read_text().splitlines()
        return [e for e in map(json.loads, lines) if "peer" in e]

    def end_of(self, source: str, timeout_s: float = 20) -> dict[str, Any]:
        """What the server saw of the connection from `source` (an upstream_connected's), once
        that connection ended."""
        found: list[dict[str, Any]] = []

        def ended() -> bool:
            found[:] = [e for e in self.ends() if e["peer"] == source]
            return bool(found)

        wait_until(ended, timeout_s, f"the server to see {source}'s connection end")
        return found[0]


class _World:
    """The lab with the echo servers (443, and 9443 at most TLS 1.2), the mute server (8443),
    the rules for all three and tproxy intercepting `*.example.test` with default workers."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.folder = folder = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-bad-"))
        lab.cleanup_paths.append(folder)
        self.key = key = folder / "server.key"
        self.cert = cert = folder / "server.crt"
        lab.run(lab.server, ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
                             "-out", str(cert), "-days", "1", "-subj", f"/CN={TLS_NAME}",
                             "-addext", f"subjectAltName=DNS:{TLS_NAME}"])  # fmt: skip
        tls = ["--cert", str(cert), "--key", str(key),
               "--handshake-timeout", str(SERVER_HANDSHAKE_TIMEOUT_S)]  # fmt: skip
        self.echo = _Server(lab, folder, TLS_PORT, "echo", *tls)
        self.echo12 = _Server(lab, folder, TLS12_PORT, "echo", *tls, "--max-tls", "1.2")
        self.mute = _Server(lab, folder, MUTE_PORT, "mute")
        apply_rules(lab, "--ports", f"{TLS_PORT},{MUTE_PORT},{TLS12_PORT},{S_SERVER_PORT}")
        tproxy_cli(lab, lab.router, "ca", "create", str(folder / "ca"))
        self.ca = folder / "ca" / "ca.crt"
        policy = folder / "policy.toml"
        policy.write_text(POLICY)
        self.proxy: ProxyProcess = start_proxy(
            lab, "--ca", str(folder / "ca"), "--policy", str(policy), "--upstream-ca", str(cert),
            "--tls-handshake-timeout", f"{HANDSHAKE_TIMEOUT_S:g}", default_workers=True,
        )  # fmt: skip

    def endpoint(self, port: int = TLS_PORT) -> str:
        return f"{self.lab.server.ipv4}:{port}"

    # --- what the proxy said ---------------------------------------------------------------

    def close_of(self, client: str, timeout_s: float = 20) -> Event:
        """The session_close of the session from `client` (ip:port)."""
        closes = self.proxy.wait_for(lambda e: e.get("event") == "session_close"
                                     and e["client"] == client, f"{client}'s session_close",
                                     timeout_s)  # fmt: skip
        return closes[0]

    def upstream_source(self, session: str) -> str | None:
        """The upstream socket's endpoint of `session`, as the server sees it; None if it never
        connected."""
        connected = self.proxy.find(lambda e: e.get("event") == "upstream_connected"
                                    and e["session"] == session)  # fmt: skip
        return connected[0]["source"] if connected else None

    # --- clients -----------------------------------------------------------------------------

    def raw(
        self, data: bytes, then: str, *, port: int = TLS_PORT, timeout_s: float = 20
    ) -> subprocess.Popen[bytes]:
        """A raw client sending `data` and then waiting, half-closing or resetting (started;
        `raw_result` collects it)."""
        path = self.folder / f"hello-{time.monotonic_ns()}.bin"
        path.write_bytes(data)
        argv = [sys.executable, str(PEERS), "raw", self.endpoint(port), "--file", str(path),
                "--then", then, "--timeout", str(timeout_s)]  # fmt: skip
        return self.lab.start(self.lab.client, argv, stdout=subprocess.PIPE)

    @staticmethod
    def raw_result(proc: subprocess.Popen[bytes], timeout_s: float = 40) -> dict[str, Any]:
        out, _ = proc.communicate(timeout=timeout_s)
        result: dict[str, Any] = json.loads(out)
        return result

    def exchange_argv(self, count: int, *extra: str) -> list[str]:
        return [sys.executable, str(PEERS), "exchange", self.endpoint(), "--name", TLS_NAME,
                "--ca", str(self.ca), "--bytes", str(count), *extra]  # fmt: skip


class _Bystanders:
    """Two well-behaved intercepted sessions from the same client address as the bad one (so
    served by the same worker): `held`, started before the bad case and kept open across it,
    and one started by `meanwhile()` while the bad case goes on. `finish()` ends the held one
    and checks that both echoed every byte intact and closed cleanly."""

    HELD_BYTES = 256 * 1024
    MEANWHILE_BYTES = 64 * 1024

    def __init__(self, world: _World) -> None:
        self.world = world
        proc = world.lab.start(world.lab.client, world.exchange_argv(self.HELD_BYTES, "--hold"),
                               stdout=subprocess.PIPE, stdin=subprocess.PIPE)  # fmt: skip
        self.held = _Lines(proc)
        self.held.wait_for('"holding"')
        self.results: list[dict[str, Any]] = []

    def meanwhile(self) -> None:
        lab = self.world.lab
        done = lab.run(lab.client, self.world.exchange_argv(self.MEANWHILE_BYTES), check=False)
        self.results.append(json.loads(done.stdout))

    def finish(self) -> None:
        self.held.write("go\n")
        self.results.insert(0, json.loads(self.held.wait_for('"ok"')))
        assert len(self.results) == 2, self.results
        for result, count in zip(self.results, (self.HELD_BYTES, self.MEANWHILE_BYTES),
                                 strict=True):  # fmt: skip
            assert (result["ok"], result["echoed"], result["error"]) == (True, count, None), result
            assert (result["issuer"] or "").startswith("tproxy interception CA"), result
        proxy = self.world.proxy
        closes = proxy.wait_for(
            lambda e: e.get("event") == "session_close" and e.get("bytes_up") in (
                self.HELD_BYTES, self.MEANWHILE_BYTES), "the bystanders' closes", count=2,
        )  # fmt: skip
        for close in closes:
            assert (close["reason"], close["tls_intercepted"], close["relay"]) == (
                "closed", True, "tls"), close  # fmt: skip
            assert close["bytes_down"] == close["bytes_up"], close
        # The proxy is alive, no worker died, and nothing went wrong beyond the bad session.
        assert proxy.proc.poll() is None, proxy.stderr_text()
        notices = [n["message"] for n in proxy.named("notice")]
        assert not [n for n in notices if "ended with" in n or "supervisor error" in n], notices
        assert not proxy.named("session_error"), proxy.named("session_error")
        workers = {e["worker"] for e in proxy.named("session_open")}
        assert len(workers) == 1, workers  # one client address: one worker served them all


@pytest.fixture
def world(lab: Lab) -> _World:
    return _World(lab)


@pytest.fixture
def bystanders(world: _World) -> Iterator[_Bystanders]:
    yield _Bystanders(world)


# --- ClientHellos --------------------------------------------------------------------------------


def _u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def _extension(kind: int, data: bytes) -> bytes:
    return _u16(kind) + _u16(len(data)) + data


def _hello_after_sni(tail: bytes, *, extensions_length_lie: int = 0) -> bytes:
    """A ClientHello whose record and handshake lengths are right and whose first extension is
    a well-formed SNI for TLS_NAME, followed by `tail`; the extensions' length counts the tail
    (plus `extensions_length_lie`)."""
    name = TLS_NAME.encode()
    sni = _extension(0, _u16(len(name) + 3) + b"\x00" + _u16(len(name)) + name)
    extensions = sni + tail
    body = (b"\x03\x03" + bytes(range(32)) + b"\x00" + _u16(4) + b"\x13\x01\xc0\x2b" + b"\x01\x00"
            + _u16(len(extensions) + extensions_length_lie) + extensions)  # fmt: skip
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + _u16(len(handshake)) + handshake


def _garbage_hello(variant: str) -> bytes:
    rng = random.Random(13)
    if variant == "consistent":
        # Every length adds up, down to each extension's: the garbage is inside extensions the
        # sniffer skips and OpenSSL parses (supported_groups, signature_algorithms, key_share).
        tail = _extension(43, b"\x04\x03\x04\x03\x03")  # supported_versions: TLS 1.3, 1.2
        for kind in (10, 13, 51):
            tail += _extension(kind, rng.randbytes(rng.randrange(8, 64)))
        return _hello_after_sni(tail)
    if variant == "lying-inside":
        # Random bytes right after the SNI: the extensions' length counts them, but what they
        # say as extension headers runs past the end.
        return _hello_after_sni(rng.randbytes(200))
    assert variant == "lying-outside"
    # The extensions' length claims 40 bytes the handshake does not have.
    return _hello_after_sni(rng.randbytes(200), extensions_length_lie=40)


def _real_hello(name: str = TLS_NAME) -> bytes:
    """The ClientHello Python's TLS (OpenSSL) sends for `name`: TLS 1.3 and 1.2, one record."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()  # our ClientHello, then it waits for the server
    return outgoing.read()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- the cases -----------------------------------------------------------------------------------


def test_a_hello_with_garbage_after_its_sni_in_well_framed_extensions_fails_the_client_handshake(
    world: _World, bystanders: _Bystanders
) -> None:
    """Every length consistent: the sniffer reads the SNI (it skips the extensions it does not
    read), so the session is intercepted; our upstream handshake completes, then the client
    leg's OpenSSL refuses the hello (bad extension): `client_tls_failed`, the client reset, the
    upstream connection (tproxy's own, already established) reset too."""
    hello = _garbage_hello("consistent")
    client = world.raw(hello, "wait")
    bystanders.meanwhile()
    seen = world.raw_result(client)
    assert (seen["end"], seen["received"]) == ("reset", 0), seen
    close = world.close_of(seen["local"])
    assert (close["proto"], close["sni"], close["reason"], close["tls_intercepted"]) == (
        "tls", TLS_NAME, "client_tls_failed", False), close  # fmt: skip
    assert "BAD_EXTENSION" in close["client_tls"]["error"], close
    assert close["client_tls"]["rejected"] is None, close  # not a refusal of our certificate
    assert close["upstream_tls"]["verified"] is True, close
    source = world.upstream_source(close["session"])
    assert source is not None
    upstream = world.echo.end_of(source)
    # (its handshake never completed: our Finished was still queued when both were reset)
    assert (upstream["end"], upstream["hellos"]) == ("reset", 1), upstream
    bystanders.finish()


@pytest.mark.parametrize("variant", ["lying-inside", "lying-outside"])
def test_a_hello_with_garbage_after_its_sni_whose_lengths_lie_is_relayed_untouched(
    world: _World, bystanders: _Bystanders, variant: str
) -> None:
    """Lengths that do not add up after the SNI: not a ClientHello for the sniffer (`unknown`,
    no SNI), so the intercept rule cannot match and the default relays it untouched, as it
    would any unknown protocol: the server gets the very bytes and its TLS refuses them with
    an alert (decode_error) that reaches the client, then both ends close."""
    hello = _garbage_hello(variant)
    client = world.raw(hello, "wait")
    bystanders.meanwhile()
    seen = world.raw_result(client)
    assert (seen["end"], seen["records"], seen["alerts"]) == ("eof", [21], [50]), seen
    close = world.close_of(seen["local"])
    assert (close["proto"], close["sni"], close["tls_intercepted"], close["relay"]) == (
        "unknown", None, None, "splice"), close  # fmt: skip
    assert (close["reason"], close["bytes_up"]) == ("closed", len(hello)), close
    source = world.upstream_source(close["session"])
    assert source is not None
    upstream = world.echo.end_of(source)
    assert (upstream["raw_in"], upstream["raw_sha256"]) == (len(hello), _sha256(hello)), upstream
    assert (upstream["handshake"], upstream["end"]) == (False, "tls_error"), upstream
    bystanders.finish()


def test_half_a_hello_and_then_silence_waits_the_sniff_timeout_then_is_relayed_untouched(
    world: _World, bystanders: _Bystanders
) -> None:
    """Half a ClientHello, no FIN: tproxy waits for the rest for the sniff timeout, not the TLS
    handshake timeout (nothing is intercepted before the hello is whole). Then the session is
    `unknown`, the intercept rule cannot match, and the half hello is relayed untouched: the
    server's own handshake timeout ends it (as it would without tproxy), its FIN passes on."""
    hello = _real_hello()
    half = hello[: len(hello) // 2]
    client = world.raw(half, "wait")
    bystanders.meanwhile()
    seen = world.raw_result(client)
    assert (seen["end"], seen["received"]) == ("eof", 0), seen
    close = world.close_of(seen["local"])
    assert (close["proto"], close["tls_intercepted"], close["relay"]) == (
        "unknown", None, "splice"), close  # fmt: skip
    assert (close["reason"], close["bytes_up"]) == ("closed", len(half)), close
    connected = world.proxy.find(lambda e: e.get("event") == "upstream_connected"
                                 and e["session"] == close["session"])  # fmt: skip
    # It waited the sniff timeout before connecting (connect_ms includes the wait).
    assert SNIFF_TIMEOUT_S - 0.1 <= connected[0]["connect_ms"] / 1000 <= SNIFF_TIMEOUT_S + SLACK_S
    assert close["duration_s"] <= SNIFF_TIMEOUT_S + SERVER_HANDSHAKE_TIMEOUT_S + SLACK_S, close
    upstream = world.echo.end_of(connected[0]["source"])
    assert (upstream["raw_in"], upstream["raw_sha256"]) == (len(half), _sha256(half)), upstream
    assert (upstream["handshake"], upstream["end"]) == (False, "timeout"), upstream
    bystanders.finish()


def test_half_a_hello_and_then_a_fin_is_relayed_at_once_with_its_fin(
    world: _World, bystanders: _Bystanders
) -> None:
    """Half a ClientHello, then FIN: the client's end decides the sniff at once (`unknown`),
    the half hello and the FIN are relayed untouched, the server's TLS gives up with an alert
    that reaches the client, both close."""
    hello = _real_hello()
    half = hello[: len(hello) // 2]
    client = world.raw(half, "fin")
    bystanders.meanwhile()
    seen = world.raw_result(client)
    # What the server's TLS answered the truncated hello (OpenSSL 3: decode_error), then EOF.
    assert (seen["end"], seen["records"], seen["alerts"]) == ("eof", [21], [50]), seen
    close = world.close_of(seen["local"])
    assert (close["proto"], close["tls_intercepted"], close["reason"], close["bytes_up"]) == (
        "unknown", None, "closed", len(half)), close  # fmt: skip
    source = world.upstream_source(close["session"])
    assert source is not None
    upstream = world.echo.end_of(source)
    assert (upstream["raw_in"], upstream["raw_sha256"]) == (len(half), _sha256(half)), upstream
    assert (upstream["handshake"], upstream["end"]) == (False, "eof"), upstream
    bystanders.finish()


def test_half_a_hello_and_then_a_reset_ends_the_session_before_anything_connects(
    world: _World, bystanders: _Bystanders
) -> None:
    """Half a ClientHello, then RST while tproxy waits for the rest: `client_reset`, and
    nothing was connected upstream (the server saw nothing)."""
    hello = _real_hello()
    client = world.raw(hello[: len(hello) // 2], "rst")
    bystanders.meanwhile()
    seen = world.raw_result(client)
    close = world.close_of(seen["local"])
    assert (close["reason"], close["tls_intercepted"], close["bytes_up"]) == (
        "client_reset", None, 0), close  # fmt: skip
    assert world.upstream_source(close["session"]) is None, close
    bystanders.finish()
    # Only the two bystanders' connections reached the server.
    wait_until(lambda: len(world.echo.ends()) >= 2, 20, "the bystanders' ends at the server")
    assert len(world.echo.ends()) == 2, world.echo.ends()


def test_a_client_that_never_answers_our_handshake_is_reset_after_the_handshake_timeout(
    world: _World, bystanders: _Bystanders
) -> None:
    """A whole ClientHello, then silence: the upstream handshake completes, ours with the
    client does not; after --tls-handshake-timeout `client_tls_failed` (the detail says so,
    not a refusal of our certificate), the client reset after our flight, the upstream
    connection ended too."""
    hello = _real_hello()
    client = world.raw(hello, "wait")
    bystanders.meanwhile()
    seen = world.raw_result(client)
    assert seen["end"] == "reset" and seen["records"][:1] == [22], seen  # our ServerHello first
    close = world.close_of(seen["local"])
    assert (close["proto"], close["reason"], close["tls_intercepted"]) == (
        "tls", "client_tls_failed", False), close  # fmt: skip
    detail = f"the client did not complete the TLS handshake within {HANDSHAKE_TIMEOUT_S:g} s"
    assert close["client_tls"]["error"] == detail, close
    assert close["client_tls"]["rejected"] is None, close
    assert HANDSHAKE_TIMEOUT_S <= close["duration_s"] <= HANDSHAKE_TIMEOUT_S + SLACK_S, close
    source = world.upstream_source(close["session"])
    assert source is not None
    upstream = world.echo.end_of(source)
    assert (upstream["handshake"], upstream["end"], upstream["echoed"]) == (True, "reset", 0)
    bystanders.finish()


def test_an_upstream_that_never_answers_our_hello_resets_the_client_after_the_timeout(
    world: _World, bystanders: _Bystanders
) -> None:
    """The upstream accepts and reads our ClientHello but never answers: after
    --tls-handshake-timeout `upstream_tls_failed` (the detail says so), the client reset
    without a byte, the upstream connection reset too."""
    client = world.raw(_real_hello(), "wait", port=MUTE_PORT)
    bystanders.meanwhile()
    seen = world.raw_result(client)
    assert (seen["end"], seen["received"]) == ("reset", 0), seen
    close = world.close_of(seen["local"])
    assert (close["proto"], close["reason"], close["tls_intercepted"]) == (
        "tls", "upstream_tls_failed", False), close  # fmt: skip
    detail = f"the upstream did not complete the TLS handshake within {HANDSHAKE_TIMEOUT_S:g} s"
    assert close["upstream_tls"]["error"] == detail, close
    assert close["client_tls"] is None, close
    assert HANDSHAKE_TIMEOUT_S <= close["duration_s"] <= HANDSHAKE_TIMEOUT_S + SLACK_S, close
    source = world.upstream_source(close["session"])
    assert source is not None
    upstream = world.mute.end_of(source)
    assert upstream["end"] == "reset" and upstream["raw_in"] > 0, upstream  # our ClientHello
    bystanders.finish()


def _s_client(world: _World, port: int, version: str) -> _Lines:
    argv = ["openssl", "s_client", "-connect", world.endpoint(port), "-servername", TLS_NAME,
            "-CAfile", str(world.ca), "-verify_return_error", version]  # fmt: skip
    proc = world.lab.start(world.lab.client, argv, stdout=subprocess.PIPE, stdin=subprocess.PIPE,
                           stderr=subprocess.STDOUT)  # fmt: skip
    return _Lines(proc)


def test_tls12_client_renegotiation_is_refused_and_ends_only_that_session(
    world: _World, bystanders: _Bystanders
) -> None:
    """openssl s_client -tls1_2, a line echoed, then `R` (renegotiate): our client leg refuses
    (OP_NO_RENEGOTIATION: a no_renegotiation warning alert), which OpenSSL's client takes as
    fatal: it sends handshake_failure and leaves. The session ends as the client's reset; the
    upstream (which would allow renegotiation, TLS 1.2 at most) never sees a second hello."""
    s_client = _s_client(world, TLS12_PORT, "-tls1_2")
    s_client.wait_for("Verify return code: 0")
    s_client.write("before renegotiation\n")
    s_client.wait_for("before renegotiation")
    s_client.write("R\n")
    s_client.wait_for("RENEGOTIATING")
    bystanders.meanwhile()
    assert s_client.proc.wait(20) != 0, s_client.seen
    close = world.proxy.wait_for(lambda e: e.get("event") == "session_close"
                                 and e.get("dst", "").endswith(f":{TLS12_PORT}"),
                                 "the renegotiating session's close")[0]  # fmt: skip
    assert (close["reason"], close["tls_intercepted"]) == ("client_reset", True), close
    assert close["client_tls"]["version"] == "TLSv1.2", close
    assert "handshake_failure" in close["client_tls"]["error"].lower(), close
    source = world.upstream_source(close["session"])
    assert source is not None
    upstream = world.echo12.end_of(source)
    assert (upstream["hellos"], upstream["echoed"]) == (1, len("before renegotiation\n"))
    assert upstream["end"] == "reset", upstream
    bystanders.finish()


def test_tls13_key_updates_are_harmless_and_the_session_goes_on(
    world: _World, bystanders: _Bystanders
) -> None:
    """openssl s_client -tls1_3 sends KeyUpdate (`K`: and asks for ours; `k`: not) between
    lines: every line is echoed intact after each, and the session closes cleanly."""
    s_client = _s_client(world, TLS_PORT, "-tls1_3")
    s_client.wait_for("Verify return code: 0")
    lines = ["first line\n", "after K\n", "after k\n"]
    for line, command in zip(lines, ["K\n", "k\n", "Q\n"], strict=True):
        s_client.write(line)
        s_client.wait_for(line.strip())
        s_client.write(command)
        if command != "Q\n":
            s_client.wait_for("KEYUPDATE")
    bystanders.meanwhile()
    assert s_client.proc.wait(20) == 0, s_client.seen
    sent = sum(map(len, lines))
    close = world.proxy.wait_for(lambda e: e.get("event") == "session_close"
                                 and e.get("bytes_up") == sent, "s_client's close")[0]  # fmt: skip
    assert (close["tls_intercepted"], close["bytes_down"]) == (True, sent), close
    assert close["client_tls"]["version"] == "TLSv1.3", close
    assert close["reason"] == "closed", close
    source = world.upstream_source(close["session"])
    assert source is not None
    upstream = world.echo.end_of(source)
    assert (upstream["hellos"], upstream["echoed"], upstream["end"]) == (1, sent, "close_notify")
    bystanders.finish()


def _big_hello(extra_bytes: int) -> bytes:
    """Python's ClientHello for TLS_NAME with an unknown extension of `extra_bytes` zeros put
    first, its handshake message cut into records of 2^14 bytes (what a client with a huge
    hello sends)."""
    handshake = _real_hello()[5:]  # one record: strip its header
    body = handshake[4:]
    pos = 34  # legacy_version, random
    pos += 1 + body[pos]  # session id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
    pos += 1 + body[pos]  # compression methods
    extensions = _extension(0x7777, bytes(extra_bytes)) + body[pos + 2 :]
    body = body[:pos] + _u16(len(extensions)) + extensions
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    records = [handshake[at : at + (1 << 14)] for at in range(0, len(handshake), 1 << 14)]
    return b"".join(b"\x16\x03\x01" + _u16(len(r)) + r for r in records)


def test_a_hello_over_16_kib_is_not_intercepted_and_relayed_untouched(
    world: _World, bystanders: _Bystanders
) -> None:
    """A ClientHello of 17.5 KB (over two records), then FIN: more than the sniffer holds, so
    `unknown` (README: "over 16 KiB"), not intercepted: the real server gets the very bytes
    and answers with its own ServerHello, which reaches the client."""
    hello = _big_hello(17_000)
    assert len(hello) > 16 * 1024
    client = world.raw(hello, "fin")
    bystanders.meanwhile()
    seen = world.raw_result(client)
    assert seen["end"] == "eof" and seen["records"][:1] == [22], seen  # the server's hello
    close = world.close_of(seen["local"])
    assert (close["proto"], close["sni"], close["tls_intercepted"], close["reason"]) == (
        "unknown", None, None, "closed"), close  # fmt: skip
    assert close["bytes_up"] == len(hello), close
    source = world.upstream_source(close["session"])
    assert source is not None
    upstream = world.echo.end_of(source)
    assert (upstream["raw_in"], upstream["raw_sha256"]) == (len(hello), _sha256(hello)), upstream
    assert upstream["hellos"] == 1, upstream  # the server's TLS read it as a ClientHello
    bystanders.finish()


def test_an_alert_instead_of_a_hello_is_relayed_untouched(
    world: _World, bystanders: _Bystanders
) -> None:
    """A fatal alert record (handshake_failure) as the client's first bytes: not a ClientHello
    (`unknown`), relayed untouched; the server's TLS fails on it and closes, and so the
    session closes."""
    alert = b"\x15\x03\x03\x00\x02\x02\x28"
    client = world.raw(alert, "wait")
    bystanders.meanwhile()
    seen = world.raw_result(client)
    assert seen["end"] == "eof", seen
    close = world.close_of(seen["local"])
    assert (close["proto"], close["tls_intercepted"], close["reason"], close["bytes_up"]) == (
        "unknown", None, "closed", len(alert)), close  # fmt: skip
    source = world.upstream_source(close["session"])
    assert source is not None
    upstream = world.echo.end_of(source)
    assert (upstream["raw_sha256"], upstream["end"]) == (_sha256(alert), "tls_error"), upstream
    bystanders.finish()


def test_a_renegotiation_the_upstream_asks_for_is_refused_and_ends_only_that_session(
    world: _World, bystanders: _Bystanders
) -> None:
    """openssl s_server -tls1_2 as the upstream sends a HelloRequest (`r`) mid-session: our
    upstream leg refuses it (a no_renegotiation warning alert), which the server's OpenSSL
    takes as fatal (handshake_failure): the session ends as the upstream's reset, and the
    client (s_client, TLS 1.3 with us) never sees a renegotiation, only its connection reset."""
    argv = ["openssl", "s_server", "-accept", str(S_SERVER_PORT), "-cert", str(world.cert),
            "-key", str(world.key), "-tls1_2"]  # fmt: skip
    s_server = _Lines(world.lab.start(world.lab.server, argv, stdout=subprocess.PIPE,
                                      stdin=subprocess.PIPE, stderr=subprocess.STDOUT))  # fmt: skip
    wait_listening(world.lab, world.lab.server, S_SERVER_PORT, "openssl s_server")
    s_client = _s_client(world, S_SERVER_PORT, "-tls1_3")
    s_client.wait_for("Verify return code: 0")
    s_client.write("from the client\n")
    s_server.wait_for("from the client")
    s_server.write("r\n")
    s_server.wait_for("no renegotiation")
    bystanders.meanwhile()
    assert s_client.proc.wait(20) != 0, s_client.seen
    close = world.proxy.wait_for(lambda e: e.get("event") == "session_close"
                                 and e.get("dst", "").endswith(f":{S_SERVER_PORT}"),
                                 "the session's close")[0]  # fmt: skip
    assert (close["reason"], close["tls_intercepted"]) == ("upstream_reset", True), close
    assert close["upstream_tls"]["version"] == "TLSv1.2", close
    assert "HANDSHAKE_FAILURE" in close["upstream_tls"]["error"], close
    assert close["client_tls"]["error"] is None, close
    bystanders.finish()
