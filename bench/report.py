"""Pure: per-round ratios, their spread, each target's verdict, and RESULTS.md's tables (no I/O).

Theory of operation. Other people's work shares this machine's cores, and its load drifts over
minutes, so a ratio of two medians taken over a whole run can pair a quiet minute of one mode with
a busy minute of the other. Instead every round measures each mode once, back to back (in an
order that rotates from round to round, so no mode always runs first or right after the same
neighbour), and a ratio is computed *within* a round, from measurements a minute or two apart.
The spread of those per-round ratios (min-max) is how far noise alone moved the answer in this
run. A target is **met** only when every round's ratio clears it, **missed** only when every
round's ratio falls short of it, and **inconclusive** otherwise: a median that happens to land on
one side of a bound is not evidence.

"Unchanged" (issue 10: the policy leaves a long stream's throughput as it was) has no bound of
its own; it is judged against this run's noise, twice. Direction: were nothing changed, each
round's ratio would be as likely above 1.0 as below it, so six rounds all on one side happen by
chance 1 time in 32. Size: the median ratio against the reference mode's own round-to-round spread
(its min and max over its median): a change smaller than the reference moves by itself between
rounds is within the spread. Met when the rounds fall on both sides of 1.0 and the median lies
within that spread, missed when all rounds fall on one side and the median outside it,
inconclusive otherwise.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

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
    "cpu_per_conn": ("proxy CPU per connection (HTTP, Connection: close)", "µs", False),
    "idle_rss": ("user-space RSS per idle session", "KiB", False),
    "tls_conn_rate": ("new HTTPS connections/s (Connection: close)", "conn/s", True),
    "tls_cpu_per_conn": ("proxy CPU per HTTPS connection (Connection: close)", "µs", False),
    "tls_keepalive_rps": ("HTTPS requests/s on 32 keep-alive connections", "req/s", True),
    "tls_cpu_per_request": ("proxy CPU per HTTPS request (keep-alive)", "µs", False),
    "tls_rss": ("proxy RSS after the HTTPS tests (all its processes)", "MiB", False),
}

# mode -> what it is; the order is the columns' order and the first round's order.
MODES: dict[str, str] = {
    "routing": "plain routing, no proxy (the limit)",
    "haproxy": "HAProxy, forced splice, `option tcplog` to a file",
    "haproxy-auto": "HAProxy, `splice-auto`, `option tcplog` to a file",
    "haproxy-nolog": "HAProxy, forced splice, no log",
    "haproxy-auto-nolog": "HAProxy, `splice-auto`, no log",
    "tproxy-splice": "tproxy, splice relay, JSON session log to a file",
    "tproxy-policy": "tproxy-splice with `--policy`: 50 rules, the last 5 on names (every "
    "connection sniffed)",
    "tproxy-capture": "tproxy-splice with `--capture-all`: every session captured to pcapng "
    "(relayed through Python)",
    "tproxy-policy-capture": "tproxy-policy with `--capture-dir` and `capture = true` on its "
    "redirect rules (no connection captured)",
    "tproxy-addon": "tproxy-splice with `--addon` of an addon that claims nothing "
    "(`session_start` returns None, `session_end` does nothing)",
    "tproxy-addon-identity": "tproxy-splice with `--addon` of an identity addon: every session "
    "claimed, `client_data` and `server_data` return each chunk unchanged",
    "tproxy-splice-nolog": "tproxy, splice relay, session log to /dev/null",
    "tproxy-copy": "tproxy, copy relay, JSON session log to a file",
    "tproxy-intercept": 'tproxy-splice with `--policy`: `tls = "intercept"` for '
    "`*.bench.test`, `--ca` and `--upstream-ca` (HTTPS decrypted and re-encrypted)",
    "tproxy-tls-passthrough": 'tproxy-splice with `--policy`: `tls = "passthrough"` for '
    "`*.bench.test` (the same HTTPS sniffed and relayed encrypted)",
    "mitmproxy": "mitmproxy's mitmdump in transparent mode (REDIRECT rules), the same CA and "
    "upstream CA, `-q` (no log)",
}

Samples = Mapping[str, Mapping[str, Sequence[float]]]  # mode -> metric -> one sample per round


def rotated(modes: Sequence[str], round_no: int) -> list[str]:
    """The order of round `round_no` (1-based): the first round's order, rotated by one each
    round, so every mode is first in turn and each pair of modes swaps order over the rounds."""
    if not modes:
        return []
    shift = (round_no - 1) % len(modes)
    return [*modes[shift:], *modes[:shift]]


class Kind(enum.Enum):
    RATIO = "ratio"  # subject / versus, per round
    DIFFERENCE = "difference"  # subject - versus, per round (in the metric's unit)
    VALUE = "value"  # the subject's own value, per round
    UNCHANGED = "unchanged"  # subject / versus, per round, judged against versus's own spread


class Verdict(enum.Enum):
    MET = "met"
    MISSED = "MISSED"
    INCONCLUSIVE = "inconclusive"
    NO_DATA = "no data"


@dataclass(frozen=True)
class Comparison:
    """One row of the comparisons: a target when `bound` is set, information otherwise.

    The direction comes from the metric: for a metric where higher is better the per-round
    figure must be at least `bound`, otherwise at most `bound`."""

    metric: str
    subject: str
    versus: str | None
    kind: Kind = Kind.RATIO
    bound: float | None = None

    def higher_is_better(self) -> bool:
        return METRICS[self.metric][2]

    def describe(self) -> str:
        title = METRICS[self.metric][0]
        if self.kind in (Kind.RATIO, Kind.UNCHANGED):
            return f"{title}: {self.subject} / {self.versus}"
        if self.kind is Kind.DIFFERENCE:
            return f"{title}: {self.subject} minus {self.versus}"
        return f"{title}: {self.subject}"

    def describe_bound(self) -> str:
        if self.kind is Kind.UNCHANGED:
            return f"unchanged: rounds on both sides of 1, median within {self.versus}'s spread"
        if self.bound is None:
            return "—"
        op = "≥" if self.higher_is_better() else "≤"
        if self.kind is Kind.RATIO:
            return f"{op} {self.bound:g}×"
        return f"{op} {self.bound:g} {METRICS[self.metric][1]}"


# The targets of issue 4, for the splice relay. The connection rate is where logging and
# splice-auto matter, so it is held against every HAProxy variant with the same logging.
TARGETS = [
    Comparison("stream1_up", "tproxy-splice", "routing", bound=0.8),
    Comparison("stream1_down", "tproxy-splice", "routing", bound=0.8),
    Comparison("stream1_up", "tproxy-splice", "haproxy", bound=1.05),
    Comparison("stream1_down", "tproxy-splice", "haproxy", bound=1.05),
    Comparison("conn_rate", "tproxy-splice", "haproxy", bound=1.0),
    Comparison("conn_rate", "tproxy-splice", "haproxy-auto", bound=1.0),
    Comparison("conn_rate", "tproxy-splice-nolog", "haproxy-nolog", bound=1.0),
    Comparison("conn_rate", "tproxy-splice-nolog", "haproxy-auto-nolog", bound=1.0),
    Comparison("cpu_per_gib", "tproxy-splice", "haproxy", bound=1.0),
    Comparison("idle_rss", "tproxy-splice", None, Kind.VALUE, bound=2.0),
    Comparison("latency_p50", "tproxy-splice", "haproxy", Kind.DIFFERENCE, bound=10.0),
    Comparison("latency_p50", "tproxy-splice", "haproxy-auto", Kind.DIFFERENCE, bound=10.0),
]

# The benchmark targets of issue 10: what a 50-rule policy that sniffs every connection costs.
# CPU per connection is steadier here than the connection rate (other work on the machine moves
# the rate of both modes; the proxy's own CPU per connection much less).
POLICY_TARGETS = [
    Comparison("cpu_per_conn", "tproxy-policy", "tproxy-splice", Kind.DIFFERENCE, bound=10.0),
    Comparison("stream1_up", "tproxy-policy", "tproxy-splice", Kind.UNCHANGED),
    Comparison("stream1_down", "tproxy-policy", "tproxy-splice", Kind.UNCHANGED),
]

# The benchmark target of issue 11: capture configured but matching nothing costs (next to) nothing.
CAPTURE_TARGETS = [
    Comparison(
        "cpu_per_conn", "tproxy-policy-capture", "tproxy-policy", Kind.DIFFERENCE, bound=5.0
    ),
]

# Issue 11's rows without a target: what capturing a session costs against the copy relay.
CAPTURE_CONTEXT = [
    Comparison("stream1_up", "tproxy-capture", "tproxy-copy"),
    Comparison("stream1_down", "tproxy-capture", "tproxy-copy"),
    Comparison("cpu_per_gib", "tproxy-capture", "tproxy-copy"),
    Comparison("cpu_per_gib", "tproxy-capture", "tproxy-copy", Kind.DIFFERENCE),
    Comparison("conn_rate", "tproxy-policy-capture", "tproxy-policy"),
]

# The benchmark target of issue 12: an addon that claims nothing costs (next to) nothing.
ADDON_TARGETS = [
    Comparison("cpu_per_conn", "tproxy-addon", "tproxy-splice", Kind.DIFFERENCE, bound=5.0),
]

# Issue 12's rows without a target: the unclaimed sessions' long stream still splices (against
# tproxy-splice), and what claiming a session with an identity addon costs against the copy
# relay (its throughput each way and CPU per GiB).
ADDON_CONTEXT = [
    Comparison("conn_rate", "tproxy-addon", "tproxy-splice"),
    Comparison("stream1_up", "tproxy-addon", "tproxy-splice"),
    Comparison("stream1_down", "tproxy-addon", "tproxy-splice"),
    Comparison("cpu_per_gib", "tproxy-addon", "tproxy-splice"),
    Comparison("stream1_up", "tproxy-addon-identity", "tproxy-copy"),
    Comparison("stream1_down", "tproxy-addon-identity", "tproxy-copy"),
    Comparison("cpu_per_gib", "tproxy-addon-identity", "tproxy-copy"),
    Comparison("cpu_per_gib", "tproxy-addon-identity", "tproxy-copy", Kind.DIFFERENCE),
]

# The benchmark targets of issue 13: intercepting HTTPS at ten times mitmproxy's rates.
INTERCEPT_TARGETS = [
    Comparison("tls_conn_rate", "tproxy-intercept", "mitmproxy", bound=10.0),
    Comparison("tls_keepalive_rps", "tproxy-intercept", "mitmproxy", bound=10.0),
]

# Issue 13's rows without a target: the two proxies' CPU per intercepted connection and per
# request and their memory, and what interception adds to the same HTTPS relayed encrypted under
# the same rule (per connection: the two handshakes, a forged leaf from the cache, the TLS relay
# of one request; per keep-alive request: decrypting and re-encrypting it and its response).
INTERCEPT_CONTEXT = [
    Comparison("tls_cpu_per_conn", "tproxy-intercept", "mitmproxy"),
    Comparison("tls_cpu_per_request", "tproxy-intercept", "mitmproxy"),
    Comparison("tls_rss", "tproxy-intercept", "mitmproxy"),
    Comparison("tls_cpu_per_conn", "tproxy-intercept", "tproxy-tls-passthrough", Kind.DIFFERENCE),
    Comparison(
        "tls_cpu_per_request", "tproxy-intercept", "tproxy-tls-passthrough", Kind.DIFFERENCE
    ),
    Comparison("tls_conn_rate", "tproxy-intercept", "tproxy-tls-passthrough"),
    Comparison("tls_keepalive_rps", "tproxy-intercept", "tproxy-tls-passthrough"),
]

# Context without a target: what logging and splice-auto cost each proxy, and the rest.
CONTEXT = [
    Comparison("conn_rate", "haproxy-nolog", "haproxy"),
    Comparison("conn_rate", "tproxy-splice-nolog", "tproxy-splice"),
    Comparison("conn_rate", "haproxy-auto", "haproxy"),
    Comparison("conn_rate", "tproxy-splice", "routing"),
    Comparison("conn_rate", "tproxy-copy", "haproxy"),
    Comparison("latency_p50", "haproxy-auto", "haproxy", Kind.DIFFERENCE),
    Comparison("latency_p99", "tproxy-splice", "haproxy", Kind.DIFFERENCE),
    Comparison("stream4_up", "tproxy-splice", "haproxy"),
    Comparison("stream4_down", "tproxy-splice", "haproxy"),
    Comparison("stream1_up", "tproxy-copy", "haproxy"),
    Comparison("stream1_down", "tproxy-copy", "haproxy"),
    Comparison("cpu_per_gib", "tproxy-copy", "haproxy"),
    Comparison("idle_rss", "tproxy-splice", "haproxy"),
    Comparison("conn_rate", "tproxy-policy", "tproxy-splice"),
    Comparison("cpu_per_conn", "tproxy-splice", "haproxy", Kind.DIFFERENCE),
    Comparison("cpu_per_conn", "tproxy-splice-nolog", "haproxy-nolog", Kind.DIFFERENCE),
    Comparison("cpu_per_gib", "tproxy-policy", "tproxy-splice"),
]


def per_round(samples: Samples, comparison: Comparison) -> list[float]:
    """The comparison's figure in each round, from that round's own measurements.

    Rounds where the ratio is undefined (a zero denominator) are left out; if the two modes do
    not have one sample per round each, nothing is paired (a shifted pairing would be wrong)."""
    subject = samples.get(comparison.subject, {}).get(comparison.metric, [])
    if comparison.kind is Kind.VALUE:
        return list(subject)
    assert comparison.versus is not None
    versus = samples.get(comparison.versus, {}).get(comparison.metric, [])
    if len(subject) != len(versus):
        return []
    if comparison.kind is Kind.DIFFERENCE:
        return [s - v for s, v in zip(subject, versus, strict=True)]
    # RATIO and UNCHANGED
    return [s / v for s, v in zip(subject, versus, strict=True) if v != 0]


@dataclass(frozen=True)
class Spread:
    median: float
    low: float
    high: float


def spread(values: Sequence[float]) -> Spread | None:
    if not values:
        return None
    return Spread(statistics.median(values), min(values), max(values))


def verdict(values: Sequence[float], bound: float, higher_is_better: bool) -> Verdict:
    """Met when the whole spread clears the bound, missed when all of it falls short. One round
    has no spread: it shows nothing about noise, so it decides nothing either."""
    found = spread(values)
    if found is None:
        return Verdict.NO_DATA
    if len(values) < 2:
        return Verdict.INCONCLUSIVE
    if higher_is_better:
        if found.low >= bound:
            return Verdict.MET
        if found.high < bound:
            return Verdict.MISSED
    else:
        if found.high <= bound:
            return Verdict.MET
        if found.low > bound:
            return Verdict.MISSED
    return Verdict.INCONCLUSIVE


def own_spread(samples: Samples, comparison: Comparison) -> Spread | None:
    """The reference (`versus`) mode's own spread over the rounds, as its min and max over its
    median: how far it moved between rounds by itself (None without two rounds or a median)."""
    if comparison.versus is None:
        return None
    values = samples.get(comparison.versus, {}).get(comparison.metric, [])
    found = spread(values)
    if found is None or len(values) < 2 or found.median == 0:
        return None
    return Spread(1.0, found.low / found.median, found.high / found.median)


def unchanged_verdict(ratios: Sequence[float], band: Spread | None) -> Verdict:
    """Whether per-round ratios show no change beyond the noise (see the module doc): met when
    they fall on both sides of 1.0 and their median within `band`, missed when they all fall on
    one side and their median outside it, inconclusive otherwise (and with one round)."""
    found = spread(ratios)
    if found is None or band is None:
        return Verdict.NO_DATA
    if len(ratios) < 2:
        return Verdict.INCONCLUSIVE
    both_sides = found.low <= 1.0 <= found.high
    within = band.low <= found.median <= band.high
    if both_sides and within:
        return Verdict.MET
    if not both_sides and not within:
        return Verdict.MISSED
    return Verdict.INCONCLUSIVE


def judge(samples: Samples, comparison: Comparison) -> Verdict | None:
    """The verdict on a target; None for a comparison without one."""
    if comparison.kind is Kind.UNCHANGED:
        return unchanged_verdict(per_round(samples, comparison), own_spread(samples, comparison))
    if comparison.bound is None:
        return None
    values = per_round(samples, comparison)
    return verdict(values, comparison.bound, comparison.higher_is_better())


def _digits(metric: str, kind: Kind) -> int:
    if kind in (Kind.RATIO, Kind.UNCHANGED):
        # Three digits: at two, 1.049 would print as 1.05 beside "MISSED: ≥ 1.05".
        return 3
    if metric == "cpu_per_conn":  # a few µs, against a 10 µs bound
        return 1
    return 0 if METRICS[metric][1] in ("conn/s", "req/s", "µs") else 2


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def render_spread(values: Sequence[float], digits: int) -> str:
    """`median (min-max)`, or `n/a` without values."""
    found = spread(values)
    if found is None:
        return "n/a"
    if len(values) == 1:
        return f"{_fmt(found.median, digits)} (1 round)"
    low, high = _fmt(found.low, digits), _fmt(found.high, digits)
    return f"{_fmt(found.median, digits)} ({low} to {high})"


def render_modes(samples: Samples) -> list[str]:
    """Markdown: each metric's median (min-max over rounds) in each mode that measured it."""
    modes = [m for m in MODES if m in samples] + [m for m in samples if m not in MODES]
    lines = [
        "| metric | " + " | ".join(modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for metric, (title, unit, _) in METRICS.items():
        cells = []
        for mode in modes:
            values = samples[mode].get(metric, [])
            cells.append(render_spread(values, _digits(metric, Kind.VALUE)) if values else "—")
        if all(cell == "—" for cell in cells):
            continue
        lines.append(f"| {title} ({unit}) | " + " | ".join(cells) + " |")
    return lines


def render_comparisons(samples: Samples, comparisons: Sequence[Comparison]) -> list[str]:
    """Markdown: per comparison, each round's figure, the median and spread, and the verdict."""
    lines = [
        "| comparison | per round | median (min-max) | target | verdict |",
        "|---|---|---|---|---|",
    ]
    for comparison in comparisons:
        values = per_round(samples, comparison)
        digits = _digits(comparison.metric, comparison.kind)
        rounds = ", ".join(_fmt(v, digits) for v in values) or "n/a"
        found = judge(samples, comparison)
        shown = "—" if found is None else f"**{found.value}**"
        bound = comparison.describe_bound()
        band = own_spread(samples, comparison)
        if comparison.kind is Kind.UNCHANGED and band is not None:
            bound += f" ({_fmt(band.low, digits)} to {_fmt(band.high, digits)})"
        lines.append(
            f"| {comparison.describe()} | {rounds} | {render_spread(values, digits)} | "
            f"{bound} | {shown} |"
        )
    return lines


@dataclass
class Relays:
    """One round's close events of one mode, counted by their `relay` ("splice", "copy",
    "addon"; "none": never relayed), and the bytes they moved, `spliced_bytes` of them by
    splice."""

    closes: dict[str, int] = field(default_factory=dict)
    bytes_moved: int = 0
    spliced_bytes: int = 0

    def add(self, close: Mapping[str, Any]) -> None:
        """Count one close event (the session log's `session_close`, parsed)."""
        relay = close.get("relay") or "none"
        self.closes[relay] = self.closes.get(relay, 0) + 1
        self.bytes_moved += close["bytes_up"] + close["bytes_down"]
        self.spliced_bytes += close["spliced_bytes"]

    def describe(self) -> str:
        """`splice 3 (100.0% of 12.40 GiB spliced)`: the close events by relay, and how much
        of what they moved went by splice."""
        closes = ", ".join(f"{relay} {count:,}" for relay, count in sorted(self.closes.items()))
        if not self.bytes_moved:
            return closes or "no close events"
        share = self.spliced_bytes / self.bytes_moved
        return f"{closes} ({share:.1%} of {self.bytes_moved / (1 << 30):.2f} GiB spliced)"


def render_relays(relays: Mapping[str, Sequence[Relays]]) -> list[str]:
    """Markdown: per mode, each round's close events by relay and share of bytes spliced."""
    lines = ["| mode | close events by `relay`, per round (share of the bytes spliced) |",
             "|---|---|"]  # fmt: skip
    for mode, rounds in relays.items():
        lines.append(f"| {mode} | {'; '.join(r.describe() for r in rounds) or 'n/a'} |")
    return lines


def tally(samples: Samples, comparisons: Sequence[Comparison]) -> dict[Verdict, int]:
    """How many targets got each verdict (for the summary line)."""
    counts = dict.fromkeys(Verdict, 0)
    for comparison in comparisons:
        found = judge(samples, comparison)
        if found is not None:
            counts[found] += 1
    return counts
