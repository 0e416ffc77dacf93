"""Addons on the real path (issue 12): `session_start` and `session_end` called by the engine
with default workers, real clients (curl) through the router. An addon with `sniff = True`
resets sessions by SNI or Host while others pass; one that raises resets that session only, and
the next works; an `async def` hook that sleeps 1 s holds only its session; SIGHUP reloads an
edited addon in every worker and keeps it when the next edit fails to load; the sessions of an
addon that claims nothing stay on splice."""

from __future__ import annotations

import concurrent.futures
import os
import shlex
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.integration.conftest import (
    apply_rules,
    client_json,
    client_per_worker,
    curl,
    start_proxy,
)
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import HTTP_PORT, PEER_PORT, TLS_PORT, start_tls_server
from tproxy.lab.services import TLS_NAME as NAME
from tproxy.lab.topology import Lab, wait_until
from tproxy.service.units import PROXY_UNIT, UnitOptions, render_units

MIB = 1024 * 1024

BLOCKING = """
from pathlib import Path

from tproxy.addons.api import reset

sniff = True
BLOCKED = {"www.ads.test", "tracker.test"}


def session_start(session):
    sniffed = session.sniffed
    if sniffed is not None and (sniffed.sni in BLOCKED or sniffed.http_host in BLOCKED):
        return reset()
    return None


def session_end(session):
    with Path(__file__).with_name("ends.log").open("a") as log:
        log.write(f"{session.id} {session.reason} {session.bytes_up} {session.bytes_down}\\n")
"""

RAISING = """
sniff = True


def session_start(session):
    if session.sniffed is not None and session.sniffed.http_host == "boom.test":
        raise RuntimeError("no sessions to boom.test\\nplease")
"""

SLOW = """
import asyncio

sniff = True


async def session_start(session):
    if session.sniffed is not None and session.sniffed.http_host == "slow.test":
        await asyncio.sleep(1)
"""

RESETTING = """
from tproxy.addons.api import reset

sniff = True
RESET = "a.test"


def session_start(session):
    if session.sniffed is not None and session.sniffed.http_host == RESET:
        return reset()
    return None
"""

UNCLAIMED = """
from pathlib import Path


def session_start(session):
    return None


def session_end(session):
    with Path(__file__).with_name("ends.log").open("a") as log:
        log.write(f"{session.id} {session.reason}\\n")
"""


def _addon_file(lab: Lab, name: str, text: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=f"tproxy-lab-{lab.run_id}-addons-"))
    lab.cleanup_paths.append(path)
    addon = path / name
    addon.write_text(text)
    return addon


def _closes(proxy: ProxyProcess, count: int) -> list[dict[str, Any]]:
    return proxy.wait_for(lambda e: e.get("event") == "session_close", f"{count} closes",
                          count=count)  # fmt: skip


def _http(lab: Lab, host: str, source: str | None = None) -> tuple[int, float, str]:
    """GET / from the server's nginx with `Host: host` (from the client address `source`, else
    the client's own): curl's exit status, its total time and its stderr."""
    argv = ["curl", "-sS", "--max-time", "10", "-o", "/dev/null", "-w", "%{time_total}",
            "-H", f"Host: {host}", f"http://{lab.server.endpoint(HTTP_PORT)}/"]  # fmt: skip
    if source is not None:
        argv[1:1] = ["--interface", source]
    result = lab.run(lab.client, argv, check=False)
    elapsed = float(result.stdout.decode() or 0)
    return result.returncode, elapsed, result.stderr.decode(errors="replace")


def test_an_addon_resets_by_sni_and_host_while_other_sessions_pass(served_lab: Lab) -> None:
    lab = served_lab
    start_tls_server(lab, lab.server)
    apply_rules(lab, "--ports", f"{HTTP_PORT},{TLS_PORT}")
    addon = _addon_file(lab, "block.py", BLOCKING)
    proxy = start_proxy(lab, "--addon", str(addon), default_workers=True)
    curl_tls = ["curl", "-sS", "-k", "--max-time", "10", "-o", "/dev/null", "-w", "%{http_code}"]

    def https(name: str) -> Any:
        argv = [*curl_tls, "--resolve", f"{name}:{TLS_PORT}:{lab.server.ipv4}", f"https://{name}/"]
        return lab.run(lab.client, argv, check=False)

    passed = https(NAME)
    assert passed.stdout.decode() == "200", passed.stderr.decode()
    blocked = https("www.ads.test")
    assert blocked.returncode != 0 and b"reset" in blocked.stderr.lower(), blocked.stderr
    code, _, stderr = _http(lab, "tracker.test")
    assert code != 0 and "reset" in stderr.lower(), stderr
    assert curl(lab, f"http://{lab.server.endpoint(HTTP_PORT)}/")[0] == 200

    closes = _closes(proxy, 4)
    by_name = {c["sni"] or c["http_host"]: c for c in closes}
    assert set(by_name) == {NAME, "www.ads.test", "tracker.test", str(lab.server.ipv4)}
    for name in ("www.ads.test", "tracker.test"):
        close = by_name[name]
        assert (close["reason"], close["rule"], close["action"], close["relay"]) == (
            "policy_reset", f"addon:{addon}", "reset", None,
        ), close  # fmt: skip
    for name in (NAME, str(lab.server.ipv4)):
        close = by_name[name]
        assert (close["reason"], close["rule"], close["relay"]) == ("closed", None, "splice")
    assert len(proxy.named("upstream_connected")) == 2
    # session_end ran for every session that ran session_start, with its reason and counts.
    ends = [line.split() for line in addon.with_name("ends.log").read_text().splitlines()]
    assert sorted(end[1] for end in ends) == ["closed", "closed", "policy_reset", "policy_reset"]
    counts = {c["session"]: (c["bytes_up"], c["bytes_down"]) for c in closes}
    assert all(counts[end[0]] == (int(end[2]), int(end[3])) for end in ends), (ends, counts)


