"""docs/events.md is the schema: it and the code name the same events, fields and reasons."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from tproxy.core.reasons import NOT_EMITTED_YET, CloseReason
from tproxy.observability.events import EVENT_TYPES

DOC = (Path(__file__).parents[2] / "docs" / "events.md").read_text()


def _tables() -> dict[str, list[list[str]]]:
    """Each `### `name`` / `## Close reasons` section's table rows (cells, backticks stripped)."""
    sections: dict[str, list[list[str]]] = {}
    current = ""
    for line in DOC.splitlines():
        heading = re.match(r"#{2,3} `?([\w ]+?)`?$", line)
        if heading:
            current = heading.group(1)
            sections[current] = []
        elif line.startswith("| `") and current:
            sections[current].append(
                [cell.strip().strip("`") for cell in line.strip("|").split("|")]
            )
    return sections


def _shipped(rows: list[list[str]]) -> set[str]:
    return {row[0] for row in rows if row[2 if len(row) == 4 else 1] == "shipped"}


def test_every_event_and_field_in_the_code_is_in_the_doc_and_no_more() -> None:
    tables = _tables()
    for name, cls in EVENT_TYPES.items():
        assert name in tables, f"docs/events.md has no section for {name}"
        fields = {f.name for f in dataclasses.fields(cls)}
        assert _shipped(tables[name]) == fields, name


def test_planned_fields_are_not_in_the_code_yet() -> None:
    """A planned field that ships must become "shipped" in the doc in the same change."""
    for name, rows in _tables().items():
        if name in EVENT_TYPES:
            planned = {row[0] for row in rows if row[2].startswith("planned")}
            fields = {f.name for f in dataclasses.fields(EVENT_TYPES[name])}
            assert not planned & fields, (name, planned & fields)


def test_every_close_reason_in_the_code_is_in_the_doc_and_no_more() -> None:
    """Reasons defined ahead of the engine emitting them (`NOT_EMITTED_YET`) stay planned."""
    rows = _tables()["Close reasons"]
    emitted = {reason.value for reason in CloseReason if reason not in NOT_EMITTED_YET}
    assert _shipped(rows) == emitted
    planned = {row[0] for row in rows if row[1].startswith("planned")}
    assert not planned & emitted
    assert {reason.value for reason in NOT_EMITTED_YET} <= planned


def test_the_doc_has_no_event_the_code_does_not_know() -> None:
    sections = {name for name in _tables() if re.fullmatch(r"[a-z_]+", name)}
    assert sections == set(EVENT_TYPES)
