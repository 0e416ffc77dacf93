"""The per-user pipe budget: the pipe size a proxy run as a user picks, and the doctor's check."""

from __future__ import annotations

import dataclasses

import pytest

from tproxy.core.config import InterceptMode
from tproxy.diagnostics.checks import (
    Expected,
    Facts,
    PipeBudget,
    Status,
    check_pipe_budget,
    pipe_pages_needed,
)
from tproxy.engine.pipes import (
    PIPE_SIZE_BYTES,
    PipePool,
    budgeted_pipe_size,
    pages_for_full_size,
    pipe_size,
    set_pipe_size,
)

PAGE = 4096
KIB = 1024


@pytest.mark.parametrize(
    ("soft", "workers", "limited", "size"),
    [
        (16384, 2, False, PIPE_SIZE_BYTES),  # root (or CAP_SYS_RESOURCE): no budget
        (0, 2, True, PIPE_SIZE_BYTES),  # fs.pipe-user-pages-soft = 0: no limit
        (16384, 1, True, 512 * KIB),  # the default 64 MiB budget, 128 pipes
        (16384, 2, True, 256 * KIB),
        (16384, 8, True, 64 * KIB),
        (65536, 2, True, PIPE_SIZE_BYTES),  # what pages_for_full_size says for 2 workers
        (16, 8, True, 64 * KIB),  # never below the kernel's default pipe
        (20000, 2, True, 256 * KIB),  # a power of two that fits
    ],
)
def test_budgeted_pipe_size(soft: int, workers: int, limited: bool, size: int) -> None:
    assert budgeted_pipe_size(soft, PAGE, workers, limited) == size


def test_pages_for_full_size_gives_full_size() -> None:
    for workers in (1, 2, 4, 16):
        pages = pages_for_full_size(workers, PAGE)
        assert budgeted_pipe_size(pages, PAGE, workers, True) == PIPE_SIZE_BYTES
        assert budgeted_pipe_size(pages - 1, PAGE, workers, True) < PIPE_SIZE_BYTES


def test_a_pool_makes_pipes_of_the_size_set() -> None:
    try:
        set_pipe_size(128 * KIB)
        pool = PipePool()
        pipe = pool.take()
        try:
            assert pool.pipe_size_bytes == 128 * KIB
            assert pipe.size_bytes == 128 * KIB
        finally:
            pipe.close()
    finally:
        set_pipe_size(PIPE_SIZE_BYTES)
    assert pipe_size() == PIPE_SIZE_BYTES


ROUTER = Expected(InterceptMode.TPROXY, proxy_port=1800, divert_mark=1, route_table=100,
                  max_connections=5000)  # fmt: skip
FACTS = Facts(
    net_admin=True, nft=True, expressions={}, ip_transparent_error=None, sysctls={},
    interfaces={}, ipv6=True, ip_rules={}, routes={}, table=None, bridge_table=None,
    bridge=None, listening=frozenset(),
)  # fmt: skip


def _check(soft: int | None, hard: int | None, max_connections: int | None = 5000) -> Status:
    facts = dataclasses.replace(FACTS, pipe_budget=PipeBudget(soft, hard, PAGE))
    expected = dataclasses.replace(ROUTER, max_connections=max_connections)
    return check_pipe_budget(facts, expected).status


def test_enough_pages_for_every_session_is_ok() -> None:
    assert pipe_pages_needed(5000) == 160000
    assert _check(160000, 0) is Status.OK
    assert _check(0, 0) is Status.OK  # no limit


def test_the_default_budget_is_too_small_for_5000_sessions() -> None:
    facts = dataclasses.replace(FACTS, pipe_budget=PipeBudget(16384, 0, PAGE))
    finding = check_pipe_budget(facts, ROUTER)
    assert finding.status is Status.WARN
    assert "16384 pages (64 MiB)" in finding.detail and "160000 pages" in finding.detail
    assert "8 KiB" in finding.detail and "root is exempt" in finding.detail
    assert finding.fix.startswith("sysctl -w fs.pipe-user-pages-soft=160000 ")


def test_a_hard_limit_below_the_need_is_named_in_the_fix() -> None:
    facts = dataclasses.replace(FACTS, pipe_budget=PipeBudget(200000, 1000, PAGE))
    finding = check_pipe_budget(facts, ROUTER)
    assert finding.status is Status.WARN
    assert "no pipe at all" in finding.detail
    assert "fs.pipe-user-pages-hard=160000" in finding.fix


def test_unknown_budget_is_skipped() -> None:
    assert _check(None, None) is Status.SKIP


def test_without_max_connections_it_says_what_the_budget_covers() -> None:
    facts = dataclasses.replace(FACTS, pipe_budget=PipeBudget(16384, 0, PAGE))
    finding = check_pipe_budget(facts, dataclasses.replace(ROUTER, max_connections=None))
    assert finding.status is Status.OK
    assert "up to 512 sessions splice both ways" in finding.detail
    facts = dataclasses.replace(FACTS, pipe_budget=PipeBudget(16384, 3200, PAGE))
    finding = check_pipe_budget(facts, dataclasses.replace(ROUTER, max_connections=None))
    assert "up to 100 sessions" in finding.detail