def test_an_addon_that_raises_resets_that_session_and_the_next_works(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(HTTP_PORT))
    addon = _addon_file(lab, "raising.py", RAISING)
    proxy = start_proxy(lab, "--addon", str(addon), default_workers=True)
    code, _, stderr = _http(lab, "boom.test")
    assert code != 0 and "reset" in stderr.lower(), stderr
    code, _, stderr = _http(lab, "fine.test")
    assert code == 0, stderr

    closes = _closes(proxy, 2)
    assert sorted(c["reason"] for c in closes) == ["addon_error", "closed"]
    failed = proxy.named("session_error")
    assert len(failed) == 1
    assert (failed[0]["addon"], failed[0]["hook"], failed[0]["error"]) == (
        str(addon), "session_start", "RuntimeError: no sessions to boom.test\\x0aplease",
    )  # fmt: skip
    boom = next(c for c in closes if c["reason"] == "addon_error")
    assert failed[0]["session"] == boom["session"] and boom["http_host"] == "boom.test"
    assert proxy.proc.poll() is None


def test_an_async_hook_that_sleeps_holds_only_its_session(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(HTTP_PORT))
    addon = _addon_file(lab, "slow.py", SLOW)
    proxy = start_proxy(lab, "--addon", str(addon), default_workers=True)
    baseline = _http(lab, "fast.test")
    assert baseline[0] == 0, baseline
    # One client address: both sessions are served by the same worker, the same event loop.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_http, lab, "slow.test")
        time.sleep(0.2)  # the slow session is waiting for its hook by now
        fast = [_http(lab, "fast.test") for _ in range(3)]
        slow_code, slow_s, slow_err = slow.result()
    assert slow_code == 0 and slow_s >= 1.0, (slow_s, slow_err)
    for code, elapsed, stderr in fast:
        assert code == 0 and elapsed < 0.5, (elapsed, stderr)
    closes = _closes(proxy, 5)
    assert all(c["reason"] == "closed" for c in closes), closes
    slow_close = next(c for c in closes if c["http_host"] == "slow.test")
    assert slow_close["duration_s"] >= 1.0


def _is_reset(result: tuple[int, float, str]) -> bool:
    code, _, stderr = result
    return code != 0 and "reset" in stderr.lower()


