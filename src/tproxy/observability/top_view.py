"""`tproxy top`'s screen: the running proxy's totals, per-rule counters and busiest sessions,
from successive answers of its control socket to `stats` and `sessions` (pure: no I/O, the
clock is an argument).

`TopView` is fed one poll at a time (`update(at, stats, sessions)`, `at` a monotonic time) and
keeps the last two: rates (new sessions/s, bytes/s each way, each session's bytes/s) are the
difference between them over the time between them. A counter that went down (the proxy was
restarted in between) gives no rate rather than a negative one.

Every answer is untrusted in shape: a proxy of another version may lack a field or give it
another type, and the screen then shows `-` (the `parse_*` functions below never raise). Text
a client chose (SNI) and names from the configuration (rules, addons) are escaped and bounded
with `to_printable` and passed to rich as `Text`, so that `[bold]` in an SNI is shown as it is
and never read as rich markup, and a control character never reaches the terminal.

The screen is sized to a given height: each table row is one line (no cell wraps; a cell that
does not fit ends in an ellipsis), so the totals, the rules (at most a third of what is left)
and then as many of the busiest sessions as fit add up to the height.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from rich.console import Group, JustifyMethod, RenderableType
from rich.table import Table
from rich.text import Text

from tproxy.sniffers.printable import to_printable

CLEAN_REASON: Final = "closed"  # tproxy.core.reasons.CloseReason.CLOSED (a FIN both ways)
TOTALS_LINES: Final = 7  # proxy, sessions, bytes, connect, refused, sniffed, addons
NAME_CHARS: Final = 40  # rule and addon names, as `tproxy sessions` bounds them
SNI_CHARS: Final = 60
WORD_CHARS: Final = 32  # the other words a proxy sends: relay, reasons, sniffer names
MAX_COUNT: Final = 2**63  # a larger counter (or duration) is nonsense: shown as "-"

SESSION_COLUMNS: Final[tuple[tuple[str, JustifyMethod], ...]] = (
    ("ID", "left"), ("W", "right"), ("CLIENT", "left"), ("DESTINATION", "left"), ("SNI", "left"),
    ("RULE", "left"), ("RELAY", "left"), ("UP", "right"), ("DOWN", "right"), ("RATE", "right"),
    ("AGE", "right"),
)  # fmt: skip
"""The busiest sessions' columns: `tproxy sessions`' (without IDLE), and bytes/s since the
previous poll."""
NARROWABLE: Final = frozenset({"CLIENT", "DESTINATION", "SNI", "RULE"})
"""The columns cut first (to an ellipsis) when a screen is too narrow for every column."""
NARROW_DROPS: Final = ((120, frozenset({"RELAY"})), (100, frozenset({"RELAY", "CLIENT", "W"})),
                       (80, frozenset({"RELAY", "CLIENT", "W", "AGE", "RULE"})))  # fmt: skip
"""The columns a screen narrower than so many characters goes without (the narrowest match
wins), rather than cutting every column to an ellipsis."""

RuleKey = str | None
"""A rule's name as the proxy sends it; None: no rule decided (the default, or no policy)."""


# --- the answers, parsed without trusting their shape ----------------------------------------


@dataclass(frozen=True)
class ClosedCount:
    """Sessions closed for one reason under one rule (`stats`' `closed`)."""

    reason: str
    rule: RuleKey
    count: int


@dataclass(frozen=True)
class Histogram:
    """The upstream connect times: per-bucket counts (not cumulative), the last one +Inf."""

    bounds_s: tuple[float, ...]
    counts: tuple[int, ...]
    sum_s: float
    count: int


@dataclass(frozen=True)
class Stats:
    """What `tproxy top` reads of a `stats` answer; None (or empty) where the answer had
    nothing usable."""

    version: str | None = None
    uptime_s: float | None = None
    workers_running: int | None = None
    restarts: int | None = None
    active: int | None = None
    opened: int | None = None
    bytes_up: int | None = None
    bytes_down: int | None = None
    closed: tuple[ClosedCount, ...] = ()
    rule_bytes: Mapping[RuleKey, tuple[int, int]] = field(default_factory=dict)
    refused: Mapping[str, int] = field(default_factory=dict)
    sniffs: Mapping[str, int] = field(default_factory=dict)
    captures: int | None = None
    capture_failures: int | None = None
    addon_errors: tuple[tuple[str, str, int], ...] = ()  # (addon, hook, count)
    connect: Histogram | None = None


