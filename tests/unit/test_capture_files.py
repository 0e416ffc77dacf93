"""Capture files: names a person finds from the log, 0600 files that appear under their final
name only whole, a full disk that ends the capture and not the session, and a directory pruned
oldest first without ever touching a capture still being written."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import io
import ipaddress
import json
import os
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tproxy.capture.prune as prune_module
import tproxy.engine.supervisor as supervisor_module
from tproxy.capture.files import CaptureFile, capture_name, is_capture_name, open_capture
from tproxy.capture.prune import (
    CapturePruner,
    FileInfo,
    prune,
    render_prune_notice,
    scan,
    to_delete,
)
from tproxy.capture.setup import check_capture, check_capture_config, check_capture_dir
from tproxy.cli.main import main
from tproxy.core.config import ConfigError, LogFormat, ProxyConfig
from tproxy.engine.server import ProxyServer
from tproxy.engine.supervisor import Supervisor
from tproxy.observability.eventlog import EventLog
from tproxy.policy.matcher import Matcher
from tproxy.policy.model import Action, Policy, Rule

# 2026-12-01 04:15:00 UTC
STARTED_AT = 1796098500.25

# --- names -----------------------------------------------------------------------------------


def test_a_name_says_when_which_session_and_between_whom() -> None:
    name = capture_name(STARTED_AT, "01kbj9dq70102", "198.18.1.2:50000", "198.18.2.2:443")
    assert name == "20261201T041500Z_01kbj9dq70102_198.18.1.2_50000_to_198.18.2.2_443.pcapng"


def test_an_ipv6_name_has_no_colons_or_brackets() -> None:
    name = capture_name(STARTED_AT, "01kbj9dq70102", "[2001:db8:1::2]:50000", "[2001:db8::1]:443")
    assert name == ("20261201T041500Z_01kbj9dq70102_2001-db8-1--2_50000_to_2001-db8--1_443.pcapng")


def test_names_sort_by_start_time() -> None:
    names = [
        capture_name(STARTED_AT + delta, "01kbj9dq70102", "198.18.1.2:1", "198.18.2.2:2")
        for delta in (0, 1, 59, 3600, 86400 * 40)
    ]
    assert names == sorted(names)


ADDRESSES = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda a: f"[{a}]"),
)
ENDPOINTS = st.tuples(ADDRESSES, st.integers(1, 65535)).map(lambda t: f"{t[0]}:{t[1]}")


def _field_to_endpoint(host: str, port: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address,
                                                      int]:  # fmt: skip
    return ipaddress.ip_address(host.replace("-", ":")), int(port)


def _endpoint(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    host, _, port = text.rpartition(":")
    return ipaddress.ip_address(host.strip("[]")), int(port)


@given(
    st.floats(0, 2**33),
    st.text("0123456789abcdefghjkmnpqrstvwxyz", min_size=13, max_size=13),
    ENDPOINTS,
    ENDPOINTS,
)
def test_a_name_is_one_safe_file_name_that_reads_back(
    started_at: float, session_id: str, client: str, dst: str
) -> None:
    name = capture_name(started_at, session_id, client, dst)
    assert "/" not in name and ":" not in name and "[" not in name and len(name) < 255
    assert is_capture_name(name)
    fields = name.removesuffix(".pcapng").split("_")
    assert len(fields) == 7 and fields[4] == "to"
    when, ident, client_host, client_port, _, dst_host, dst_port = fields
    assert when == time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started_at))
    assert ident == session_id
    assert _field_to_endpoint(client_host, client_port) == _endpoint(client)
    assert _field_to_endpoint(dst_host, dst_port) == _endpoint(dst)


def test_only_what_capture_name_makes_is_a_capture_name() -> None:
    name = capture_name(STARTED_AT, "01kbj9dq70102", "[2001:db8::2]:1", "198.18.2.2:443")
    assert is_capture_name(name) and is_capture_name(name + ".part")
    for other in ("notes.pcapng", "x.pcapng.part", name + ".bak", name.replace("_to_", "_"),
                  "20261201T041500Z.pcapng", "." + name):  # fmt: skip
        assert not is_capture_name(other), other


def test_nothing_unsafe_gets_into_a_name() -> None:
    name = capture_name(STARTED_AT, "../x_y", "[fe80::1%eth/0]:1", "a b:2")
    assert "/" not in name and " " not in name
    assert len(name.removesuffix(".pcapng").split("_")) == 7


# --- writing ---------------------------------------------------------------------------------


@pytest.fixture
def opened(tmp_path: Path) -> Iterator[Callable[..., CaptureFile]]:
    """Opens capture files in tmp_path; abandons any a test left open."""
    made: list[CaptureFile] = []

    def make(name: str = "s.pcapng") -> CaptureFile:
        capture = open_capture(str(tmp_path), name)
        made.append(capture)
        return capture

    yield make
    for capture in made:
        capture.abandon()


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o277])
def test_a_capture_is_0600_whatever_the_umask(
    tmp_path: Path, opened: Callable[..., CaptureFile], umask: int
) -> None:
    old = os.umask(umask)
    try:
        capture = opened()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(capture.part_path).st_mode) == 0o600
    assert capture.write(b"data")
    path = capture.finish()
    assert path is not None
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_the_final_name_appears_only_when_finished_and_whole(
    tmp_path: Path, opened: Callable[..., CaptureFile]
) -> None:
    capture = opened("s.pcapng")
    assert _names(tmp_path) == ["s.pcapng.part"]
    for chunk in (b"a" * 1000, b"b" * 70000, b"c"):
        assert capture.write(chunk)
        assert _names(tmp_path) == ["s.pcapng.part"]  # never the final name while writing
    assert capture.bytes_written == 71001
    assert capture.finish() == str(tmp_path / "s.pcapng")
    assert _names(tmp_path) == ["s.pcapng"]
    assert (tmp_path / "s.pcapng").read_bytes() == b"a" * 1000 + b"b" * 70000 + b"c"
    assert capture.finish() == str(tmp_path / "s.pcapng")  # again: the same answer
    assert not capture.write(b"more")  # closed


def test_an_existing_part_is_never_opened_again(
    tmp_path: Path, opened: Callable[..., CaptureFile]
) -> None:
    (tmp_path / "s.pcapng.part").write_bytes(b"someone else's")
    with pytest.raises(FileExistsError):
        opened("s.pcapng")
    assert (tmp_path / "s.pcapng.part").read_bytes() == b"someone else's"


def test_a_planted_symlink_is_not_followed(
    tmp_path: Path, opened: Callable[..., CaptureFile]
) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    (tmp_path / "s.pcapng.part").symlink_to(target)
    with pytest.raises(FileExistsError):
        opened("s.pcapng")
    assert target.read_bytes() == b"precious"


def test_a_short_write_is_continued(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, opened: Callable[..., CaptureFile]
) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    capture = opened()
    assert capture.write(b"0123456789")
    monkeypatch.undo()
    assert capture.finish() is not None
    assert (tmp_path / "s.pcapng").read_bytes() == b"0123456789"


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, "ENOSPC: No space left on device"),
        (errno.EDQUOT, "EDQUOT: Disk quota exceeded"),
        (errno.EIO, "EIO: Input/output error"),
    ],
)
def test_a_full_disk_ends_the_capture_and_says_why(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    opened: Callable[..., CaptureFile],
    code: int,
    expected: str,
) -> None:
    capture = opened()
    assert capture.write(b"first")
    real_write = os.write
    calls = []

    def full(fd: int, data: bytes) -> int:
        calls.append(len(data))
        if len(calls) == 1:  # part of it fits, then the disk is full
            return real_write(fd, bytes(data[:2]))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "write", full)
    assert not capture.write(b"second")
    assert capture.error == expected
    assert not capture.is_open
    assert _names(tmp_path) == []  # the .part is gone: the space is back
    assert not capture.write(b"third")  # and stays failed without trying again
    assert len(calls) == 2
    assert capture.finish() is None
    assert _names(tmp_path) == []


def test_a_delayed_write_error_at_close_fails_the_finish(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, opened: Callable[..., CaptureFile]
) -> None:
    capture = opened()
    assert capture.write(b"data")
    real_close = os.close

    def close(fd: int) -> None:
        real_close(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "close", close)
    assert capture.finish() is None
    assert capture.error == "EIO: Input/output error"
    assert _names(tmp_path) == []


def test_abandon_closes_and_removes_the_part(
    tmp_path: Path, opened: Callable[..., CaptureFile]
) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    capture = opened()
    assert capture.write(b"x")
    capture.abandon()
    capture.abandon()
    assert _names(tmp_path) == []
    assert capture.finish() is None
    assert capture.error is None  # abandoned, not failed
    assert len(os.listdir("/proc/self/fd")) == fds


def test_an_unwritable_directory_is_an_os_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def refuse(*_args: object) -> int:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "open", refuse)
    try:
        with pytest.raises(PermissionError):
            open_capture(str(tmp_path), "s.pcapng")
    finally:
        monkeypatch.undo()


# --- what to prune (pure) --------------------------------------------------------------------

NOW = 2_000_000_000.0
DAY = 86400.0


def _info(name: str, size: int, age_s: float) -> FileInfo:
    return FileInfo(name, size, NOW - age_s)


def test_nothing_is_deleted_within_the_limits() -> None:
    files = [_info("a.pcapng", 10, DAY), _info("b.pcapng", 10, 2 * DAY)]
    assert to_delete(files, NOW, 20, 2 * DAY) == []
    assert to_delete(files, NOW, None, None) == []


def test_the_age_limit_deletes_only_older_finished_files() -> None:
    files = [
        _info("new.pcapng", 1, 60),
        _info("old.pcapng", 1, 8 * DAY),
        _info("older.pcapng", 1, 9 * DAY),
        _info("old-but-writing.pcapng.part", 1, 30 * DAY),
    ]
    assert to_delete(files, NOW, None, 7 * DAY) == ["older.pcapng", "old.pcapng"]


def test_the_total_limit_deletes_oldest_first_until_it_fits() -> None:
    files = [
        _info("c.pcapng", 100, 1),
        _info("a.pcapng", 100, 3),
        _info("b.pcapng", 100, 2),
        _info("w.pcapng.part", 100, 10),
    ]
    assert to_delete(files, NOW, 250, None) == ["a.pcapng", "b.pcapng"]


def test_part_files_alone_over_the_total_take_every_finished_file() -> None:
    files = [_info("a.pcapng", 1, 3), _info("w.pcapng.part", 500, 1)]
    assert to_delete(files, NOW, 100, None) == ["a.pcapng"]


FILE_INFOS = st.lists(
    st.builds(
        FileInfo,
        st.tuples(st.integers(0, 10**6), st.booleans()).map(
            lambda t: f"f{t[0]}.pcapng" + (".part" if t[1] else "")
        ),
        st.integers(0, 1 << 30),
        st.floats(NOW - 30 * DAY, NOW + 60),  # a little in the future: a clock set back
    ),
    max_size=40,
    unique_by=lambda f: f.name,
)
LIMITS = st.tuples(st.none() | st.integers(0, 10 << 30), st.none() | st.floats(0, 40 * DAY))


@given(FILE_INFOS, LIMITS)
def test_to_delete_keeps_its_promises(
    files: list[FileInfo], limits: tuple[int | None, float | None]
) -> None:
    max_total, max_age = limits
    chosen = to_delete(files, NOW, max_total, max_age)
    by_name = {f.name: f for f in files}
    assert len(set(chosen)) == len(chosen)
    assert all(by_name[name].finished for name in chosen), "never a .part"
    kept = [f for f in files if f.name not in chosen]
    kept_finished = [f for f in kept if f.finished]
    if max_age is not None:
        assert all(NOW - f.mtime <= max_age for f in kept_finished)
    if max_total is not None:
        parts_total = sum(f.size for f in files if not f.finished)
        if parts_total <= max_total:
            assert sum(f.size for f in kept) <= max_total
        else:
            assert kept_finished == []
    # Oldest first: in deletion order, and never a kept finished file older than a deleted one.
    ages = [(by_name[n].mtime, n) for n in chosen]
    assert ages == sorted(ages)
    if chosen:
        assert all((f.mtime, f.name) > ages[-1] for f in kept_finished)
    # Nothing more than needed: keeping the youngest deleted file would break a limit.
    if chosen:
        youngest = by_name[chosen[-1]]
        over_age = max_age is not None and NOW - youngest.mtime > max_age
        total_with_it = sum(f.size for f in kept) + youngest.size
        over_total = max_total is not None and total_with_it > max_total
        assert over_age or over_total


@given(FILE_INFOS)
def test_without_limits_nothing_is_deleted(files: list[FileInfo]) -> None:
    assert to_delete(files, NOW, None, None) == []


# --- pruning a directory ---------------------------------------------------------------------


def _capture(label: str, part: bool = False) -> str:
    """A real capture's name, its session id spelled `label`."""
    name = capture_name(STARTED_AT, label, "198.18.1.2:50000", "198.18.2.2:443")
    return name + ".part" if part else name