class _ResettingEverywhere:
    """The resetting addon in the default workers, and one client address for each worker."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        apply_rules(lab, "--ports", str(HTTP_PORT))
        self.addon = _addon_file(lab, "resetting.py", RESETTING)
        self.proxy = start_proxy(lab, "--addon", str(self.addon), default_workers=True)
        self.workers = os.cpu_count() or 1
        self.clients = [str(ip) for _, ip in sorted(client_per_worker(lab, self.workers).items())]

    def check(self, reset_host: str, passing_host: str) -> None:
        """From every client (so on every worker): `reset_host` is reset, `passing_host` not."""
        for source in self.clients:
            assert _is_reset(_http(self.lab, reset_host, source)), (reset_host, source)
            code, _, stderr = _http(self.lab, passing_host, source)
            assert code == 0, (passing_host, source, stderr)


def test_sighup_reloads_an_edited_addon_in_every_worker_and_keeps_it_when_the_next_is_broken(
    served_lab: Lab,
) -> None:
    lab = served_lab
    every = _ResettingEverywhere(lab)
    addon, proxy, workers, clients, check = (every.addon, every.proxy, every.workers,
                                             every.clients, every.check)  # fmt: skip
    check("a.test", "b.test")
    closes = _closes(proxy, 2 * workers)
    assert len({c["worker"] for c in closes}) == workers  # each client on its own worker

    addon.write_text(RESETTING.replace('RESET = "a.test"', 'RESET = "b.test"'))
    proxy.signal(signal.SIGHUP)
    proxy.wait_for(lambda e: "reloaded the configuration" in e.get("message", ""),
                   "the reload notice")  # fmt: skip
    # The supervisor says so once it has reloaded and told the workers; each worker reloads
    # off its own loop a moment later: wait, per worker, for the first b.test it resets.
    for source in clients:
        wait_until(lambda source=source: _is_reset(_http(lab, "b.test", source)), 10,
                   f"the worker of {source} to reload")  # fmt: skip
    check("b.test", "a.test")

    addon.write_text(RESETTING + "\ndef session_end(session:\n")
    proxy.signal(signal.SIGHUP)
    failed = proxy.wait_for(lambda e: "reload failed" in e.get("message", ""), "the failure")
    assert f"addon {addon}:" in failed[0]["message"], failed
    assert "SyntaxError" in failed[0]["message"], failed
    check("b.test", "a.test")
    # Said once, by the supervisor, for every worker; and nothing claims it reloaded again.
    assert len(proxy.find(lambda e: "reload failed" in e.get("message", ""))) == 1
    assert len(proxy.find(lambda e: "reloaded the configuration" in e.get("message", ""))) == 1
    assert proxy.proc.poll() is None


def _unit_reload_argv() -> list[str]:
    """The systemd unit's ExecReload= for a tproxy run as `python -m tproxy` (what `systemctl
    reload tproxy` runs)."""
    unit = render_units(UnitOptions(command=(sys.executable, "-m", "tproxy"), rules_args=()))
    [line] = [line for line in unit[PROXY_UNIT].splitlines() if line.startswith("ExecReload=")]
    return shlex.split(line.removeprefix("ExecReload="))


def test_reload_as_the_unit_says_answers_once_every_worker_applied_and_fails_on_a_broken_file(
    served_lab: Lab,
) -> None:
    """`systemctl reload` runs `tproxy reload`: it returns once every worker has reloaded (the
    very next connection on each worker follows the new addon, no waiting), and an invalid file
    fails it with the reason while every worker keeps the running addon."""
    lab = served_lab
    every = _ResettingEverywhere(lab)
    addon, proxy, workers, check = every.addon, every.proxy, every.workers, every.check
    check("a.test", "b.test")
    reload = _unit_reload_argv()
    assert reload[3:] == ["reload"]  # the default control socket: the proxy's in this namespace

    addon.write_text(RESETTING.replace('RESET = "a.test"', 'RESET = "b.test"'))
    done = lab.run(lab.router, reload, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().splitlines() == [f"reloaded the configuration in {workers} workers"]
    check("b.test", "a.test")

    addon.write_text(RESETTING + "\ndef session_end(session:\n")
    done = lab.run(lab.router, reload, check=False)
    err = done.stderr.decode()
    assert done.returncode == 1 and done.stdout == b"", err
    assert err.startswith("tproxy: reload failed, keeping the running configuration: "), err
    assert f"addon {addon}:" in err and "SyntaxError" in err, err
    check("b.test", "a.test")
    assert len(proxy.find(lambda e: "reload failed" in e.get("message", ""))) == 1
    assert proxy.proc.poll() is None


def test_the_sessions_of_an_addon_that_claims_nothing_stay_on_splice(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(PEER_PORT))
    addon = _addon_file(lab, "unclaimed.py", UNCLAIMED)
    proxy = start_proxy(lab, "--addon", str(addon), default_workers=True)
    peer = str(lab.server.endpoint(PEER_PORT))
    up = client_json(lab, ["upload", peer, "--bytes", str(64 * MIB), "--seed", "21"])
    assert up["intact"] and up["server"]["bytes"] == 64 * MIB, up
    down = client_json(lab, ["download", peer, "--bytes", str(64 * MIB), "--seed", "22"])
    assert down["intact"], down
    closes = _closes(proxy, 2)
    for close in closes:
        assert (close["reason"], close["relay"]) == ("closed", "splice"), close
        assert close["spliced_bytes"] >= 60 * MIB, close
        assert close["addons"] is None, close  # claimed by none
    assert closes[0]["bytes_up"] >= 64 * MIB and closes[1]["bytes_down"] >= 64 * MIB
    # The addon's hooks ran for both sessions all the same.
    ends_log = addon.with_name("ends.log")
    wait_until(lambda: ends_log.exists() and len(ends_log.read_text().splitlines()) == 2, 10,
               "both session_end calls")  # fmt: skip
    ends = dict(line.split() for line in ends_log.read_text().splitlines())
    assert ends == {c["session"]: "closed" for c in closes}
