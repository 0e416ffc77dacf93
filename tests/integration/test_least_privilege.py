"""Least privilege: `tproxy run` as a user with CAP_NET_ADMIN only, and `--user NAME` from root.

What a user sees: traffic through the router works (spoofing, IPv6, redirect mode, workers, a
port below 1024) and every tproxy process shows the user and exactly the capabilities kept in
/proc/PID/status; without CAP_NET_ADMIN the start fails with one line.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path

import pytest

import tproxy
from tests.integration.conftest import apply_rules, client_json, curl, tproxy_cli
from tproxy.diagnostics.checks import pipe_pages_needed
from tproxy.engine.pipes import pages_for_full_size, read_pipe_budget_pages
from tproxy.lab.proxy_process import ProxyProcess
from tproxy.lab.services import HTTP_PORT, PEER_PORT, TLS_NAME, TLS_PORT, start_tls_server
from tproxy.lab.topology import Lab, wait_until
from tproxy.service.privileges import CAP_NET_ADMIN, capability_mask, parse_status_capabilities

NOBODY = 65534
NET_ADMIN = capability_mask([CAP_NET_ADMIN])  # 0x1000


def _as_nobody(*caps: str) -> list[str]:
    """setpriv: uid/gid 65534, no groups, only `caps` (inheritable, ambient and bounding)."""
    wrapper = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if caps:
        plus = ",".join(f"+{c}" for c in caps)
        wrapper += [f"--inh-caps={plus}", f"--ambient-caps={plus}", f"--bounding-set=-all,{plus}"]
    else:
        wrapper += ["--inh-caps=-all", "--bounding-set=-all"]
    return [*wrapper, "--"]


def _readable_by_nobody(path: str) -> bool:
    argv = [*_as_nobody(), "test", "-r", path, "-a", "-x", path]
    return subprocess.run(argv, check=False).returncode == 0


_STAGED: list[str] = []  # the readable copy, made once per test session


def _staged_code() -> str:
    """A copy of tproxy and its runtime dependencies in a directory every user may read (the
    checkout may be under a 0700 directory: root's home, mkdtemp's), made once; removed at
    exit."""
    if _STAGED:
        return _STAGED[0]
    staged = Path(tempfile.mkdtemp(prefix="tproxy-nobody-code-"))
    atexit.register(shutil.rmtree, staged, True)
    shutil.copytree(Path(tproxy.__file__).parent, staged / "tproxy",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    # tproxy's own runtime requirements (not its extras), as its installed metadata lists them.
    todo = [r for r in metadata.requires("tproxy") or () if "extra ==" not in r]
    seen: set[str] = set()
    while todo:  # the closure of the runtime dependencies, each distribution's files
        name = re.split(r"[ ;<>=!~\[]", todo.pop())[0].lower()
        if name in seen:
            continue
        seen.add(name)
        dist = metadata.distribution(name)
        for file in dist.files or ():
            source = Path(str(dist.locate_file(file)))
            target = staged / file
            if source.is_file() and ".." not in file.parts:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        todo += [r for r in dist.requires or () if "extra ==" not in r]
    for path in (staged, *staged.rglob("*")):
        path.chmod(0o755 if path.is_dir() else 0o644)
    _STAGED.append(str(staged))
    return str(staged)


def _python_nobody_reads() -> list[str]:
    """A wrapper that runs `python -m tproxy ARGS` with an interpreter and code that uid 65534
    can read: the tests' own when it can, else the system's Python of the same version (`-S`:
    not the system's packages) with a readable copy of tproxy and its dependencies."""
    package = os.path.dirname(os.path.dirname(__file__))  # (a path inside the checkout)
    if _readable_by_nobody(os.path.dirname(os.__file__)) and _readable_by_nobody(package):
        return []
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    if not os.path.exists(system):
        pytest.fail(f"uid {NOBODY} cannot read {sys.executable}, and there is no {system}")
    launch = (
        f"import runpy, sys; sys.path.insert(0, {_staged_code()!r}); "
        "sys.argv = ['tproxy', *sys.argv[4:]]; runpy.run_module('tproxy', run_name='__main__')"
    )  # argv: -c, the tests' python, -m, tproxy, ARGS
    return [system, "-S", "-c", launch]


def _unprivileged(*caps: str) -> list[str]:
    """setpriv as `_as_nobody(*caps)`, then a Python that uid 65534 can run tproxy with."""
    return [*_as_nobody(*caps), *_python_nobody_reads()]


def _tproxy(lab: Lab, args: Sequence[str], wrapper: Sequence[str] = ()) -> ProxyProcess:
    """`tproxy run ARGS` in the router (default workers: one per CPU) once every worker listens."""
    proxy = ProxyProcess(lab, lab.router, args, wrapper=wrapper)
    proxy.wait_for(lambda e: e.get("event") == "listening", "every worker",
                   count=os.cpu_count() or 1)  # fmt: skip
    return proxy


def _processes(proxy: ProxyProcess) -> list[int]:
    """The supervisor and its workers."""
    pid = proxy.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(int(c) for c in children)]


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def _assert_nobody_with_net_admin_only(pid: int) -> None:
    status = _status(pid)
    assert status["Uid"].split() == [str(NOBODY)] * 4, (pid, status["Uid"])
    assert status["Gid"].split() == [str(NOBODY)] * 4, (pid, status["Gid"])
    assert status["Groups"].split() in ([], [str(NOBODY)]), (pid, status["Groups"])
    caps = parse_status_capabilities("\n".join(f"{k}: {v}" for k, v in status.items()))
    expected = {"CapEff": NET_ADMIN, "CapPrm": NET_ADMIN, "CapBnd": NET_ADMIN, "CapInh": 0,
                "CapAmb": 0}  # fmt: skip
    assert caps == expected, (pid, {k: hex(v) for k, v in caps.items()})


