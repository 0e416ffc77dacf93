"""Start-up checks for captures: a broken capture setup stops `tproxy run` (and fails a reload)
with one sentence, before any session could be captured into nowhere.

The directory is never created: a typo would otherwise become a root-owned directory that
collects secrets somewhere nobody looks, and its owner and mode are the operator's decision
(`install -d -m 0700 DIR`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from tproxy.core.config import ConfigError, ProxyConfig


def check_capture_config(config: ProxyConfig) -> None:
    """Raise ConfigError if something asks for captures that have nowhere to go (pure).

    `--capture-all` without a directory is refused by `build_config` already; this adds the
    policy's rules, which are loaded after it.
    """
    if config.capture_dir is not None or config.matcher is None:
        return
    for rule in config.matcher.policy.rules:
        if rule.capture:
            raise ConfigError(
                f"policy rule {rule.name!r} has capture = true, but no --capture-dir "
                "(capture_dir) says where captures go"
            )


def check_capture_dir(directory: str) -> None:
    """Raise ConfigError unless `directory` exists, is a directory and this process can create
    files in it (tried for real: a read-only mount or a full inode table shows only then).
    """
    try:
        if not os.path.isdir(directory):
            what = "is not a directory" if os.path.exists(directory) else "does not exist"
            raise ConfigError(
                f"capture directory {directory} {what}: create it, e.g. "
                f"install -d -m 0700 {directory}"
            )
        fd, probe = tempfile.mkstemp(prefix=".tproxy-write-check-", dir=directory)
    except OSError as exc:
        raise ConfigError(
            f"capture directory {directory} is not writable: {exc.strerror or exc}"
        ) from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_capture(config: ProxyConfig) -> None:
    """Every capture check for a configuration just loaded; raises ConfigError."""
    check_capture_config(config)
    if config.capture_dir is not None:
        check_capture_dir(config.capture_dir)
