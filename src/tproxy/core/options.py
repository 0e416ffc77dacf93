"""Option specs: one row per setting says how it is read from a file, from the command line, and
whether a reload may change it; pure, no I/O.

A table of `OptionSpec` rows drives everything an option touches: argparse (the CLI builds one
argument per row with a flag), file validation (`parse_table` checks each key of a TOML table
against the rows with a file key), the merge of command-line overrides, reload (`reloadable`),
and the example file in the docs (`render_example`). Adding an option is one row (and, for the
proxy's options, one typed `ProxyConfig` field that holds its default).

A value's `ValueType` knows both spellings of one value: the TOML value (`from_file`, given the
key for its messages) and the command-line text (`from_text`). Nested tables fit the same shape:
`table_list` is a value type whose items are tables validated by their own rows, so a list of
`[[rule]]` tables or an `addon = [...]` list is one more row.
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tproxy.core.endpoint import Endpoint, EndpointError, parse_endpoint

E = TypeVar("E", bound=enum.Enum)
T = TypeVar("T")


class ConfigError(ValueError):
    """An invalid configuration; the message is one sentence for the operator."""


def _no_text(text: str) -> Any:
    raise AssertionError(f"this value has no command-line spelling: {text!r}")


def _no_toml(value: Any) -> str:
    raise AssertionError(f"this value has no one-line TOML spelling: {value!r}")


@dataclass(frozen=True)
class ValueType:
    """How one kind of value is read and written.

    Args:
        from_file: (key, TOML value) -> the value; raises ConfigError naming the key.
        from_text: command-line text -> the value (one item, for a repeatable option); raises
            ConfigError with a message that does not need the flag (argparse names it).
        to_toml: the value -> its TOML spelling, for the example file.
        choices: the only texts allowed, shown by --help as {a,b}; empty if any.
        repeatable: the flag may be given again; each adds one item to a list.
        switch: a flag without a value: given means true.
    """

    from_file: Callable[[str, Any], Any]
    from_text: Callable[[str], Any] = _no_text
    to_toml: Callable[[Any], str] = _no_toml
    choices: tuple[str, ...] = ()
    repeatable: bool = False
    switch: bool = False


@dataclass(frozen=True)
class OptionSpec:
    """One option: its name, how it is spelled in a file and on the command line, its help.

    Args:
        name: the field it sets (a `ProxyConfig` field, or the table's own record's) and the
            argparse dest.
        kind: how its value is read.
        help: one sentence for --help (and the README's table).
        file_key: its key in a TOML table; None for command-line only options.
        flag: its command-line flag; None for file-only options.
        metavar: the placeholder in --help; from `kind.choices` when it has them.
        reloadable: SIGHUP may change it in a running proxy; False: only on restart.
        required: a table without this key is invalid (for nested tables' rows).
        example: the value the example file shows, when it is not the default.
    """

    name: str
    kind: ValueType
    help: str
    file_key: str | None = None
    flag: str | None = None
    metavar: str | None = None
    reloadable: bool = True
    required: bool = False
    example: Any = None

    @property
    def shown_metavar(self) -> str | None:
        if self.kind.choices:
            return "{" + ",".join(self.kind.choices) + "}"
        return self.metavar


def option(
    name: str,
    kind: ValueType,
    help: str,
    *,
    file: bool = True,
    cli: bool = True,
    metavar: str | None = None,
    reloadable: bool = True,
    required: bool = False,
    example: Any = None,
    key: str | None = None,
) -> OptionSpec:
    """A spec with the usual spellings: the file key is `name` without a `_s` unit suffix, the
    flag is that key with dashes (`connect_timeout_s` -> `connect_timeout`, `--connect-timeout`).
    `key` overrides the file key (and so the flag) where the field's unit suffix is another one
    (`capture_max_total_bytes` -> `capture_max_total`).
    """
    key = key if key is not None else name.removesuffix("_s")
    return OptionSpec(
        name=name,
        kind=kind,
        help=help,
        file_key=key if file else None,
        flag="--" + key.replace("_", "-") if cli else None,
        metavar=metavar,
        reloadable=reloadable,
        required=required,
        example=example,
    )


def parse_table(
    specs: Sequence[OptionSpec], raw: Mapping[str, Any], where: str = ""
) -> dict[str, Any]:
    """Field values from one TOML table, each checked by its row.

    Args:
        specs: the rows; those without a file key are ignored.
        raw: the table as tomllib returns it.
        where: the table's place in the file (e.g. "rule[2]."), prefixed to keys in messages.

    Raises:
        ConfigError: an unknown key, a missing required one, or a value of the wrong kind.
    """
    by_key = {s.file_key: s for s in specs if s.file_key is not None}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        spec = by_key.get(key)
        if spec is None:
            known = ", ".join(sorted(by_key))
            raise ConfigError(f"unknown setting {where + key!r} (known: {known})")
        values[spec.name] = spec.kind.from_file(where + key, value)
    missing = [k for k, s in by_key.items() if s.required and k not in raw]
    if missing:
        raise ConfigError(f"{where}{missing[0]} is required")
    return values


def render_example(specs: Sequence[OptionSpec], defaults: Mapping[str, Any]) -> str:
    """A TOML file that sets every file key: its example value, else its default."""
    lines = []
    for spec in specs:
        if spec.file_key is None:
            continue
        value = spec.example if spec.example is not None else defaults[spec.name]
        lines.append(f"{spec.file_key} = {spec.kind.to_toml(value)}")
    return "\n".join(lines) + "\n"


# --- value types ---------------------------------------------------------------------------


def _either(texts: Sequence[str]) -> str:
    quoted = [f'"{t}"' for t in texts]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def choice(kind: type[E]) -> ValueType:
    """One of an enum's values, as a string."""
    texts = tuple(str(member.value) for member in kind)

    def from_file(key: str, value: Any) -> E:
        if value not in texts:
            raise ConfigError(f"{key} must be {_either(texts)}")
        return kind(value)

    def from_text(text: str) -> E:
        if text not in texts:
            allowed = ", ".join(repr(t) for t in texts)
            raise ConfigError(f"invalid choice: {text!r} (choose from {allowed})")
        return kind(text)

    return ValueType(from_file, from_text, lambda v: f'"{v.value}"', choices=texts)


def _endpoints_from_file(key: str, value: Any) -> list[Endpoint]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'{key} must be a non-empty list of "HOST:PORT" strings')
    try:
        return [parse_endpoint(v) for v in value]
    except EndpointError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _endpoint_from_text(text: str) -> Endpoint:
    try:
        return parse_endpoint(text)
    except EndpointError as exc:
        raise ConfigError(str(exc)) from None


def _strings_toml(values: Sequence[Any]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


ENDPOINTS = ValueType(_endpoints_from_file, _endpoint_from_text, _strings_toml, repeatable=True)
"""A non-empty list of `HOST:PORT` endpoints; on the command line one per flag."""


def _endpoint_from_file(key: str, value: Any) -> Endpoint:
    if not isinstance(value, str):
        raise ConfigError(f'{key} must be a "HOST:PORT" string')
    try:
        return parse_endpoint(value)
    except EndpointError as exc:
        raise ConfigError(f"{key}: {exc}") from None


ENDPOINT = ValueType(_endpoint_from_file, _endpoint_from_text, lambda v: f'"{v}"')
"""One `HOST:PORT` endpoint (IPv6 as `[addr]:port`)."""


def _flag_from_file(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false")
    return value


SWITCH = ValueType(_flag_from_file, to_toml=lambda v: "true" if v else "false", switch=True)
"""true or false in a file; on the command line the flag alone means true."""


def _whole_number_from_file(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be a whole number")
    return value


def parse_mark(text: str) -> int:
    """A firewall mark, 1 to 0xffffffff, in decimal or 0x hex."""
    try:
        value = int(text, 0)
    except ValueError:
        raise ConfigError(f"invalid mark {text!r}: expected e.g. 2 or 0x2") from None
    if not 1 <= value <= 0xFFFFFFFF:
        raise ConfigError(f"mark {text} out of range: expected 1 to 0xffffffff")
    return value


def _mark_from_file(key: str, value: Any) -> int:
    number = _whole_number_from_file(key, value)
    if not 1 <= number <= 0xFFFFFFFF:
        raise ConfigError(f"{key} must be from 1 to 0xffffffff")
    return number


MARK = ValueType(_mark_from_file, parse_mark, str)
"""A firewall mark (SO_MARK): a whole number from 1 to 0xffffffff."""


def parse_positive_int(text: str) -> int:
    """A whole number above 0, in decimal."""
    if not text.isdigit() or int(text) == 0:
        raise ConfigError(f"invalid number {text!r}: expected a positive integer")
    return int(text)


def _positive_int_from_file(key: str, value: Any) -> int:
    number = _whole_number_from_file(key, value)
    if number < 1:
        raise ConfigError(f"{key} must be at least 1")
    return number


POSITIVE_INT = ValueType(_positive_int_from_file, parse_positive_int, str)
"""A whole number, at least 1."""


def parse_seconds(text: str) -> float:
    """A duration in seconds, above 0."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(f"invalid duration {text!r}: expected seconds > 0")
    return value


def _seconds_from_file(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ConfigError(f"{key} must be a number of seconds above 0")
    return float(value)


SECONDS = ValueType(_seconds_from_file, parse_seconds, lambda v: f"{v:g}")
"""A duration in seconds, above 0 (a whole number or not)."""


_RATE_TEXT = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|sec|second|min|minute)")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "min": 60.0, "minute": 60.0}


def parse_rate(text: str) -> float:
    """A rate, per second: "20/s", "600/min" (a plain number is per second); above 0."""
    stripped = text.strip()
    match = _RATE_TEXT.fullmatch(stripped)
    try:
        value = float(match[1]) / _RATE_UNITS[match[2]] if match else float(stripped)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:  # (NaN fails this too)
        raise ConfigError(f"invalid rate {text!r}: expected e.g. 20/s or 600/min")
    return value


def _rate_from_file(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f'{key} must be a rate such as "20/s" or "600/min"')
    try:
        return parse_rate(str(value))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


RATE = ValueType(_rate_from_file, parse_rate, lambda v: f'"{v:g}/s"')
"""A rate per second, above 0: "20/s", "600/min", or a number (per second)."""


_BYTE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_BYTES_TEXT = re.compile(r"([0-9]+)\s*([KMGT]?)(?:iB)?", re.IGNORECASE)
_BYTES_HINT = "a whole number of bytes, optionally with K, M, G or T (powers of 1024)"


def parse_bytes(text: str) -> int:
    """A size in bytes, at least 1: `16777216`, `16M`, `16MiB`, `1g` (K, M, G, T are powers of
    1024; "MB" is refused rather than guessed at)."""
    match = _BYTES_TEXT.fullmatch(text.strip())
    value = int(match[1]) * _BYTE_UNITS[match[2].upper()] if match else 0
    if value < 1:
        raise ConfigError(f"invalid size {text!r}: expected {_BYTES_HINT}, e.g. 16M")
    return value


def _bytes_from_file(key: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return parse_bytes(value)
        except ConfigError:
            pass
    elif not isinstance(value, bool) and isinstance(value, int) and value >= 1:
        return value
    raise ConfigError(f'{key} must be {_BYTES_HINT}, e.g. 16777216 or "16M"')


def render_bytes(value: int) -> str:
    """The shortest exact spelling `parse_bytes` reads back: `16M`, `1536K`, `1000`."""
    for unit in ("T", "G", "M", "K"):
        if value % _BYTE_UNITS[unit] == 0:
            return f"{value // _BYTE_UNITS[unit]}{unit}"
    return str(value)


BYTES = ValueType(_bytes_from_file, parse_bytes, lambda v: f'"{render_bytes(v)}"')
"""A size in bytes, at least 1: a whole number, or a string with a K/M/G/T suffix ("16M")."""


_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_TEXT = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([smhd]?)")
_DURATION_HINT = 'seconds above 0, or a number with s, m, h or d (e.g. "45s", "30m", "12h", "7d")'


def parse_duration(text: str) -> float:
    """A duration above 0 in seconds: `90`, `1.5`, `45s`, `30m`, `12h`, `7d`."""
    match = _DURATION_TEXT.fullmatch(text.strip())
    value = float(match[1]) * _DURATION_UNITS[match[2]] if match else 0.0
    if not value > 0:
        raise ConfigError(f"invalid duration {text!r}: expected {_DURATION_HINT}")
    return value


def _duration_from_file(key: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            return parse_duration(value)
        except ConfigError:
            pass
    elif not isinstance(value, bool) and isinstance(value, int | float) and value > 0:
        return float(value)
    raise ConfigError(f"{key} must be {_DURATION_HINT}")


def _plain_number(value: float) -> str:
    text = repr(float(value))  # exact; no exponent from 1e-4 to 1e16
    return text.removesuffix(".0")


def render_duration(value: float) -> str:
    """The largest whole unit that spells `value` exactly ("7d", "90m"), else seconds."""
    for unit in ("d", "h", "m"):
        if value % _DURATION_UNITS[unit] == 0:
            return f"{_plain_number(value // _DURATION_UNITS[unit])}{unit}"
    return f"{_plain_number(value)}s"


DURATION = ValueType(_duration_from_file, parse_duration, lambda v: f'"{render_duration(v)}"')
"""A duration above 0: seconds as a number, or a string with a unit ("45s", "30m", "12h", "7d").
For long spans (ages); the timeouts keep `SECONDS`, whose spelling is older."""


def _path_from_file(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a file name")
    return value


PATH = ValueType(_path_from_file, str, lambda v: f'"{v}"')
"""A file name (on the command line taken as given: opening it says what is wrong)."""


def _paths_from_file(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f'{key} must be a list of file names (e.g. ["a.py", "b.py"])')
    return value


PATHS = ValueType(_paths_from_file, str, _strings_toml, repeatable=True)
"""A list of file names (maybe empty); on the command line one per flag."""


def table_list(specs: Sequence[OptionSpec], build: Callable[..., T]) -> ValueType:
    """A list of tables (TOML `[[key]]`), each checked by its own rows and built into a record.

    Args:
        specs: the rows of one table.
        build: makes one record from a table's field values (missing keys keep its defaults).

    File-only (no command-line spelling), and not in `render_example`'s one-line form: a
    shipped table list shows its own `[[key]]` example.
    """

    def from_file(key: str, value: Any) -> tuple[T, ...]:
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{key} must be a list of tables ([[{key}]])")
        return tuple(
            build(**parse_table(specs, item, f"{key}[{i}].")) for i, item in enumerate(value)
        )

    return ValueType(from_file)
