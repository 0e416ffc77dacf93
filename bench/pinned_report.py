"""Pure: the pinned A/B's variants and comparisons, the order of its runs, each pair's difference,
the checks that a run measured what it says, the verdicts and RESULTS-pinned.md (no I/O).

Theory of operation. The full benchmark's CPU per connection moves by about ±7 µs from round to
round on a shared 2-core VM, so a bound of 5 or 10 µs on a difference between two modes stays
"inconclusive" there. The pinned A/B takes the noise out where it comes from: the load generator
(wrk) runs on one CPU and the proxies on the other, so the proxy's CPU time is not interleaved
with wrk's on the same core; there is no lab (a network namespace with loopback only: no veth, no
NAT, no nftables); and each comparison is a series of pairs. In a pair both variants' proxies run
side by side and are measured in 1-second slices, A B B A A B B A, so that whatever the machine's
other load does over the pair's few seconds falls on both alike (a steady drift cancels in ABBA),
and the pairs start with A and with B in turn. A pair's figure is the difference B - A of the
proxy's CPU per connection over its slices; the verdict is the full benchmark's rule applied to
the pairs instead of rounds (`bench.report.verdict`): **met** only when every pair clears the
bound, **MISSED** only when every pair falls short, **inconclusive** otherwise.

A pair counts only when both of its runs are valid (`problems`): wrk saw no socket error and no
bad status, completed enough requests, and the proxy's own session log shows it relayed them
(a close event per connection, by splice); a variant that is scraped (`SCRAPED`) was scraped
about once a second while measured, without a failure, and its metrics counted the sessions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.report import Verdict, spread, verdict

# variant -> what it is (each is `tproxy run --workers 1 --relay splice --spoof-source`, JSON
# session log to a file, uvloop, plus what is said here).
VARIANTS: dict[str, str] = {
    "base": "splice relay, no policy, no addon",
    "policy": "base with `--policy`: the 50 rules of `bench/policy.py`, the last 5 on names "
    "(every connection sniffed)",
    "addon-unclaimed": "base with `--addon bench/addons/unclaimed.py` (`session_start` returns "
    "None and claims nothing, `session_end` does nothing)",
    "capture-configured": "policy with `--capture-dir` and `capture = true` on its redirect "
    "rules (no connection captured)",
    "metrics": "base with `--metrics-listen` (a supervisor and its one worker, which counts "
    "each session and sends the counts in its heartbeat every second), `GET /metrics` once a "
    "second from wrk's CPU as Prometheus would (`bench/pinned_scrape.py`); its CPU is the "
    "supervisor's and the worker's",
    "base-again": "base, a second time (the A/A check: its difference from base is noise alone)",
}
# The variants whose metrics endpoint is scraped while they run.
SCRAPED: frozenset[str] = frozenset({"metrics"})


@dataclass(frozen=True)
class PinnedComparison:
    """One target: variant `b` costs at most `bound_us` of proxy CPU per connection more than
    variant `a` (no target without a bound: the A/A check)."""

    name: str  # what `--comparisons` calls it
    issue: int | None
    a: str
    b: str
    bound_us: float | None

    def describe(self) -> str:
        why = "A/A: the noise" if self.issue is None else f"issue {self.issue}"
        return f"proxy CPU per connection: {self.b} minus {self.a} ({why})"


COMPARISONS: tuple[PinnedComparison, ...] = (
    PinnedComparison("addon", 12, "base", "addon-unclaimed", 5.0),
    PinnedComparison("policy", 10, "base", "policy", 10.0),
    PinnedComparison("capture", 11, "policy", "capture-configured", 5.0),
    PinnedComparison("metrics", 15, "base", "metrics", 3.0),
    PinnedComparison("noise", None, "base", "base-again", None),
)
BY_NAME = {c.name: c for c in COMPARISONS}
# What the full benchmark (`python -m bench`) runs after its rounds.
IN_FULL_BENCHMARK: tuple[str, ...] = ("addon", "policy", "metrics", "noise")


def pair_order(a: str, b: str, pairs: int) -> list[tuple[str, str]]:
    """Which variant of each pair runs first: A B, B A, A B, ... (the first alternates)."""
    return [(a, b) if i % 2 == 0 else (b, a) for i in range(pairs)]


def slice_order(first: str, second: str, slices: int) -> list[str]:
    """The 1-second runs of one pair, `slices` of each variant: first second second first,
    first second second first, ... (ABBA: a steady drift within the pair falls on both alike)."""
    order: list[str] = []
    for i in range(slices):
        order += [first, second] if i % 2 == 0 else [second, first]
    return order


@dataclass
class Run:
    """One measurement of one variant: wrk's figures and the proxy's, and what its log says."""

    comparison: str
    pair: int  # 1-based
    variant: str
    load: float  # the 1-minute load average when it started
    requests: int  # completed by wrk in the measured run (one connection each)
    rate: float  # wrk's requests/s
    cpu_s: float  # the proxy's user + system CPU during the measured run
    socket_errors: int = 0  # wrk's connect, read, write and timeout errors
    bad_status: int = 0  # wrk's non-2xx/3xx responses
    warmup_requests: int = 0  # completed in the warm-up run before it (not measured)
    closes: dict[str, int] = field(default_factory=dict)  # the log's close events by relay
    wrk_runs: int = 2  # the wrk runs it took (warm-up included) against this proxy
    # Scraped variants (`SCRAPED`) only: the scrapes done while it was measured, those that
    # failed while it ran, and the closed sessions its metrics counted at the last scrape.
    scrapes: int = 0
    scrape_errors: int = 0
    scraped_closes: int = 0

    @property
    def cpu_per_conn_us(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Run:
        return cls(**data)


def problems(run: Run, *, min_requests: int, connections: int, seconds: float) -> list[str]:
    """Why `run`, measured for `seconds`, does not count (nothing when it does).

    Every completed request was a connection that the proxy must have logged as closed, relayed
    by splice. Besides those, each wrk run (warm-up included) opens one connection to check the
    address before it starts, and leaves up to `connections` cut at its end (closed by the proxy
    as a reset, or before it relayed: relay null), and no more. A scraped variant was scraped
    once a second while measured (a second's slack), every scrape answered, and its last one
    counted closed sessions, no more than its log has."""
    found = []
    extra = run.wrk_runs * (connections + 1)
    if run.socket_errors:
        found.append(f"wrk: {run.socket_errors} socket errors")
    if run.bad_status:
        found.append(f"wrk: {run.bad_status} non-2xx/3xx responses")
    if run.requests < min_requests:
        found.append(f"{run.requests} requests, fewer than {min_requests}")
    completed = run.requests + run.warmup_requests
    spliced = run.closes.get("splice", 0)
    others = sum(n for relay, n in run.closes.items() if relay != "splice")
    if spliced < completed:
        found.append(f"{spliced} close events relayed by splice for {completed} requests")
    if others > extra:
        found.append(f"{others} close events not relayed by splice")
    if spliced + others > completed + extra:
        found.append(f"{spliced + others} close events for {completed} requests")
    if run.variant in SCRAPED:
        if run.scrapes < seconds - 1:
            found.append(f"{run.scrapes} scrapes in {seconds:g} s measured")
        if run.scrape_errors:
            found.append(f"{run.scrape_errors} scrapes failed")
        if not 0 < run.scraped_closes <= spliced + others:
            found.append(f"the metrics counted {run.scraped_closes} closed sessions, the log "
                         f"{spliced + others}")  # fmt: skip
    return found


def differences(
    runs: Sequence[Run], comparison: PinnedComparison, *, min_requests: int, connections: int,
    seconds: float,
) -> dict[int, float]:  # fmt: skip
    """Per valid pair (both runs valid), B - A of the proxy's CPU per connection in µs."""
    by_pair: dict[int, dict[str, Run]] = {}
    for run in runs:
        if run.comparison == comparison.name:
            by_pair.setdefault(run.pair, {})[run.variant] = run
    found = {}
    for pair, runs_of in sorted(by_pair.items()):
        a, b = runs_of.get(comparison.a), runs_of.get(comparison.b)
        if a is None or b is None:
            continue
        if any(problems(run, min_requests=min_requests, connections=connections, seconds=seconds)
               for run in (a, b)):  # fmt: skip
            continue
        found[pair] = b.cpu_per_conn_us - a.cpu_per_conn_us
    return found


def judge(values: Sequence[float], bound_us: float | None) -> Verdict | None:
    """The full benchmark's rule, on pairs: lower is better, every pair must clear the bound
    (None without a bound)."""
    if bound_us is None:
        return None
    return verdict(values, bound_us, higher_is_better=False)


def _fmt(value: float) -> str:
    return f"{value:.1f}"


def render_spread(values: Sequence[float]) -> str:
    found = spread(values)
    if found is None:
        return "n/a"
    return f"{_fmt(found.median)} ({_fmt(found.low)} to {_fmt(found.high)})"


@dataclass
class PinnedRun:
    """What a pinned run measured, and the conditions it ran under."""

    runs: list[Run]
    comparisons: list[str]  # names, in the order run
    pairs: int
    seconds: float
    warmup_s: float
    connections: int
    min_requests: int
    pinned: bool  # wrk on one CPU, the proxy on another
    load_cpu: int | None
    proxy_cpu: int | None
    facts: dict[str, str] = field(default_factory=dict)  # machine, versions, load, dates

    def comparisons_run(self) -> list[PinnedComparison]:
        return [BY_NAME[name] for name in self.comparisons]

    def differences(self, comparison: PinnedComparison) -> dict[int, float]:
        return differences(self.runs, comparison, min_requests=self.min_requests,
                           connections=self.connections, seconds=self.seconds)  # fmt: skip

    def problems(self, run: Run) -> list[str]:
        return problems(run, min_requests=self.min_requests, connections=self.connections,
                        seconds=self.seconds)  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["runs"] = [run.to_json() for run in self.runs]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PinnedRun:
        return cls(**{**data, "runs": [Run.from_json(r) for r in data["runs"]]})


def render_targets(run: PinnedRun) -> list[str]:
    """Markdown: per comparison, each pair's B - A, the median and spread, bound and verdict."""
    lines = [
        "| comparison | per pair (µs) | median (min-max) | target | verdict |",
        "|---|---|---|---|---|",
    ]
    for comparison in run.comparisons_run():
        found = run.differences(comparison)
        values = list(found.values())
        per_pair = ", ".join(_fmt(v) for v in values) or "n/a"
        lost = run.pairs - len(values)
        if lost:
            per_pair += f" ({lost} of {run.pairs} pairs invalid, left out)"
        found_verdict = judge(values, comparison.bound_us)
        shown = "—" if found_verdict is None else f"**{found_verdict.value}**"
        bound = "—" if comparison.bound_us is None else f"≤ {comparison.bound_us:g} µs"
        lines.append(
            f"| {comparison.describe()} | {per_pair} | {render_spread(values)} | {bound} | "
            f"{shown} |"
        )
    return lines


def tally(run: PinnedRun) -> str:
    """`2 met, 1 inconclusive`."""
    counts: dict[Verdict, int] = dict.fromkeys(Verdict, 0)
    for comparison in run.comparisons_run():
        found = judge(list(run.differences(comparison).values()), comparison.bound_us)
        if found is not None:
            counts[found] += 1
    return ", ".join(f"{counts[v]} {v.value}" for v in Verdict if counts[v]) or "no target"


def _closes(run: Run) -> str:
    return ", ".join(f"{relay} {n:,}" for relay, n in sorted(run.closes.items())) or "none"


def render_runs(run: PinnedRun) -> list[str]:
    """Markdown: each pair's two variants (their runs added up), with the checks' findings."""
    lines = [
        "| comparison | pair | variant | load | requests | conn/s | proxy CPU s | µs/conn | "
        "close events by relay (with warm-up) | valid |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in run.runs:
        found = run.problems(r)
        valid = "yes" if not found else "NO: " + "; ".join(found)
        lines.append(
            f"| {r.comparison} | {r.pair} | {r.variant} | {r.load:.2f} | {r.requests:,} | "
            f"{r.rate:.0f} | {r.cpu_s:.2f} | {_fmt(r.cpu_per_conn_us)} | {_closes(r)} | {valid} |"
        )
    return lines


def render_variants(run: PinnedRun) -> list[str]:
    """Markdown: each variant's own CPU per connection and rate over its valid pairs."""
    lines = ["| variant | what | proxy CPU per connection (µs) | conn/s | pairs |",
             "|---|---|---|---|---|"]  # fmt: skip
    for variant, what in VARIANTS.items():
        runs = [r for r in run.runs if r.variant == variant and not run.problems(r)]
        if not any(r.variant == variant for r in run.runs):
            continue
        rates = spread([r.rate for r in runs])
        rate = (
            "n/a" if rates is None else f"{rates.median:.0f} ({rates.low:.0f} to {rates.high:.0f})"
        )
        lines.append(f"| {variant} | {what} | {render_spread([r.cpu_per_conn_us for r in runs])} "
                     f"| {rate} | {len(runs)} |")  # fmt: skip
    return lines


def render_method(run: PinnedRun) -> str:
    """One paragraph: how the pairs were measured (for RESULTS-pinned.md and RESULTS.md)."""
    if run.pinned:
        where = (f"wrk on CPU {run.load_cpu}, the proxies on CPU {run.proxy_cpu} "
                 "(`sched_setaffinity`), nginx unpinned")  # fmt: skip
    else:
        where = "unpinned: this process may run on fewer than 2 CPUs"
    return (
        "In a network namespace of its own with loopback only (`unshare -n`): nginx on "
        "127.0.0.1:80 with the full benchmark's small response, and per variant `tproxy run "
        "--workers 1 --relay splice --spoof-source --log-format json --loop uvloop` (JSON "
        "session log to a file) on a loopback port, run through the CLI's own code with one "
        "change, its sessions' original destination fixed at 127.0.0.1:80 "
        "(`bench/pinned_engine.py`), so wrk connects to the proxy's port and nothing diverts; "
        f"{where}. Each pair starts both variants' proxies afresh, side by side, warms each up "
        f"with {run.warmup_s:g} s of wrk (not measured), then measures them in 1-second runs of "
        f"wrk `-t1 -c{run.connections} -H 'Connection: close'`, {run.seconds:g} of each, in the "
        "order A B B A A B B A (ABBA: a steady drift falls on both alike), the pairs starting "
        "with A and with B in turn; a variant's CPU per connection is its proxy's user + system "
        "CPU (from /proc/PID/stat, every process of it: with a supervisor, the supervisor's and "
        "its worker's) during its runs divided by the requests wrk completed in them, one per "
        "connection, and a pair's figure is B - A. The comparisons' pairs are "
        "interleaved (pair 1 of each, then pair 2 of each, ...). A variant's runs count when wrk "
        f"had no socket error and no bad status, completed at least {run.min_requests:,} "
        "requests, and the proxy's session log has a close event relayed by splice for each "
        "request completed (and a scraped variant was scraped once a second while measured, every "
        "scrape answered, its metrics counting the sessions); a pair counts when both of its "
        "variants do. **met** only when every "
        "pair's difference is within the bound, **MISSED** only when every pair's exceeds it, "
        "**inconclusive** otherwise."
    )


def render_results(run: PinnedRun) -> str:
    """RESULTS-pinned.md."""
    facts = run.facts
    lines = [
        "# Pinned A/B results",
        "",
        f"Run on {facts.get('started', '?')} in {facts.get('elapsed', '?')}: "
        f"`{facts.get('argv', 'python -m bench.pinned')}`.",
        "",
        f"Machine: {facts.get('machine', '?')}. {facts.get('versions', '')}",
        "",
        f"Load on the machine (`uptime`) before: {facts.get('load_before', '?')}; after: "
        f"{facts.get('load_after', '?')}; the 1-minute load average at the start of each pair "
        "is in the last table. Other work shares this machine's CPUs.",
        "",
        "## Method",
        "",
        render_method(run),
        "",
        "| variant | what |",
        "|---|---|",
        *(f"| {v} | {what} |" for v, what in VARIANTS.items()),
        "",
        f"## Targets: {tally(run)}",
        "",
        *render_targets(run),
        "",
        "## Each variant: median (min-max over the pairs it was valid in)",
        "",
        *render_variants(run),
        "",
        "## Every pair, each variant's runs added up, in the order the pairs ran",
        "",
        *render_runs(run),
    ]
    return "\n".join(lines) + "\n"


def render_section(run: PinnedRun) -> list[str]:
    """Markdown: the pinned A/B's part of the full benchmark's RESULTS.md (same run)."""
    issues = " and ".join(str(c.issue) for c in run.comparisons_run() if c.issue is not None)
    return [
        f"## Pinned A/B (issues {issues}), `bench/pinned.py` after the rounds: {tally(run)}",
        "",
        render_method(run) + f" Load (`uptime`) before: {run.facts.get('load_before', '?')}; "
        f"after: {run.facts.get('load_after', '?')}.",
        "",
        *render_targets(run),
        "",
        *render_variants(run),
    ]
