"""Pure: medians, ratios and the RESULTS.md table from the raw samples (no I/O)."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# metric -> (title, unit, higher is better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "stream1_up": ("1 stream up (client → server)", "Gbit/s", True),
    "stream1_down": ("1 stream down (server → client)", "Gbit/s", True),
    "stream4_up": ("4 streams up", "Gbit/s", True),
    "stream4_down": ("4 streams down", "Gbit/s", True),
    "conn_rate": ("new connections/s (HTTP, Connection: close)", "conn/s", True),
    "latency_p50": ("request latency p50 (keep-alive)", "µs", False),
    "latency_p99": ("request latency p99 (keep-alive)", "µs", False),
    "cpu_per_gib": ("proxy CPU per GiB relayed", "CPU s/GiB", False),
    "idle_rss": ("user-space RSS per idle session", "KiB", False),
}

MODES = {
    "routing": "plain routing (no proxy)",
    "haproxy": "HAProxy 2.6, transparent, splice",
    "tproxy-splice": "tproxy, splice relay",
    "tproxy-copy": "tproxy, copy relay",
}

Samples = Mapping[str, Mapping[str, Sequence[float]]]  # mode -> metric -> samples


@dataclass(frozen=True)
class Target:
    metric: str
    versus: str  # "routing" or "haproxy"
    ratio: float  # at least (higher is better) or at most (lower is better)
    text: str


TARGETS = [
    Target("stream1_up", "routing", 0.8, "1 stream up ≥ 0.8× routing"),
    Target("stream1_down", "routing", 0.8, "1 stream down ≥ 0.8× routing"),
    Target("stream1_up", "haproxy", 1.05, "1 stream up ≥ 1.05× HAProxy"),
    Target("stream1_down", "haproxy", 1.05, "1 stream down ≥ 1.05× HAProxy"),
    Target("conn_rate", "haproxy", 1.0, "new connections/s ≥ 1.0× HAProxy"),
    Target("cpu_per_gib", "haproxy", 1.0, "CPU per GiB ≤ HAProxy's"),
]
IDLE_RSS_TARGET_KIB = 2.0
LATENCY_TARGET_US = 10.0


def median(samples: Sequence[float]) -> float | None:
    return statistics.median(samples) if samples else None


def medians(samples: Samples) -> dict[str, dict[str, float | None]]:
    return {mode: {m: median(v) for m, v in metrics.items()} for mode, metrics in samples.items()}


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def render_table(samples: Samples, subject: str = "tproxy-splice") -> list[str]:
    """Markdown: each metric's median per mode, and the subject's ratios to routing and HAProxy."""
    med = medians(samples)
    modes = [m for m in MODES if m in med]
    head = ["metric", *(MODES[m] for m in modes), f"{subject} / routing", f"{subject} / HAProxy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, (title, unit, _) in METRICS.items():
        values = [med[m].get(metric) for m in modes]
        if all(v is None for v in values):
            continue
        subj = med.get(subject, {}).get(metric)
        row = [f"{title} ({unit})", *(_fmt(v) for v in values),
               _fmt(ratio(subj, med.get("routing", {}).get(metric))),
               _fmt(ratio(subj, med.get("haproxy", {}).get(metric)))]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    return lines


def render_targets(samples: Samples, subject: str = "tproxy-splice") -> list[str]:
    """One line per target of issue 4: met or missed, with the measured ratio."""
    med = medians(samples)
    subj = med.get(subject, {})
    lines = []
    for target in TARGETS:
        higher = METRICS[target.metric][2]
        r = ratio(subj.get(target.metric), med.get(target.versus, {}).get(target.metric))
        met = r is not None and (r >= target.ratio if higher else r <= target.ratio)
        # Three digits: at two, 1.049 would print as 1.05 beside "MISSED: ≥ 1.05".
        lines.append(f"- {'met' if met else 'MISSED'}: {target.text} (measured {_fmt(r, 3)}×)")
    rss = subj.get("idle_rss")
    met = rss is not None and rss <= IDLE_RSS_TARGET_KIB
    lines.append(f"- {'met' if met else 'MISSED'}: user-space RSS per idle session ≤ "
                 f"{IDLE_RSS_TARGET_KIB:g} KiB (measured {_fmt(rss)} KiB)")  # fmt: skip
    p50, hap50 = subj.get("latency_p50"), med.get("haproxy", {}).get("latency_p50")
    added = None if p50 is None or hap50 is None else p50 - hap50
    met = added is not None and added <= LATENCY_TARGET_US
    lines.append(f"- {'met' if met else 'MISSED'}: p50 latency within {LATENCY_TARGET_US:g} µs "
                 f"of HAProxy's (measured {_fmt(added, 1)} µs more)")  # fmt: skip
    return lines