def _make(directory: Path, name: str, size: int, age_s: float) -> None:
    path = directory / name
    path.write_bytes(b"x" * size)
    mtime = time.time() - age_s
    os.utime(path, (mtime, mtime))


_HELD: list[IO[bytes]] = []


@pytest.fixture(autouse=True)
def _release_writer_locks() -> Iterator[None]:
    yield
    while _HELD:
        _HELD.pop().close()


def _writing(path: Path) -> None:
    """Hold the writer's lock on `path`, as a live worker does, until the test ends."""
    held = path.open("rb")
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)
    _HELD.append(held)


def _worker_files(directory: Path) -> None:
    """What two workers and an operator leave in a directory: each worker's finished captures
    and one still being written (its lock held to the end of the test), plus files that are not
    captures."""
    for worker, session in (("1", "01kbj9dq70102"), ("2", "01kbj9dq70203")):
        for age in (1, 2, 3):
            name = capture_name(time.time() - age * DAY, f"{session[:-1]}{age}",
                                f"198.18.1.{worker}:5000{age}", "198.18.2.2:443")  # fmt: skip
            _make(directory, name, 1000, age * DAY + int(worker))
        _make(directory, _capture(f"writing{worker}", part=True), 1000, 10 * DAY)
        _writing(directory / _capture(f"writing{worker}", part=True))
    _make(directory, "notes.txt", 10**6, 100 * DAY)
    _make(directory, "old.pcap", 10**6, 100 * DAY)
    _make(directory, "mine.pcapng", 10**6, 100 * DAY)  # the operator's, not a capture
    (directory / _capture("subdir")).mkdir()
    (directory / _capture("link")).symlink_to(directory / "notes.txt")


