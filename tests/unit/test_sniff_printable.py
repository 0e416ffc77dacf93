"""Client bytes as loggable text: printable, one-to-one, bounded without splitting an escape."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from tproxy.sniffers.printable import to_printable

UNIT = re.compile(r"[\x20-\x5b\x5d-\x7e]|\\x[0-9a-f]{2}")


def unescape(text: str) -> bytes:
    units = UNIT.findall(text)
    assert "".join(units) == text
    return bytes(int(unit[2:], 16) if len(unit) == 4 else ord(unit) for unit in units)


@given(st.binary(max_size=300))
def test_the_text_reads_back_as_the_bytes(raw: bytes) -> None:
    assert unescape(to_printable(raw, 4 * len(raw))) == raw


@given(st.binary(max_size=300), st.integers(0, 400))
def test_a_cut_keeps_whole_units_and_as_many_as_fit(raw: bytes, max_chars: int) -> None:
    text = to_printable(raw, max_chars)
    assert len(text) <= max_chars
    kept = unescape(text)
    assert raw.startswith(kept)
    if len(kept) < len(raw):  # the next unit would not have fit
        assert len(text) + len(to_printable(raw[len(kept) : len(kept) + 1], 4)) > max_chars


def test_printable_ascii_is_kept_and_the_rest_escaped() -> None:
    assert to_printable(b"www.example.test", 255) == "www.example.test"
    assert to_printable(b"a\x00\n\x1b[0m\\\xff", 255) == "a\\x00\\x0a\\x1b[0m\\x5c\\xff"