@dataclass(frozen=True)
class LiveSession:
    """One row of a `sessions` answer (text still as sent: escaped when shown)."""

    id: str
    worker: str
    client: str
    dst: str
    sni: str | None
    rule: RuleKey
    relay: str | None
    bytes_up: int
    bytes_down: int
    age_s: float | None

    @property
    def key(self) -> tuple[str, str]:
        return (self.worker, self.id)

    @property
    def total_bytes(self) -> int:
        return self.bytes_up + self.bytes_down


@dataclass(frozen=True)
class Listing:
    """A `sessions` answer: every listed session, and what was missing or cut."""

    sessions: tuple[LiveSession, ...] = ()
    missing: tuple[str, ...] = ()  # workers that did not answer
    truncated: tuple[tuple[str, int | None, int], ...] = ()  # (worker, live, listed)


def _count(value: object) -> int | None:
    """A counter: an int (not a bool) from 0 to 2**63, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        return None
    return value


def _seconds(value: object) -> float | None:
    """A duration: a finite number (not a bool) from 0 to 2**63, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, int) and not 0 <= value <= MAX_COUNT:
        return None  # (float() of a huge int raises)
    number = float(value)
    return number if math.isfinite(number) and 0 <= number <= MAX_COUNT else None


def _dicts(value: object) -> list[Mapping[str, object]]:
    """The objects in a list (anything else in it, or a non-list, is skipped)."""
    if not isinstance(value, list):
        return []
    return [item for item in value if isinstance(item, dict)]


def _mapping(value: object) -> Mapping[str, object]:
    return value if isinstance(value, dict) else {}


