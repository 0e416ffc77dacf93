"""mitmproxy for the interception benchmark (issue 13): installed on first use into a virtual
environment of the benchmark's own, never into the project's, and configured with tproxy's CA.

The environment lives in `$XDG_CACHE_HOME/tproxy-bench/mitmproxy` (`~/.cache/...` without it),
made with this Python's `venv` and filled by `pip install mitmproxy` (the newest release for
this Python, from the package index pip is set up for); a later run reuses it, and RESULTS.md
names the version it ran. Delete the directory to get the newest release again.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tproxy.lab.topology import LabError


def venv_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "tproxy-bench" / "mitmproxy"


def ensure_mitmdump(venv: Path | None = None) -> Path:
    """`mitmdump` of the benchmark's mitmproxy environment, installing it first if needed.

    Raises:
        LabError: the environment could not be made or pip could not install mitmproxy.
    """
    venv = venv or venv_dir()
    mitmdump = venv / "bin" / "mitmdump"
    if mitmdump.exists():
        return mitmdump
    print(f"installing mitmproxy into {venv} (once)", flush=True)
    for argv in ([sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(venv / "bin" / "pip"), "install", "--quiet", "mitmproxy"]):  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise LabError(
                f"could not install mitmproxy ({' '.join(argv)}): "
                f"{(done.stderr or done.stdout).strip()[-500:]}; leave the mitmproxy mode out "
                "with --modes"
            )
    return mitmdump


def mitmproxy_version(mitmdump: Path) -> str:
    """`mitmproxy 11.0.2` (the first line of `mitmdump --version`), or why not."""
    done = subprocess.run([str(mitmdump), "--version"], capture_output=True, text=True,
                          check=False)  # fmt: skip
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].replace("Mitmproxy:", "mitmproxy").strip() if first else "not installed"


def render_mitmproxy_ca(key_pem: bytes, cert_pem: bytes) -> bytes:
    """mitmproxy's `mitmproxy-ca.pem` (in its confdir): the CA's private key, then its
    certificate, both PEM. mitmproxy signs its forged leaves with it and, like tproxy, gives
    them all one key (its CA's) and caches them."""
    return key_pem.rstrip(b"\n") + b"\n" + cert_pem.rstrip(b"\n") + b"\n"


def render_mitmdump_argv(mitmdump: Path, confdir: Path, upstream_ca: Path, port: int) -> list[str]:
    """mitmdump in transparent mode (the original destination from conntrack, as tproxy's
    REDIRECT mode gets it) on `port`, with the CA in `confdir`, verifying the upstream against
    `upstream_ca` as tproxy's `--upstream-ca` does, and quiet (`-q`: no line per flow, nothing
    but errors): tproxy writes its session log, so this favours mitmproxy. Its other options
    are left at their defaults, which already do what tproxy does: connect upstream first
    (`connection_strategy=eager`) and forge for the names the upstream certificate carries
    (`upstream_cert=true`)."""
    return [str(mitmdump), "--mode", "transparent", "--listen-port", str(port),
            "--set", f"confdir={confdir}",
            "--set", f"ssl_verify_upstream_trusted_ca={upstream_ca}", "-q"]  # fmt: skip
