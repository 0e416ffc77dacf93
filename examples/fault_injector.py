"""Inject faults for testing applications: reset a percentage of new connections, delay the rest.

Run it::

    TPROXY_FAULT_DROP_PERCENT=10 TPROXY_FAULT_DELAY_MS=300 \\
        tproxy run --addon examples/fault_injector.py

For each new session, before anything connects upstream, `session_start` (an `async def`)
draws a number: TPROXY_FAULT_DROP_PERCENT percent of sessions are reset (the client gets a
TCP reset, nothing connects upstream: close reason `policy_reset`, rule
`addon:examples/fault_injector.py`); every other one waits TPROXY_FAULT_DELAY_MS before its
upstream connect, so the client sees that much more latency on its first answer. With only
these two, the addon claims nothing and every byte then relays on the zero-copy path.

TPROXY_FAULT_CHUNK_DELAY_MS makes it claim the sessions it lets through and delay every chunk
of theirs, both ways, by that much (`async def client_data` and `server_data`): a slow, chatty
link. Each wait is an `await`: it holds only its own session's direction, others go on.

Environment:
    TPROXY_FAULT_DROP_PERCENT: the share of new sessions to reset, 0 to 100 (a decimal
        number), default 0.
    TPROXY_FAULT_DELAY_MS: the delay before the upstream connect, 0 to 9000 (an async hook
        may take at most 10 s), default 0.
    TPROXY_FAULT_CHUNK_DELAY_MS: the delay of each chunk, 0 to 9000, default 0 (sessions not
        claimed).
    TPROXY_FAULT_SEED: an integer seed for the draws, for runs that repeat; default: a
        different sequence each run. Each worker process draws its own sequence from the seed,
        so with several workers the same seed gives the same draws per worker, not one shared
        sequence.

Limits: every session on the ports tproxy intercepts is affected (add a policy, or a check of
`session.dst` in `session_start`, to pick some); the connect delay is once per connection, not
per request; a chunk is whatever one read returned (up to 64 KiB), so the chunk delay slows a
bulk transfer to about 64 KiB per delay; a wrong value stops `tproxy run` at start-up with the
variable named.
"""

from __future__ import annotations

import asyncio
import math
import os
import random

from tproxy.addons.api import Session, Verdict, reset


def _number(name: str, default: float, highest: float) -> float:
    text = os.environ.get(name, "").strip()
    try:
        value = float(text) if text else default
    except ValueError:
        raise ValueError(f"{name} must be a number, not {text!r}") from None
    if not (math.isfinite(value) and 0 <= value <= highest):
        raise ValueError(f"{name} must be from 0 to {highest:g}, not {text}")
    return value


def _seed() -> int | None:
    text = os.environ.get("TPROXY_FAULT_SEED", "").strip()
    try:
        return int(text) if text else None
    except ValueError:
        raise ValueError(f"TPROXY_FAULT_SEED must be an integer, not {text!r}") from None


DROP_PERCENT = _number("TPROXY_FAULT_DROP_PERCENT", 0, 100)
DELAY_S = _number("TPROXY_FAULT_DELAY_MS", 0, 9000) / 1000
CHUNK_DELAY_S = _number("TPROXY_FAULT_CHUNK_DELAY_MS", 0, 9000) / 1000
_draws = random.Random(_seed())


async def session_start(session: Session) -> Verdict | None:
    if DROP_PERCENT and _draws.random() * 100 < DROP_PERCENT:
        return reset()
    if CHUNK_DELAY_S:
        session.claim()
    if DELAY_S:
        await asyncio.sleep(DELAY_S)
    return None


async def client_data(session: Session, data: bytes) -> bytes:
    await asyncio.sleep(CHUNK_DELAY_S)
    return data


async def server_data(session: Session, data: bytes) -> bytes:
    await asyncio.sleep(CHUNK_DELAY_S)
    return data
