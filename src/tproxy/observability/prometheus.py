"""The Prometheus metrics: the supervisor's sums (`observability.counters.Totals`) as metric
families, rendered by prometheus_client in whichever format the scraper asks for.

A custom collector, not prometheus_client's own counters: the counting happens in the workers
(plain ints, `observability.counters`), the supervisor only sums and renders. The names, their
labels and what each counts are in README.md ("Metrics"); a test keeps that table and
`METRICS` the same. Labels stay bounded: rule names (the policy's), close reasons, actions,
sniffed protocols, refusal causes, addon and hook names -- never a client's address or a name
it sent.
"""

from __future__ import annotations

import math
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector, CollectorRegistry

from tproxy.observability.counters import CONNECT_BOUNDS_S, Totals

# Every metric the endpoint serves: name as exposed (counters with `_total`), type, labels.
METRICS: Final = (
    ("tproxy_build_info", "info", ("version", "python")),
    ("tproxy_start_time_seconds", "gauge", ()),
    ("tproxy_workers", "gauge", ()),
    ("tproxy_worker_restarts_total", "counter", ()),
    ("tproxy_sessions_opened_total", "counter", ()),
    ("tproxy_sessions_active", "gauge", ()),
    ("tproxy_sessions_closed_total", "counter", ("reason", "action", "rule", "proto")),
    ("tproxy_relayed_bytes_total", "counter", ("direction", "rule")),
    ("tproxy_upstream_connect_seconds", "histogram", ()),
    ("tproxy_connections_refused_total", "counter", ("cause",)),
    ("tproxy_sniffs_total", "counter", ("result",)),
    ("tproxy_captures_total", "counter", ()),
    ("tproxy_capture_failures_total", "counter", ()),
    ("tproxy_addon_errors_total", "counter", ("addon", "hook")),
)


@dataclass(frozen=True)
class Process:
    """What the supervisor knows of itself: its version, start (Unix time), workers running
    and restarted."""

    version: str
    started_at: float
    workers: int
    restarts: int


def families(totals: Totals, process: Process) -> Iterator[Metric]:
    """The metric families for `totals` (README "Metrics" says what each counts)."""
    yield InfoMetricFamily(
        "tproxy_build", "tproxy's version and the Python it runs on",
        value={"version": process.version, "python": platform.python_version()},
    )  # fmt: skip
    yield GaugeMetricFamily(
        "tproxy_start_time_seconds",
        "When the running tproxy started (Unix time): a restart resets the counters",
        process.started_at,
    )
    yield GaugeMetricFamily("tproxy_workers", "Worker processes running", process.workers)
    yield CounterMetricFamily("tproxy_worker_restarts", "Workers restarted after they died",
                              process.restarts)  # fmt: skip
    yield CounterMetricFamily("tproxy_sessions_opened", "Sessions opened (connections accepted "
                              "and not refused at once)", totals.opened)  # fmt: skip
    yield GaugeMetricFamily("tproxy_sessions_active", "Live sessions", totals.active)
    closed = CounterMetricFamily(
        "tproxy_sessions_closed", "Sessions ended, by close reason (docs/events.md), action, the "
        "deciding rule (empty: the default or no policy) and sniffed protocol (empty: none)",
        labels=("reason", "action", "rule", "proto"),
    )  # fmt: skip
    for (reason, action, rule, proto), count in sorted(totals.closed.items(), key=_sort_key):
        closed.add_metric((reason, action, rule or "", proto or ""), count)
    yield closed
    moved = CounterMetricFamily(
        "tproxy_relayed_bytes", "Bytes relayed, by direction (up: client to upstream, down: "
        "upstream to client) and deciding rule; live sessions count as their bytes move",
        labels=("direction", "rule"),
    )  # fmt: skip
    for rule, (up, down) in sorted(totals.rule_bytes.items(), key=lambda item: item[0] or ""):
        moved.add_metric(("up", rule or ""), up)
        moved.add_metric(("down", rule or ""), down)
    yield moved
    connect = HistogramMetricFamily(
        "tproxy_upstream_connect_seconds", "From the upstream connect's start to the upstream "
        "connected (and a via proxy's handshake done)",
    )  # fmt: skip
    buckets, running = [], 0
    for bound, count in zip((*CONNECT_BOUNDS_S, float("inf")), totals.connect_counts,
                            strict=True):  # fmt: skip
        running += count
        buckets.append(("+Inf" if math.isinf(bound) else repr(bound), running))
    connect.add_metric((), buckets, sum_value=totals.connect_sum_s)
    yield connect
    refused = CounterMetricFamily(
        "tproxy_connections_refused", "Connections reset instead of served, by cause "
        "(max_connections, per_client_connections, per_client_rate, loop, out_of_descriptors)",
        labels=("cause",),
    )  # fmt: skip
    for cause, count in sorted(totals.refused.items()):
        refused.add_metric((cause,), count)
    yield refused
    sniffs = CounterMetricFamily(
        "tproxy_sniffs", "Sessions that waited for their first bytes (a rule or an addon needed "
        "them), by what the bytes said (tls, http, ssh, unknown; silent: nothing came in time)",
        labels=("result",),
    )  # fmt: skip
    for result, count in sorted(totals.sniffs.items()):
        sniffs.add_metric((result,), count)
    yield sniffs
    yield CounterMetricFamily("tproxy_captures", "Sessions captured to a pcapng file",
                              totals.captures)  # fmt: skip
    yield CounterMetricFamily("tproxy_capture_failures", "Sessions to be captured whose file "
                              "could not be made or written", totals.capture_failures)  # fmt: skip
    errors = CounterMetricFamily(
        "tproxy_addon_errors", "Addon hooks that raised, returned nonsense or took too long",
        labels=("addon", "hook"),
    )  # fmt: skip
    for (addon, hook), count in sorted(totals.addon_errors.items()):
        errors.add_metric((addon, hook), count)
    yield errors


def _sort_key(item: tuple[tuple[str, str, str | None, str | None], int]) -> tuple[str, ...]:
    return tuple(label or "" for label in item[0])


class _Collector(Collector):
    def __init__(self, totals: Totals, process: Process) -> None:
        self._totals, self._process = totals, process

    def collect(self) -> Iterator[Metric]:
        return families(self._totals, self._process)


def render(totals: Totals, process: Process, accept: str = "") -> tuple[bytes, str]:
    """The exposition of `totals` in the format `accept` (the scraper's Accept header) asks for
    (Prometheus' text format by default, OpenMetrics when asked), and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(totals, process))
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