def test_scan_sees_only_capture_files(tmp_path: Path) -> None:
    _worker_files(tmp_path)
    found = scan(str(tmp_path))
    assert len(found) == 8
    assert sum(not f.finished for f in found) == 2
    assert all(f.size == 1000 for f in found)


def test_prune_deletes_every_workers_oldest_finished_files_and_nothing_else(
    tmp_path: Path,
) -> None:
    _worker_files(tmp_path)
    deleted, errors = prune(str(tmp_path), time.time(), 5000, None)
    assert errors == []
    # 8000 bytes of captures, 5000 allowed: the three oldest finished go (the parts stay).
    assert len(deleted) == 3
    left = set(_names(tmp_path))
    assert {_capture("writing1", part=True), _capture("writing2", part=True)} <= left
    assert {"notes.txt", "old.pcap", "mine.pcapng", _capture("subdir"), _capture("link")} <= left
    remaining = scan(str(tmp_path))
    assert sum(f.size for f in remaining) <= 5000
    oldest_kept = min(f.mtime for f in remaining if f.finished)
    assert all(d.mtime <= oldest_kept for d in deleted)


def test_prune_by_age_across_workers(tmp_path: Path) -> None:
    _worker_files(tmp_path)
    deleted, _ = prune(str(tmp_path), time.time(), None, 1.5 * DAY)
    assert len(deleted) == 4  # each worker's 2- and 3-day-old captures
    kept = [f for f in scan(str(tmp_path)) if f.finished]
    assert len(kept) == 2 and all(time.time() - f.mtime < 1.5 * DAY for f in kept)
    assert sum(not f.finished for f in scan(str(tmp_path))) == 2  # ten days old, still writing


