"""Turn bytes a client sent into text that is safe to log, match and print, and bounded.

Printable ASCII (0x20-0x7e) stays as it is; every other byte, and the backslash itself, becomes
`\\xNN` (two lower-case hex digits). Escaping the backslash keeps the mapping one-to-one: a client
that sends the four characters `\\x00` cannot pass for one that sent a NUL. A newline, a NUL or a
terminal escape sequence in a name therefore never reaches a log line as itself.
"""

from __future__ import annotations

import re

# Anything that is not printable ASCII, and the backslash (0x5c).
_NEEDS_ESCAPE = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")
_ESCAPE_LENGTH = 4  # "\xNN"


def to_printable(raw: bytes, max_chars: int) -> str:
    """Return `raw` as printable ASCII, escaped as above, cut to at most `max_chars` characters.

    The cut never splits an escape: the text ends before the first byte that does not fit whole.
    """
    raw = raw[:max_chars]  # each byte becomes at least one character
    if _NEEDS_ESCAPE.search(raw) is None:
        return raw.decode("ascii")
    text = _NEEDS_ESCAPE.sub(lambda m: b"\\x%02x" % m[0][0], raw).decode("ascii")
    if len(text) <= max_chars:
        return text
    # Every backslash in `text` starts an escape (a sent backslash is escaped too): if one starts
    # in the last three characters before the cut, the cut falls inside it.
    cut = max_chars
    escape_start = text.rfind("\\", max(0, cut - _ESCAPE_LENGTH + 1), cut)
    if escape_start != -1:
        cut = escape_start
    return text[:cut]