def _word(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _rule_key(value: object) -> RuleKey:
    """A rule's name; null (and a missing field) is the default."""
    return None if value is None else value if isinstance(value, str) else str(value)


def _counters(value: object) -> dict[str, int]:
    """`{"name": count}`, keeping the entries whose count is a counter."""
    return {
        str(name): number
        for name, raw in _mapping(value).items()
        if (number := _count(raw)) is not None
    }


def parse_stats(answer: object) -> Stats:
    """The parts of a `stats` answer `tproxy top` shows; never raises."""
    data = _mapping(answer)
    workers = _mapping(data.get("workers"))
    closed = tuple(
        ClosedCount(str(item.get("reason")), _rule_key(item.get("rule")), number)
        for item in _dicts(data.get("closed"))
        if (number := _count(item.get("count"))) is not None
    )
    rule_bytes: dict[RuleKey, tuple[int, int]] = {}
    for item in _dicts(data.get("rule_bytes")):
        up, down = _count(item.get("bytes_up")) or 0, _count(item.get("bytes_down")) or 0
        key = _rule_key(item.get("rule"))
        before = rule_bytes.get(key, (0, 0))
        rule_bytes[key] = (before[0] + up, before[1] + down)
    addon_errors = tuple(
        (str(item.get("addon")), str(item.get("hook")), number)
        for item in _dicts(data.get("addon_errors"))
        if (number := _count(item.get("count"))) is not None
    )
    version = data.get("version")
    return Stats(
        version=None if version is None else str(version),
        uptime_s=_seconds(data.get("uptime_s")),
        workers_running=_count(workers.get("running")),
        restarts=_count(workers.get("restarts")),
        active=_count(data.get("active")),
        opened=_count(data.get("opened")),
        bytes_up=_count(data.get("bytes_up")),
        bytes_down=_count(data.get("bytes_down")),
        closed=closed,
        rule_bytes=rule_bytes,
        refused=_counters(data.get("refused")),
        sniffs=_counters(data.get("sniffs")),
        captures=_count(data.get("captures")),
        capture_failures=_count(data.get("capture_failures")),
        addon_errors=addon_errors,
        connect=_histogram(data.get("connect")),
    )


def _histogram(value: object) -> Histogram | None:
    """The connect histogram, or None unless its bounds increase and it has one count per
    bucket plus +Inf."""
    data = _mapping(value)
    raw_bounds, raw_counts = data.get("bounds_s"), data.get("counts")
    if not isinstance(raw_bounds, list) or not isinstance(raw_counts, list):
        return None
    bounds = [_seconds(bound) for bound in raw_bounds]
    counts = [_count(number) for number in raw_counts]
    if len(counts) != len(bounds) + 1:
        return None
    good_bounds = [bound for bound in bounds if bound is not None]
    good_counts = [number for number in counts if number is not None]
    if len(good_bounds) != len(bounds) or len(good_counts) != len(counts):
        return None
    if any(b >= a for a, b in zip(good_bounds[1:], good_bounds, strict=False)):
        return None
    total = _count(data.get("count"))
    return Histogram(
        bounds_s=tuple(good_bounds),
        counts=tuple(good_counts),
        sum_s=_seconds(data.get("sum_s")) or 0.0,
        count=sum(good_counts) if total is None else total,
    )


def parse_sessions(answer: object) -> Listing:
    """A `sessions` answer's sessions and notes; never raises."""
    data = _mapping(answer)
    sessions: list[LiveSession] = []
    truncated: list[tuple[str, int | None, int]] = []
    for worker in _dicts(data.get("workers")):
        worker_id = str(worker.get("worker"))
        listed = _dicts(worker.get("sessions"))
        for item in listed:
            sni = item.get("sni")
            sessions.append(LiveSession(
                id=str(item.get("id")), worker=worker_id, client=str(item.get("client")),
                dst=str(item.get("dst")), sni=None if sni is None else str(sni),
                rule=_rule_key(item.get("rule")), relay=_word(item.get("relay")),
                bytes_up=_count(item.get("bytes_up")) or 0,
                bytes_down=_count(item.get("bytes_down")) or 0,
                age_s=_seconds(item.get("age_s")),
            ))  # fmt: skip
        if worker.get("truncated") is True:
            truncated.append((worker_id, _count(worker.get("active")), len(listed)))
    missing = data.get("missing")
    return Listing(
        sessions=tuple(sessions),
        missing=tuple(str(m) for m in missing) if isinstance(missing, list) else (),
        truncated=tuple(truncated),
    )


def estimate_quantile(histogram: Histogram, q: float) -> tuple[float, bool] | None:
    """The `q` quantile (0..1) of a histogram, linear within its bucket as Prometheus'
    `histogram_quantile` does (the first bucket starts at 0); None when it is empty.

    Returns:
        The estimate, and whether it is only a lower bound (it fell in the +Inf bucket: the
        estimate is then the last finite bound).
    """
    total = sum(histogram.counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    bounds = histogram.bounds_s
    for i, number in enumerate(histogram.counts):
        if number and below + number >= rank:
            if i >= len(bounds):
                return (bounds[-1] if bounds else 0.0), True
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - below) / number, False
        below += number
    return (bounds[-1] if bounds else 0.0), True  # (rank > total: q > 1)


# --- the state between polls ------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """Per second, between the last two answers; None where there is no rate."""

    opened: float | None = None
    bytes_up: float | None = None
    bytes_down: float | None = None


def _rate(before: int | None, after: int | None, elapsed_s: float) -> float | None:
    if before is None or after is None or after < before or elapsed_s <= 0:
        return None
    return (after - before) / elapsed_s


class TopView:
    """The state of `tproxy top`'s screen: the last answers and the rates between the last two.

    Feed it each poll with `update`; `render` draws the screen from what it has (the last good
    answers stay on screen while the proxy does not answer, under the error).
    """

    def __init__(self) -> None:
        self._stats: Stats | None = None
        self._stats_at: float | None = None
        self._rates = Rates()
        self._listing: Listing | None = None
        self._listing_at: float | None = None
        self._recent_bytes: dict[tuple[str, str], int] = {}  # since the previous listing
        self._recent_s: float | None = None  # the time those bytes took
        self._errors: tuple[str, ...] = ()
        self._polled_at: float | None = None

    def update(
        self, at: float, stats: object | None, sessions: object | None, errors: Sequence[str] = ()
    ) -> None:
        """One poll at monotonic time `at`: the answers to `stats` and `sessions` (None: that
        one failed) and what went wrong, one line each (shown until the next poll)."""
        self._errors = tuple(errors)
        self._polled_at = at
        if stats is not None:
            self._add_stats(at, parse_stats(stats))
        if sessions is not None:
            self._add_listing(at, parse_sessions(sessions))

    def _add_stats(self, at: float, stats: Stats) -> None:
        before, before_at = self._stats, self._stats_at
        if before is None or before_at is None:
            self._rates = Rates()
        else:
            elapsed_s = at - before_at
            self._rates = Rates(
                opened=_rate(before.opened, stats.opened, elapsed_s),
                bytes_up=_rate(before.bytes_up, stats.bytes_up, elapsed_s),
                bytes_down=_rate(before.bytes_down, stats.bytes_down, elapsed_s),
            )
        self._stats, self._stats_at = stats, at

    def _add_listing(self, at: float, listing: Listing) -> None:
        before, before_at = self._listing, self._listing_at
        self._recent_bytes = {}
        self._recent_s = None
        if before is not None and before_at is not None and at > before_at:
            self._recent_s = at - before_at
            earlier = {s.key: s.total_bytes for s in before.sessions}
            for session in listing.sessions:
                # A session new since then moved all its bytes since then.
                then = earlier.get(session.key, 0)
                if session.total_bytes >= then:
                    self._recent_bytes[session.key] = session.total_bytes - then
        self._listing, self._listing_at = listing, at

    def _error_lines(self) -> list[str]:
        """This poll's errors, and how old the figures still shown under them are."""
        lines = [_escaped(error, 300) for error in self._errors]
        if not lines or self._polled_at is None:
            return lines
        shown = (("totals", self._stats_at), ("sessions", self._listing_at))
        stale = [(name, self._polled_at - at) for name, at in shown
                 if at is not None and at < self._polled_at]  # fmt: skip
        if stale:
            names = " and ".join(name for name, _ in stale)
            lines[-1] += f" (the {names} shown are {_duration(max(age for _, age in stale))} old)"
        return lines

    @property
    def rates(self) -> Rates:
        return self._rates

    def busiest(self) -> list[LiveSession]:
        """The listed sessions, those that moved the most bytes since the previous listing
        first (before a second listing: the most bytes in all)."""
        sessions = self._listing.sessions if self._listing is not None else ()
        return sorted(
            sessions,
            key=lambda s: (self._recent_bytes.get(s.key, 0), s.total_bytes, s.id),
            reverse=True,
        )

    def render(
        self, height: int, width: int | None = None, *, hint: str = "q quits"
    ) -> RenderableType:
        """The screen, at most `height` lines (a screen too small for the totals gets them
        anyway); at `width` (None: any) the narrower, the fewer session columns (see
        `NARROW_DROPS`); `hint` starts the last line (the keys)."""
        stats = self._stats or Stats()
        listing = self._listing or Listing()
        errors = [_cell(line, style="bold red") for line in self._error_lines()]
        fixed = len(errors) + TOTALS_LINES + 5  # 2 blank lines, 2 table headers, the last line
        room = max(0, height - fixed)
        rules = _rule_rows(stats, listing)
        rules_shown = min(len(rules), room, max(1, room // 3))
        busiest = self.busiest()
        sessions_shown = min(len(busiest), room - rules_shown)  # (room >= rules_shown)
        notes = [hint] if hint else []
        if rules_shown < len(rules):
            notes.append(f"{rules_shown} of {len(rules)} rules shown")
        if sessions_shown < len(busiest):
            notes.append(f"the busiest {sessions_shown} of {len(busiest)} sessions shown")
        notes += [f"worker {w}: {live if live is not None else '?'} live, {listed} listed"
                  for w, live, listed in listing.truncated]  # fmt: skip
        if listing.missing:
            missing = ", ".join(_escaped(worker, 8) for worker in listing.missing[:16])
            notes.append(f"workers that did not answer: {missing}")
        last_line = _cell("   ".join(notes), style="dim")
        return Group(
            *errors,
            self._totals(stats, listing),
            Text(""),
            _rules_table(rules[:rules_shown]),
            Text(""),
            self._sessions_table(busiest[:sessions_shown], _dropped_columns(width)),
            last_line,
        )

    def _totals(self, stats: Stats, listing: Listing) -> Table:
        rates = self._rates
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold", no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        live = stats.active if stats.active is not None else len(listing.sessions)
        closed = sum(c.count for c in stats.closed)
        not_clean = sum(c.count for c in stats.closed if c.reason != CLEAN_REASON)
        workers = "-" if stats.workers_running is None else str(stats.workers_running)
        restarts = "-" if stats.restarts is None else str(stats.restarts)
        version = _escaped(stats.version, WORD_CHARS) if stats.version is not None else "-"
        rows = [
            ("proxy", f"tproxy {version}   up {_duration(stats.uptime_s)}   "
                      f"workers {workers} running, {restarts} restarted"),
            ("sessions", f"{live} live   {_per_second(rates.opened)} new   "
                         f"{_number(stats.opened)} opened   {closed} closed, "
                         f"{not_clean} not clean"),
            ("bytes", f"up {_bytes(stats.bytes_up)} ({_bytes_rate(rates.bytes_up)})   "
                      f"down {_bytes(stats.bytes_down)} ({_bytes_rate(rates.bytes_down)})"),
            ("connect", _connect_line(stats.connect)),
            ("refused", _breakdown(stats.refused)),
            ("sniffed", _breakdown(stats.sniffs)),
            ("addons", _addons_line(stats)),
        ]  # fmt: skip
        assert len(rows) == TOTALS_LINES
        for label, value in rows:
            grid.add_row(label, _cell(value))
        return grid

    def _sessions_table(self, sessions: Sequence[LiveSession], dropped: frozenset[str]) -> Table:
        table = _table()
        kept = [i for i, (header, _) in enumerate(SESSION_COLUMNS) if header not in dropped]
        for i in kept:
            header, justify = SESSION_COLUMNS[i]
            _add_column(table, header, justify, narrowable=header in NARROWABLE)
        for s in sessions:
            recent = self._recent_bytes.get(s.key)
            rate = (recent / self._recent_s) if recent is not None and self._recent_s else None
            cells = (
                _cell(_escaped(s.id, 26)), _cell(_escaped(s.worker, 8)),
                _cell(_escaped(s.client, 48)), _cell(_escaped(s.dst, 48)),
                _cell(_escaped(s.sni, SNI_CHARS) if s.sni is not None else "-"),
                _rule_name(s.rule),
                _cell(_escaped(s.relay, WORD_CHARS) if s.relay is not None else "-"),
                _cell(_bytes(s.bytes_up)), _cell(_bytes(s.bytes_down)), _cell(_bytes_rate(rate)),
                _cell(_duration(s.age_s)),
            )  # fmt: skip
            table.add_row(*(cells[i] for i in kept))
        return table


# --- the per-rule table -----------------------------------------------------------------------


@dataclass(frozen=True)
class RuleRow:
    """One rule's line: live sessions (from the listing), closed ones and how many of those
    did not close cleanly, bytes each way (closed and live)."""

    rule: RuleKey
    live: int
    closed: int
    not_clean: int
    bytes_up: int
    bytes_down: int


def _rule_rows(stats: Stats, listing: Listing) -> list[RuleRow]:
    """Every rule seen in either answer, the one that moved the most bytes first."""
    live: dict[RuleKey, int] = {}
    for session in listing.sessions:
        live[session.rule] = live.get(session.rule, 0) + 1
    closed: dict[RuleKey, int] = {}
    not_clean: dict[RuleKey, int] = {}
    for c in stats.closed:
        closed[c.rule] = closed.get(c.rule, 0) + c.count
        if c.reason != CLEAN_REASON:
            not_clean[c.rule] = not_clean.get(c.rule, 0) + c.count
    rules = _unique([*stats.rule_bytes, *closed, *live])
    rows = [
        RuleRow(
            rule,
            live.get(rule, 0),
            closed.get(rule, 0),
            not_clean.get(rule, 0),
            *stats.rule_bytes.get(rule, (0, 0)),
        )
        for rule in rules
    ]
    rows.sort(key=lambda r: (-(r.bytes_up + r.bytes_down), -r.live, -r.closed,
                             r.rule is None, r.rule or ""))  # fmt: skip
    return rows


def _dropped_columns(width: int | None) -> frozenset[str]:
    dropped: frozenset[str] = frozenset()
    for narrower_than, columns in NARROW_DROPS:
        if width is not None and width < narrower_than:
            dropped = columns
    return dropped


def _unique(keys: Iterable[RuleKey]) -> list[RuleKey]:
    return list(dict.fromkeys(keys))


def _rules_table(rows: Sequence[RuleRow]) -> Table:
    table = _table()
    _add_column(table, "RULE", "left", narrowable=True)
    for header in ("LIVE", "CLOSED", "NOT CLEAN", "UP", "DOWN"):
        _add_column(table, header, "right")
    for row in rows:
        table.add_row(
            _rule_name(row.rule), _cell(str(row.live)), _cell(str(row.closed)),
            _cell(str(row.not_clean)), _cell(_bytes(row.bytes_up)), _cell(_bytes(row.bytes_down)),
        )  # fmt: skip
    return table


def _table() -> Table:
    """A table whose every row is one line: no box, one header line, nothing wraps."""
    return Table(box=None, show_edge=False, pad_edge=False, padding=(0, 1),
                 header_style="bold reverse")  # fmt: skip


def _add_column(
    table: Table, header: str, justify: JustifyMethod, *, narrowable: bool = False
) -> None:
    """A column whose cells never wrap. rich narrows the columns that may wrap first, so a
    narrowable one is declared as such, while its cells (`_cell`) and header refuse to wrap:
    they end in an ellipsis instead."""
    table.add_column(_cell(header), justify=justify, no_wrap=not narrowable,
                     overflow="ellipsis")  # fmt: skip


def _cell(text: str, style: str = "") -> Text:
    """One line of text, whatever the column's width (a Text's own no_wrap wins over its
    column's). Never markup: `[bold]` stays as it is."""
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def _rule_name(rule: RuleKey) -> Text:
    if rule is None:
        return _cell("(default)", style="dim")
    return _cell(_escaped(rule, NAME_CHARS))


# --- words and numbers ------------------------------------------------------------------------


def _escaped(text: str, max_chars: int) -> str:
    """Text from the proxy as printable ASCII (`to_printable`), at most `max_chars`; a lone
    surrogate (JSON allows one) is escaped too rather than failing to encode."""
    return to_printable(text.encode("utf-8", errors="surrogatepass"), max_chars)


def _breakdown(counts: Mapping[str, int]) -> str:
    """`12: a 10, b 2` (the largest first), or `0`."""
    total = sum(counts.values())
    if not total:
        return "0"
    parts = sorted(((n, name) for name, n in counts.items() if n), key=lambda p: (-p[0], p[1]))
    return f"{total}: " + ", ".join(f"{_escaped(name, WORD_CHARS)} {n}" for n, name in parts)


def _addons_line(stats: Stats) -> str:
    errors = sum(n for _, _, n in stats.addon_errors)
    line = f"{errors} {'error' if errors == 1 else 'errors'}"
    if errors:
        worst = sorted(stats.addon_errors, key=lambda e: -e[2])[:8]
        line += " (" + ", ".join(f"{_escaped(addon, NAME_CHARS)} {_escaped(hook, WORD_CHARS)} "
                                 f"{n}" for addon, hook, n in worst if n) + ")"  # fmt: skip
    failed = "-" if stats.capture_failures is None else str(stats.capture_failures)
    return f"{line}   captures {_number(stats.captures)}, {failed} failed"


def _connect_line(histogram: Histogram | None) -> str:
    if histogram is None:
        return "-"
    if not histogram.count:
        return "no upstream connects yet"
    mean = _milliseconds(histogram.sum_s / histogram.count)
    parts = [f"mean {mean}"]
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        estimate = estimate_quantile(histogram, q)
        if estimate is not None:
            value, lower_bound = estimate
            parts.append(f"{name} {'>' if lower_bound else ''}{_milliseconds(value)}")
    return "   ".join([*parts, f"({histogram.count} connects since start)"])


def _milliseconds(seconds: float) -> str:
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.2f} ms"
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


def _number(value: int | None) -> str:
    return "-" if value is None else str(value)


def _per_second(rate: float | None) -> str:
    return "-/s" if rate is None else f"{rate:.1f}/s"


def _bytes(value: float | None) -> str:
    """`512 B`, `1.5 KiB` ... `3.0 TiB`; `-` for none."""
    if value is None:
        return "-"
    number = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if number < 1024:
            return f"{number:.0f} {unit}" if unit == "B" else f"{number:.1f} {unit}"
        number /= 1024
    return f"{number:.1f} TiB"


def _bytes_rate(rate: float | None) -> str:
    return "-/s" if rate is None else f"{_bytes(rate)}/s"


def _duration(seconds: float | None) -> str:
    """`42s`, `3m04s`, `5h02m`, `2d03h`; `-` for none."""
    if seconds is None:
        return "-"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"