def test_a_part_whose_writer_died_counts_as_finished_once_older_than_the_grace(
    tmp_path: Path,
) -> None:
    _make(tmp_path, _capture("dead", part=True), 5000, 2 * DAY)  # no lock: its writer is gone
    _make(tmp_path, _capture("fresh", part=True), 10, 1)  # younger than the grace: left be
    _make(tmp_path, _capture("alive", part=True), 10, 3 * DAY)
    _writing(tmp_path / _capture("alive", part=True))
    _make(tmp_path, _capture("new"), 10, 0)
    found = {f.name: f for f in scan(str(tmp_path))}
    assert [n for n, f in sorted(found.items()) if f.orphaned] == [_capture("dead", part=True)]
    deleted, errors = prune(str(tmp_path), time.time(), 1000, None)
    # The orphan goes first (oldest); the new capture stays; the live .part is never chosen.
    assert ([f.name for f in deleted], errors) == ([_capture("dead", part=True)], [])
    assert set(_names(tmp_path)) == {
        _capture(n, part=n != "new") for n in ("fresh", "alive", "new")
    }


def test_a_finished_capture_is_as_old_as_its_end_not_its_last_write(tmp_path: Path) -> None:
    file = open_capture(str(tmp_path), _capture("idle"))
    assert file.write(b"x")
    os.utime(file.part_path, (time.time() - DAY, time.time() - DAY))  # idle for a day
    path = file.finish()
    assert path is not None and time.time() - os.stat(path).st_mtime < 60
    assert prune(str(tmp_path), time.time(), None, 3600) == ([], [])