def _spoofed_http(lab: Lab, family: int) -> None:
    code, body = curl(lab, f"http://{lab.server.endpoint(HTTP_PORT, family)}/")
    assert code == 200
    client_ip = lab.client.ipv4 if family == 4 else lab.client.ipv6
    assert body.strip().endswith(f"saw you as {client_ip}"), body


def _intact(lab: Lab, family: int, mib: int = 8) -> None:
    peer = str(lab.server.endpoint(PEER_PORT, family))
    up = client_json(lab, ["upload", peer, "--bytes", str(mib << 20), "--seed", "3"])
    assert up["intact"], up
    down = client_json(lab, ["download", peer, "--bytes", str(mib << 20), "--seed", "4"])
    assert down["intact"], down


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may read (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="tproxy-priv-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _notices(proxy: ProxyProcess, text: str) -> list[str]:
    return [e["message"] for e in proxy.named("notice") if text in e.get("message", "")]


# --- --user from root ---------------------------------------------------------------------------


def test_user_nobody_every_process_has_net_admin_only(served_lab: Lab, shared_dir: Path) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", f"{HTTP_PORT},{PEER_PORT}")
    # An addon that refuses to be loaded by root: addon code never runs as root with --user.
    addon = shared_dir / "not_root.py"
    addon.write_text(
        "import os\n"
        "if os.geteuid() == 0:\n"
        "    raise RuntimeError('an addon loaded as root')\n"
        "def session_end(session):\n"
        "    pass\n"
    )
    addon.chmod(0o644)
    proxy = _tproxy(lab, ["--user", "nobody", "--spoof-source", "--addon", str(addon)],
                    wrapper=_python_nobody_reads())  # fmt: skip
    for family in (4, 6):
        _spoofed_http(lab, family)
        _intact(lab, family)
    pids = _processes(proxy)
    assert len(pids) == 1 + (os.cpu_count() or 1)
    for pid in pids:
        _assert_nobody_with_net_admin_only(pid)
    assert len(_notices(proxy, "running as nobody (uid 65534")) == 1
    assert _notices(proxy, "running as root") == []
    # The pipes are sized for the user's pipe budget, and it says so once when that shrinks them.
    page = os.sysconf("SC_PAGE_SIZE")
    budget = read_pipe_budget_pages()
    shrunk = 0 < budget < pages_for_full_size(os.cpu_count() or 1, page)
    assert len(_notices(proxy, "this user's pipe budget")) == (1 if shrunk else 0)

    # A worker the supervisor restarts is the user's too, and serves.
    listening = len(proxy.named("listening"))
    os.kill(pids[1], signal.SIGKILL)
    wait_until(lambda: len(proxy.named("listening")) > listening, 10, "the restarted worker")
    for pid in _processes(proxy):
        _assert_nobody_with_net_admin_only(pid)
    _spoofed_http(lab, 4)

    # A reload loads the addon again, as the user (as root it would raise, and be kept as is).
    proxy.signal(signal.SIGHUP)
    proxy.wait_for(lambda e: "reloaded the configuration in" in e.get("message", ""), "reload")
    assert not proxy.find(lambda e: "an addon loaded as root" in str(e))
    assert proxy.stop() == 0


def test_user_takeover_leaves_the_new_one_answering_on_the_control_socket(lab: Lab) -> None:
    """With --user the new process serves as the user when it takes the control socket's path
    over (root's directory, /run/tproxy): it must still answer there, so that a second proxy
    is refused and it can be taken over in turn."""
    python = _python_nobody_reads()
    old = _tproxy(lab, ["--user", "nobody"], wrapper=python)
    new = _tproxy(lab, ["--user", "nobody", "--takeover"], wrapper=python)
    try:
        wait_until(lambda: old.proc.poll() is not None, 60, "the old tproxy to drain and exit")
        assert old.proc.returncode == 0, old.stderr_text()
        time.sleep(0.5)
        assert _notices(new, "control socket") == []
        again = _run(lab, [])
        assert again.returncode == 1, again
        assert "another tproxy is running" in again.stderr.decode(), again.stderr
    finally:
        new.stop()


def test_user_a_file_the_user_cannot_read_stops_the_start(lab: Lab, shared_dir: Path) -> None:
    policy = shared_dir / "policy.toml"
    policy.write_text('default = "allow"\n')
    policy.chmod(0o600)  # root's: nobody cannot read it
    result = _run(lab, _python_nobody_reads(), "--user", "nobody", "--policy", str(policy))
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "Permission denied" in lines[0], lines
    assert str(policy) in lines[0]


def test_user_that_does_not_exist_is_one_line_and_binds_nothing(lab: Lab) -> None:
    result = _run(lab, [], "--user", "nosuchuser")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "tproxy: error: --user nosuchuser: no such user (create it with 'useradd --system "
        "--no-create-home --shell /usr/sbin/nologin nosuchuser')"
    ]
    listening = lab.run(lab.router, ["ss", "-Htln"], check=False).stdout.decode()
    assert ":1800" not in listening
    proxy = ProxyProcess(lab, lab.router, ["--workers", "1"])
    proxy.wait_listening()  # the port is free
    assert proxy.stop() == 0


