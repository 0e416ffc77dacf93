"""`tproxy sessions`' table: the running proxy's live sessions as people read them (pure)."""

from __future__ import annotations

from typing import Any

from tproxy.sniffers.printable import to_printable


def render_sessions(answer: dict[str, Any]) -> str:
    """The listing as a table (client-controlled text escaped), oldest first, and what is
    missing or cut."""
    header = ("ID", "W", "CLIENT", "DESTINATION", "SNI", "RULE", "RELAY", "UP", "DOWN", "AGE",
              "IDLE")  # fmt: skip
    rows: list[tuple[str, ...]] = []
    notes: list[str] = []
    for worker in answer.get("workers", []):
        for s in worker.get("sessions", []):
            rows.append((
                str(s.get("id")), str(worker.get("worker")), str(s.get("client")),
                str(s.get("dst")), to_printable(str(s.get("sni") or "-").encode(), 60),
                to_printable(str(s.get("rule") or "-").encode(), 40), str(s.get("relay") or "-"),
                _size(s.get("bytes_up")), _size(s.get("bytes_down")),
                f"{s.get('age_s', 0):.0f}s", f"{s.get('idle_s', 0):.0f}s",
            ))  # fmt: skip
        if worker.get("truncated"):
            notes.append(f"worker {worker.get('worker')}: {worker.get('active')} live, "
                         f"{len(worker.get('sessions', []))} listed")  # fmt: skip
    if answer.get("missing"):
        notes.append(f"workers that did not answer: {answer['missing']}")
    rows.sort(key=lambda row: row[0])
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]  # fmt: skip
    lines.append(f"{len(rows)} live sessions")
    return "\n".join([*lines, *notes])


def _size(value: object) -> str:
    number = value if isinstance(value, int) else 0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if number < 1024 or unit == "GiB":
            return f"{number}{unit}" if unit == "B" else f"{number:.1f}{unit}"
        number /= 1024  # type: ignore[assignment]
    return str(value)