def test_a_file_deleted_by_someone_else_meanwhile_is_not_an_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _make(tmp_path, _capture("a"), 10, 3 * DAY)
    _make(tmp_path, _capture("b"), 10, 2 * DAY)
    real_scan = prune_module.scan

    def scan_then_race(directory: str, now: float | None = None) -> list[FileInfo]:
        found = real_scan(directory, now)
        os.unlink(os.path.join(directory, _capture("a")))  # another process was quicker
        return found

    monkeypatch.setattr(prune_module, "scan", scan_then_race)
    deleted, errors = prune(str(tmp_path), time.time(), None, DAY)
    assert ([f.name for f in deleted], errors) == ([_capture("b")], [])
    assert _names(tmp_path) == []


def test_a_file_that_cannot_be_deleted_is_reported_and_the_rest_go(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _make(tmp_path, _capture("a"), 10, 3 * DAY)
    _make(tmp_path, _capture("b"), 10, 2 * DAY)
    real_unlink = os.unlink

    def unlink(path: str) -> None:
        if path.endswith(_capture("a")):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink)
    deleted, errors = prune(str(tmp_path), time.time(), None, DAY)
    assert [f.name for f in deleted] == [_capture("b")]
    assert errors == [f"{_capture('a')}: Permission denied"]


def test_the_notice_counts_files_and_bytes() -> None:
    assert render_prune_notice("/c", []) is None
    one = render_prune_notice("/c", [FileInfo("a.pcapng", 100, 0)])
    assert one == (
        "capture: pruned 1 finished file (100 bytes) from /c (capture_max_total / capture_max_age)"
    )
    two = render_prune_notice("/c", [FileInfo("a", 3 << 20, 0), FileInfo("b", 1 << 19, 0)])
    assert two is not None and two.startswith("capture: pruned 2 finished files (3.5 MiB)")


def _capture_config(directory: Path, **limits: object) -> ProxyConfig:
    return ProxyConfig(capture_dir=str(directory), **limits)  # type: ignore[arg-type]


def test_the_pruner_runs_on_its_schedule_and_only_with_a_limit(tmp_path: Path) -> None:
    pruner = CapturePruner(interval_s=5.0)
    assert not pruner.due(100.0, ProxyConfig())
    assert not pruner.due(100.0, _capture_config(tmp_path))  # a directory but no limit
    config = _capture_config(tmp_path, capture_max_age_s=DAY)
    assert pruner.due(100.0, config)
    assert not pruner.due(104.9, config)
    assert pruner.due(105.0, config)


def test_the_pruner_says_what_it_deleted_and_a_lasting_failure_once(tmp_path: Path) -> None:
    _make(tmp_path, _capture("a"), 2048, 3 * DAY)
    pruner = CapturePruner()
    config = _capture_config(tmp_path, capture_max_age_s=DAY)
    assert pruner.run(config) == [
        f"capture: pruned 1 finished file (2.0 KiB) from {tmp_path} "
        "(capture_max_total / capture_max_age)"
    ]
    assert pruner.run(config) == []
    gone = _capture_config(tmp_path / "gone", capture_max_age_s=DAY)
    expected = [f"capture: cannot prune {tmp_path / 'gone'}: No such file or directory"]
    assert pruner.run(gone) == expected
    assert pruner.run(gone) == []  # the same failure: said once
    assert pruner.run(config) == []  # recovered
    assert pruner.run(gone) == expected  # failing again: said again