def test_user_who_cannot_read_the_python_stops_the_start(lab: Lab) -> None:
    """A Python under root's home (0700): the user could not import a module needed late."""
    stdlib = os.path.dirname(os.__file__)
    if _readable_by_nobody(stdlib):
        pytest.skip(f"uid {NOBODY} can read this Python's library ({stdlib})")
    result = _run(lab, [], "--user", "nobody")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"tproxy: error: --user nobody cannot read {stdlib}, where tproxy imports from as it "
        "runs: install tproxy (and its Python) where that user can read it"
    ]


def test_as_root_without_user_a_notice_once(lab: Lab) -> None:
    proxy = _tproxy(lab, [])
    assert _notices(proxy, "running as root: consider --user NAME") != []
    assert proxy.stop() == 0
    assert len(_notices(proxy, "running as root")) == 1
    assert _notices(proxy, "pipe budget") == []  # root is exempt


def test_user_tls_interception_reads_the_ca_as_the_user(lab: Lab, shared_dir: Path) -> None:
    server_cert = start_tls_server(lab, lab.server)
    upstream_ca = shared_dir / "upstream.crt"
    shutil.copy(server_cert, upstream_ca)
    upstream_ca.chmod(0o644)
    apply_rules(lab, "--ports", str(TLS_PORT))
    ca = shared_dir / "ca"
    tproxy_cli(lab, lab.router, "ca", "create", str(ca))  # root's: 0700, key 0600
    policy = shared_dir / "policy.toml"
    policy.write_text(f'[[rule]]\nname = "inspect"\nsni = ["{TLS_NAME}"]\naction = "allow"\n'
                      'tls = "intercept"\n')  # fmt: skip
    policy.chmod(0o644)
    keys = shared_dir / "keys"
    keys.mkdir(mode=0o700)
    os.chown(keys, NOBODY, NOBODY)
    args = ["--user", "nobody", "--ca", str(ca), "--policy", str(policy), "--upstream-ca",
            str(upstream_ca), "--keylog", str(keys / "keys.log")]  # fmt: skip

    # The CA key is root's: the start stops with one line, as the user would meet it.
    python = _python_nobody_reads()
    refused = _run(lab, python, *args)
    assert refused.returncode == 1
    lines = refused.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tproxy: error: --ca: "), lines

    for path in (ca, *ca.iterdir()):
        os.chown(path, NOBODY, NOBODY)
    proxy = _tproxy(lab, args, wrapper=python)
    address = lab.server.ipv4
    done = lab.run(lab.client, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                "--max-time", "10", "--cacert", str(ca / "ca.crt"), "--resolve",
                                f"{TLS_NAME}:{TLS_PORT}:{address}",
                                f"https://{TLS_NAME}:{TLS_PORT}/"], check=False)  # fmt: skip
    assert done.stdout.decode() == "200", (done.stderr, proxy.snapshot()[-3:])
    close = proxy.wait_for(lambda e: e.get("event") == "session_close", "the close")[0]
    assert close["tls_intercepted"] is True, close
    keylog = keys / "keys.log"  # created by the user, 0600
    assert (keylog.stat().st_uid, keylog.stat().st_mode & 0o777) == (NOBODY, 0o600)
    assert keylog.read_text().strip()
    for pid in _processes(proxy):
        _assert_nobody_with_net_admin_only(pid)
    assert proxy.stop() == 0