def test_a_single_process_prunes_in_its_sweep_and_logs_a_notice(tmp_path: Path) -> None:
    captures = tmp_path / "captures"
    captures.mkdir()
    _make(captures, _capture("old"), 4096, 3 * DAY)
    _make(captures, _capture("new"), 4096, 60)
    stream = io.StringIO()
    config = _capture_config(captures, capture_max_age_s=DAY)
    server = ProxyServer(config, EventLog(LogFormat.JSON, stream), listeners=[])
    server.prepare()

    async def sweep() -> None:
        server.sweep_once(1000.0)
        server.sweep_once(1000.5)  # not due again yet
        async with asyncio.timeout(10):
            while server._tasks:
                await asyncio.sleep(0.01)

    try:
        asyncio.run(sweep())
    finally:
        server.release()
    server._log.flush()
    messages = [json.loads(line)["message"] for line in stream.getvalue().splitlines()]
    assert messages == [
        f"capture: pruned 1 finished file (4.0 KiB) from {captures} "
        "(capture_max_total / capture_max_age)"
    ]
    assert _names(captures) == [_capture("new")]


# --- start-up checks -------------------------------------------------------------------------


def _capturing_policy() -> Matcher:
    return Matcher(Policy(rules=(Rule("plain", Action.ALLOW), Rule("tap", Action.ALLOW,
                                                                    capture=True))))  # fmt: skip


def test_a_capturing_rule_without_a_directory_is_one_sentence() -> None:
    with pytest.raises(ConfigError) as raised:
        check_capture_config(ProxyConfig(matcher=_capturing_policy()))
    assert str(raised.value) == (
        "policy rule 'tap' has capture = true, but no --capture-dir (capture_dir) says where "
        "captures go"
    )
    check_capture_config(ProxyConfig(matcher=Matcher(Policy(rules=(Rule("x", Action.ALLOW),)))))
    check_capture_config(ProxyConfig())


def test_the_directory_must_exist_be_one_and_be_writable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    check_capture_dir(str(tmp_path))
    assert _names(tmp_path) == []  # the write check leaves nothing behind
    missing = tmp_path / "missing"
    with pytest.raises(ConfigError) as raised:
        check_capture_dir(str(missing))
    assert str(raised.value) == (
        f"capture directory {missing} does not exist: create it, e.g. install -d -m 0700 {missing}"
    )
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory: create it"):
        check_capture_dir(str(tmp_path / "file"))

    def read_only(**_kwargs: object) -> tuple[int, str]:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with pytest.raises(ConfigError) as raised:
        check_capture_dir(str(tmp_path))
    assert str(raised.value) == (
        f"capture directory {tmp_path} is not writable: Read-only file system"
    )


def test_check_capture_checks_the_directory_only_when_there_is_one(tmp_path: Path) -> None:
    check_capture(ProxyConfig())
    check_capture(ProxyConfig(capture_dir=str(tmp_path), matcher=_capturing_policy()))
    with pytest.raises(ConfigError, match="does not exist"):
        check_capture(ProxyConfig(capture_dir=str(tmp_path / "nope")))


def test_tproxy_run_refuses_a_missing_capture_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope"
    assert main(["run", "--capture-dir", str(missing)]) == 1
    assert capsys.readouterr().err == (
        f"tproxy: error: capture directory {missing} does not exist: create it, e.g. "
        f"install -d -m 0700 {missing}\n"
    )


def test_tproxy_run_refuses_capture_all_without_a_directory(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--capture-all"]) == 1
    assert capsys.readouterr().err == (
        "tproxy: error: --capture-all (capture_all) needs --capture-dir (capture_dir)\n"
    )


def test_tproxy_run_refuses_a_capturing_policy_without_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[rule]]\nname = "tap"\naction = "allow"\ncapture = true\n')
    assert main(["run", "--policy", str(policy)]) == 1
    assert "policy rule 'tap' has capture = true, but no --capture-dir" in capsys.readouterr().err


def test_the_supervisor_ticks_every_round_until_stopping(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor_module, "_reap", list)  # no children to reap here
    monkeypatch.setattr(supervisor_module, "TICK_S", 0.0)
    ticks: list[float] = []
    supervisor = Supervisor(1, lambda _id, _channel: 0, EventLog(LogFormat.JSON, io.StringIO()),
                            on_tick=ticks.append)  # fmt: skip
    try:
        supervisor._step()
        supervisor._step()
        supervisor._stopping = True
        supervisor._step()
    finally:
        supervisor._selector.close()
    assert len(ticks) == 2 and ticks[0] <= ticks[1] <= time.monotonic()