# --- unprivileged: a user holding CAP_NET_ADMIN only ----------------------------------------------


def test_unprivileged_spoofing_ipv4_and_ipv6_with_workers(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", f"{HTTP_PORT},{PEER_PORT}")
    proxy = _tproxy(lab, ["--spoof-source"], wrapper=_unprivileged("net_admin"))
    for family in (4, 6):
        _spoofed_http(lab, family)
        _intact(lab, family)
    for pid in _processes(proxy):
        _assert_nobody_with_net_admin_only_inherited(pid)
    assert _notices(proxy, "running as root") == []
    assert proxy.stop() == 0


def _assert_nobody_with_net_admin_only_inherited(pid: int) -> None:
    """setpriv's way: the capability is inheritable and ambient as well (so it survives exec)."""
    status = _status(pid)
    assert status["Uid"].split() == [str(NOBODY)] * 4
    caps = parse_status_capabilities("\n".join(f"{k}: {v}" for k, v in status.items()))
    assert caps["CapEff"] == caps["CapBnd"] == NET_ADMIN, {k: hex(v) for k, v in caps.items()}


def test_unprivileged_redirect_mode(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", f"{HTTP_PORT},{PEER_PORT}", "--mode", "redirect")
    proxy = _tproxy(lab, ["--mode", "redirect"], wrapper=_unprivileged("net_admin"))
    for family in (4, 6):
        code, _ = curl(lab, f"http://{lab.server.endpoint(HTTP_PORT, family)}/")
        assert code == 200
        _intact(lab, family)
    assert proxy.stop() == 0


def test_unprivileged_listener_below_1024_needs_net_bind_service(served_lab: Lab) -> None:
    lab = served_lab
    apply_rules(lab, "--ports", str(HTTP_PORT), "--proxy-port", "800")
    listen = ["--listen", "0.0.0.0:800", "--listen", "[::]:800", "--spoof-source"]
    refused = _run(lab, _unprivileged("net_admin"), *listen)
    assert refused.returncode == 1
    assert len(refused.stderr.decode().splitlines()) == 1, refused.stderr
    assert "cannot listen on 0.0.0.0:800: Permission denied" in refused.stderr.decode()
    proxy = _tproxy(lab, listen, wrapper=_unprivileged("net_admin", "net_bind_service"))
    for family in (4, 6):
        _spoofed_http(lab, family)
    assert proxy.stop() == 0


@pytest.mark.parametrize("mode", ["tproxy", "redirect"])
def test_unprivileged_without_net_admin_is_one_line(lab: Lab, mode: str) -> None:
    result = _run(lab, _unprivileged(), "--mode", mode, "--workers", "2")
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("tproxy: error: ") and "CAP_NET_ADMIN" in lines[0], lines


def _run(lab: Lab, wrapper: Sequence[str], *args: str) -> subprocess.CompletedProcess[bytes]:
    argv = [*wrapper, sys.executable, "-m", "tproxy", "run", *args]
    return lab.run(lab.router, argv, 20, check=False)


def test_doctor_says_when_the_pipe_budget_is_too_small(lab: Lab) -> None:
    budget = read_pipe_budget_pages()
    if budget == 0:
        pytest.skip("fs.pipe-user-pages-soft = 0: no budget here")
    covered = budget // pipe_pages_needed(1)
    for count, status in ((covered, "ok"), (covered + 1, "warn")):
        report = json.loads(tproxy_cli(lab, lab.router, "doctor", "--json", "--max-connections",
                                       str(count), check=False))  # fmt: skip
        check = next(c for c in report["checks"] if c["check"] == "pipe-budget")
        assert check["status"] == status, check
        if status == "warn":
            need = pipe_pages_needed(count)
            assert check["fix"].startswith(f"sysctl -w fs.pipe-user-pages-soft={need} "), check
