"""The option table: every `tproxy run` option reads the same from the command line and the file,
bad values say what is wrong in one sentence, nested tables fit the same rows, reload keeps what
only a restart can change."""

from __future__ import annotations

import argparse
import enum
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tproxy.core.config as config_module
from tproxy.cli.main import _add_option, build_parser, cli_overrides, main
from tproxy.core.config import (
    DERIVED_FIELDS,
    FILE_OPTIONS,
    RUN_OPTIONS,
    ConfigError,
    InterceptMode,
    LogFormat,
    LoopKind,
    ProxyConfig,
    RelayKind,
    build_config,
    parse_config_file,
    reload_config,
    render_example_file,
)
from tproxy.core.endpoint import Endpoint, parse_endpoint
from tproxy.core.options import (
    ENDPOINTS,
    SECONDS,
    OptionSpec,
    ValueType,
    choice,
    option,
    parse_bytes,
    parse_duration,
    parse_rate,
    parse_table,
    render_bytes,
    render_duration,
    table_list,
)

README = Path(__file__).resolve().parents[2] / "README.md"

# One value other than the default for every option with a file key: (command-line arguments,
# the file's line, the ProxyConfig value both must give).
SAMPLES: dict[str, tuple[list[str], str, Any]] = {
    "mode": (["--mode", "redirect"], 'mode = "redirect"', InterceptMode.REDIRECT),
    "listen": (
        ["--listen", "198.18.0.1:80", "--listen", "[2001:db8::1]:81"],
        'listen = ["198.18.0.1:80", "[2001:db8::1]:81"]',
        [parse_endpoint("198.18.0.1:80"), parse_endpoint("[2001:db8::1]:81")],
    ),
    "spoof_source": (["--spoof-source"], "spoof_source = true", True),
    "mark": (["--mark", "0x10"], "mark = 16", 16),
    "connect_timeout_s": (["--connect-timeout", "2.5"], "connect_timeout = 2.5", 2.5),
    "idle_timeout_s": (["--idle-timeout", "600"], "idle_timeout = 600", 600.0),
    "half_closed_timeout_s": (["--half-closed-timeout", "7"], "half_closed_timeout = 7", 7.0),
    "drain_timeout_s": (["--drain-timeout", "0.5"], "drain_timeout = 0.5", 0.5),
    "max_connections": (["--max-connections", "12"], "max_connections = 12", 12),
    "relay": (["--relay", "copy"], 'relay = "copy"', RelayKind.COPY),
    "loop": (["--loop", "asyncio"], 'loop = "asyncio"', LoopKind.ASYNCIO),
    "log_format": (["--log-format", "json"], 'log_format = "json"', LogFormat.JSON),
    "policy": (["--policy", "p.toml"], 'policy = "p.toml"', "p.toml"),
    "addon_files": (
        ["--addon", "a.py", "--addon", "b.py"],
        'addon = ["a.py", "b.py"]',
        ["a.py", "b.py"],
    ),
    "capture_dir": (["--capture-dir", "caps"], 'capture_dir = "caps"', "caps"),
    "capture_all": (
        ["--capture-all", "--capture-dir", "caps"],
        'capture_all = true\ncapture_dir = "caps"',
        True,
    ),
    "capture_max_bytes": (["--capture-max-bytes", "1M"], "capture_max_bytes = 1048576", 1 << 20),
    "capture_max_total_bytes": (
        ["--capture-max-total", "10G"],
        'capture_max_total = "10G"',
        10 << 30,
    ),
    "capture_max_age_s": (["--capture-max-age", "12h"], "capture_max_age = 43200", 43200.0),
    "ca_dir": (["--ca", "ca"], 'ca = "ca"', "ca"),
    "tls_handshake_timeout_s": (
        ["--tls-handshake-timeout", "3"],
        "tls_handshake_timeout = 3",
        3.0,
    ),
    "upstream_ca": (["--upstream-ca", "b.pem"], 'upstream_ca = "b.pem"', "b.pem"),
    "keylog": (["--keylog", "k.log"], 'keylog = "k.log"', "k.log"),
    "control": (["--control", "c.sock"], 'control = "c.sock"', "c.sock"),
    "metrics_listen": (
        ["--metrics-listen", "127.0.0.1:9464"],
        'metrics_listen = "127.0.0.1:9464"',
        parse_endpoint("127.0.0.1:9464"),
    ),
    "max_connections_per_client": (
        ["--max-connections-per-client", "50"],
        "max_connections_per_client = 50",
        50,
    ),
    "new_connections_per_client": (
        ["--new-connections-per-client", "600/min"],
        'new_connections_per_client = "10/s"',
        10.0,
    ),
}


def _from_cli(*argv: str) -> ProxyConfig:
    return build_config({}, cli_overrides(build_parser().parse_args(["run", *argv])))


def _from_file(text: str) -> ProxyConfig:
    return build_config(parse_config_file(text), {})


def test_the_options_with_a_file_key_are_exactly_the_config_fields() -> None:
    assert {f.name for f in fields(ProxyConfig)} - DERIVED_FIELDS == {s.name for s in FILE_OPTIONS}
    cli_only = {s.flag for s in RUN_OPTIONS if s.file_key is None}
    assert cli_only == {"--config", "--workers", "--takeover"}
    assert set(SAMPLES) == {s.name for s in FILE_OPTIONS}, "every option needs a sample"


@pytest.mark.parametrize("name", list(SAMPLES))
def test_every_option_reads_the_same_from_the_command_line_and_the_file(name: str) -> None:
    argv, line, expected = SAMPLES[name]
    from_cli = _from_cli(*argv)
    from_file = _from_file(line)
    assert getattr(from_cli, name) == expected
    assert getattr(from_file, name) == expected
    assert expected != getattr(ProxyConfig(), name), "the sample must differ from the default"
    assert from_cli == from_file


def test_the_command_line_wins_over_the_file() -> None:
    file_values = parse_config_file("idle_timeout = 5\nmark = 3\n")
    overrides = cli_overrides(build_parser().parse_args(["run", "--idle-timeout", "9"]))
    config = build_config(file_values, overrides)
    assert (config.idle_timeout_s, config.mark) == (9.0, 3)


def test_nothing_given_is_the_defaults() -> None:
    assert _from_cli() == ProxyConfig() == _from_file("")


_BYTES_MESSAGE = (
    "{key} must be a whole number of bytes, optionally with K, M, G or T (powers of 1024), "
    'e.g. 16777216 or "16M"'
)
_DURATION_MESSAGE = (
    "capture_max_age must be seconds above 0, or a number with s, m, h or d "
    '(e.g. "45s", "30m", "12h", "7d")'
)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('mode = "nat"', 'mode must be "tproxy" or "redirect"'),
        ("listen = []", 'listen must be a non-empty list of "HOST:PORT" strings'),
        ('listen = "x"', 'listen must be a non-empty list of "HOST:PORT" strings'),
        (
            'listen = ["1.2.3:80"]',
            "listen: invalid address '1.2.3:80': '1.2.3' is not an IP address",
        ),
        ("spoof_source = 1", "spoof_source must be true or false"),
        ("mark = 0", "mark must be from 1 to 0xffffffff"),
        ('mark = "2"', "mark must be a whole number"),
        ("mark = true", "mark must be a whole number"),
        ("max_connections = 0", "max_connections must be at least 1"),
        ("max_connections = 1.5", "max_connections must be a whole number"),
        ("connect_timeout = 0", "connect_timeout must be a number of seconds above 0"),
        ('idle_timeout = "soon"', "idle_timeout must be a number of seconds above 0"),
        ("drain_timeout = true", "drain_timeout must be a number of seconds above 0"),
        ("half_closed_timeout = -1", "half_closed_timeout must be a number of seconds above 0"),
        ('log_format = "x"', 'log_format must be "text" or "json"'),
        ('relay = "x"', 'relay must be "splice" or "copy"'),
        ('loop = "x"', 'loop must be "uvloop" or "asyncio"'),
        ("capture_all = 1", "capture_all must be true or false"),
        ("capture_dir = 5", "capture_dir must be a file name"),
        ('addon = "a.py"', 'addon must be a list of file names (e.g. ["a.py", "b.py"])'),
        ('addon = ["a.py", ""]', 'addon must be a list of file names (e.g. ["a.py", "b.py"])'),
        ("addon = [1]", 'addon must be a list of file names (e.g. ["a.py", "b.py"])'),
        ("capture_max_bytes = 0", _BYTES_MESSAGE.format(key="capture_max_bytes")),
        ('capture_max_bytes = "16MB"', _BYTES_MESSAGE.format(key="capture_max_bytes")),
        ("capture_max_total = 1.5", _BYTES_MESSAGE.format(key="capture_max_total")),
        ("capture_max_total = true", _BYTES_MESSAGE.format(key="capture_max_total")),
        ("capture_max_age = 0", _DURATION_MESSAGE),
        ('capture_max_age = "1w"', _DURATION_MESSAGE),
        ("capture_max_age = false", _DURATION_MESSAGE),
        ("x = [", "not valid TOML: Invalid value (at end of document)"),
    ],
)  # fmt: skip
def test_a_bad_file_value_is_one_sentence_naming_the_key(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config_file(line)
    assert str(raised.value) == message


@pytest.mark.parametrize(
    "key", ["bogus", "workers", "config", "connect_timeout_s", "capture_max_total_bytes"]
)
def test_an_unknown_key_lists_the_known_ones(key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_config_file(f"{key} = 1")
    assert str(raised.value) == (
        f"unknown setting {key!r} (known: addon, ca, capture_all, capture_dir, capture_max_age, "
        "capture_max_bytes, capture_max_total, connect_timeout, control, drain_timeout, "
        "half_closed_timeout, idle_timeout, keylog, listen, log_format, loop, mark, "
        "max_connections, max_connections_per_client, metrics_listen, mode, "
        "new_connections_per_client, policy, "
        "relay, spoof_source, tls_handshake_timeout, upstream_ca)"
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--listen", "1.2.3:80"],
            "argument --listen: invalid address '1.2.3:80': '1.2.3' is not an IP address",
        ),
        (
            ["--listen", "1.2.3.4:99999"],
            "argument --listen: port 99999 out of range: expected 1 to 65535",
        ),
        (["--mark", "0"], "argument --mark: mark 0 out of range: expected 1 to 0xffffffff"),
        (["--mark", "x"], "argument --mark: invalid mark 'x': expected e.g. 2 or 0x2"),
        (
            ["--connect-timeout", "-1"],
            "argument --connect-timeout: invalid duration '-1': expected seconds > 0",
        ),
        (
            ["--idle-timeout", "x"],
            "argument --idle-timeout: invalid duration 'x': expected seconds > 0",
        ),
        (
            ["--max-connections", "0"],
            "argument --max-connections: invalid number '0': expected a positive integer",
        ),
        (["--workers", "0"], "argument --workers: invalid number '0': expected a positive integer"),
        (
            ["--mode", "nat"],
            "argument --mode: invalid choice: 'nat' (choose from 'tproxy', 'redirect')",
        ),
        (["--relay", "x"], "argument --relay: invalid choice: 'x' (choose from 'splice', 'copy')"),
        (["--loop", "x"], "argument --loop: invalid choice: 'x' (choose from 'uvloop', 'asyncio')"),
        (
            ["--log-format", "x"],
            "argument --log-format: invalid choice: 'x' (choose from 'text', 'json')",
        ),
        (
            ["--capture-max-bytes", "16MB"],
            "argument --capture-max-bytes: invalid size '16MB': expected a whole number of "
            "bytes, optionally with K, M, G or T (powers of 1024), e.g. 16M",
        ),
        (
            ["--capture-max-total", "0"],
            "argument --capture-max-total: invalid size '0': expected a whole number of "
            "bytes, optionally with K, M, G or T (powers of 1024), e.g. 16M",
        ),
        (
            ["--capture-max-age", "1w"],
            "argument --capture-max-age: invalid duration '1w': expected seconds above 0, or a "
            'number with s, m, h or d (e.g. "45s", "30m", "12h", "7d")',
        ),
    ],
)  # fmt: skip
def test_a_bad_command_line_value_is_one_line_naming_the_flag(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", *argv])
    assert exited.value.code == 2
    assert capsys.readouterr().err == f"tproxy run: error: {message} (see 'tproxy run --help')\n"


def test_the_example_file_sets_every_key_and_the_docs_show_it() -> None:
    example = render_example_file()
    assert set(tomllib.loads(example)) == {s.file_key for s in FILE_OPTIONS}
    config = _from_file(example)
    assert (config.spoof_source, config.max_connections) == (True, 5000)
    indented = "".join(f"    {line}\n" for line in example.splitlines())
    assert indented in (config_module.__doc__ or ""), "the module docstring's example is stale"
    assert example in README.read_text(), "README's config example is stale"


# --- reload ----------------------------------------------------------------------------------


def test_a_reload_applies_everything_when_nothing_restart_only_changed() -> None:
    running = ProxyConfig()
    loaded = _from_file('idle_timeout = 5\nlog_format = "json"\nrelay = "copy"\nmark = 9')
    assert reload_config(running, loaded) == (loaded, [])


def test_a_reload_keeps_what_changes_only_on_restart_and_names_it() -> None:
    running = ProxyConfig()
    loaded = _from_file(
        'listen = ["198.18.0.1:80"]\nloop = "asyncio"\nmode = "redirect"\nlog_format = "json"'
    )
    applied, restart_only = reload_config(running, loaded)
    assert restart_only == ["mode", "listen", "loop"]
    assert (applied.listen, applied.loop, applied.mode) == (
        running.listen,
        running.loop,
        running.mode,
    )
    assert applied.log_format is LogFormat.JSON


@pytest.mark.parametrize("name", list(SAMPLES))
def test_a_reload_applies_or_names_every_option(name: str) -> None:
    running = ProxyConfig()
    loaded = _from_file(SAMPLES[name][1])
    applied, restart_only = reload_config(running, loaded)
    spec = next(s for s in FILE_OPTIONS if s.name == name)
    if spec.reloadable:
        assert (applied, restart_only) == (loaded, [])
    else:
        assert (applied, restart_only) == (running, [spec.file_key])
    assert {s.file_key for s in FILE_OPTIONS if not s.reloadable} == {
        "mode",
        "listen",
        "loop",
        "ca",
        "keylog",
        "control",
        "metrics_listen",
    }


# --- nested tables: a toy `[[rule]]` list and an `addon` list, not shipped options ------------


class ToyAction(enum.Enum):
    ALLOW = "allow"
    RESET = "reset"


@dataclass(frozen=True)
class ToyRule:
    action: ToyAction
    to: list[Endpoint] = field(default_factory=list)
    sniff_timeout_s: float = 1.0


def _names_from_file(key: str, value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{key} must be a list of file names")
    return value


TOY_RULE = (
    option("action", choice(ToyAction), cli=False, required=True, help="what to do"),
    option("to", ENDPOINTS, cli=False, help="where to instead"),
    option("sniff_timeout_s", SECONDS, cli=False, help="how long to wait for the first bytes"),
)
TOY_OPTIONS: tuple[OptionSpec, ...] = (
    option("rule", table_list(TOY_RULE, ToyRule), cli=False, help="the policy, in order"),
    option(
        "addon",
        ValueType(_names_from_file, lambda text: text, repeatable=True),
        metavar="FILE",
        help="an addon to load, repeatable",
    ),
)

TOY_FILE = """
addon = ["a.py", "b.py"]

[[rule]]
action = "reset"

[[rule]]
action = "allow"
to = ["198.18.2.2:8080"]
sniff_timeout = 2
"""


def test_a_spec_validates_a_list_of_tables_with_their_own_fields() -> None:
    values = parse_table(TOY_OPTIONS, tomllib.loads(TOY_FILE))
    assert values == {
        "addon": ["a.py", "b.py"],
        "rule": (
            ToyRule(ToyAction.RESET),
            ToyRule(ToyAction.ALLOW, [parse_endpoint("198.18.2.2:8080")], 2.0),
        ),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\naction = "drop"', 'rule[0].action must be "allow" or "reset"'),
        (
            '[[rule]]\naction = "allow"\n[[rule]]\nto = ["x"]',
            "rule[1].to: invalid address 'x': expected HOST:PORT or [IPv6]:PORT",
        ),
        ('[[rule]]\nto = ["198.18.2.2:1"]', "rule[0].action is required"),
        (
            '[[rule]]\naction = "allow"\nbogus = 1',
            "unknown setting 'rule[0].bogus' (known: action, sniff_timeout, to)",
        ),
        (
            '[[rule]]\naction = "allow"\nsniff_timeout = 0',
            "rule[0].sniff_timeout must be a number of seconds above 0",
        ),
        ('rule = "allow"', "rule must be a list of tables ([[rule]])"),
        ("addon = [1]", "addon must be a list of file names"),
    ],
)  # fmt: skip
def test_a_bad_nested_value_names_its_table(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse_table(TOY_OPTIONS, tomllib.loads(text))
    assert str(raised.value) == message


def test_a_repeatable_spec_drives_argparse_too() -> None:
    parser = argparse.ArgumentParser()
    for spec in TOY_OPTIONS:
        if spec.flag is not None:
            _add_option(parser, spec)
    assert parser.parse_args(["--addon", "a.py", "--addon", "b.py"]).addon == ["a.py", "b.py"]
    assert parser.parse_args([]).addon is None


def test_the_readme_names_what_changes_only_on_restart() -> None:
    sighup = next(p for p in README.read_text().split("\n* ") if p.startswith("**SIGHUP**"))
    for spec in FILE_OPTIONS:
        if not spec.reloadable:
            assert f"`{spec.file_key}`" in sighup, (
                f"README's SIGHUP paragraph omits {spec.file_key}"
            )


# --- sizes and durations (the capture options) ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("1", 1), ("16777216", 16 << 20), ("16M", 16 << 20), ("16MiB", 16 << 20), ("512k", 512 << 10),
     ("1G", 1 << 30), ("1gib", 1 << 30), ("2T", 2 << 40), (" 3 K ", 3 << 10)],
)  # fmt: skip
def test_a_size_is_bytes_or_a_binary_unit(text: str, size: int) -> None:
    assert parse_bytes(text) == size
    assert _from_file(f'capture_max_bytes = "{text}"').capture_max_bytes == size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45", 45.0), ("1.5", 1.5), ("45s", 45.0), ("30m", 1800.0), ("12h", 43200.0),
     ("7d", 604800.0), ("0.5h", 1800.0)],
)  # fmt: skip
def test_a_duration_is_seconds_or_a_unit(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
    assert _from_file(f'capture_max_age = "{text}"').capture_max_age_s == seconds


@given(st.integers(min_value=1, max_value=1 << 50))
def test_a_size_reads_back_as_it_is_written(size: int) -> None:
    assert parse_bytes(render_bytes(size)) == size


@given(st.integers(min_value=1, max_value=10**7) | st.floats(min_value=0.001, max_value=1e7))
def test_a_duration_reads_back_as_it_is_written(seconds: float) -> None:
    assert parse_duration(render_duration(seconds)) == pytest.approx(seconds)


def test_capture_all_without_a_directory_is_one_sentence() -> None:
    message = "--capture-all (capture_all) needs --capture-dir (capture_dir)"
    with pytest.raises(ConfigError, match=re.escape(message)):
        _from_cli("--capture-all")
    with pytest.raises(ConfigError, match=re.escape(message)):
        _from_file("capture_all = true")


def test_the_capture_options_default_to_no_captures_and_16_mib() -> None:
    config = ProxyConfig()
    assert (config.capture_dir, config.capture_all) == (None, False)
    assert config.capture_max_bytes == 16 * 1024 * 1024
    assert (config.capture_max_total_bytes, config.capture_max_age_s) == (None, None)


@pytest.mark.parametrize(
    ("text", "per_second"),
    [("20/s", 20.0), ("600/min", 10.0), ("2.5 / sec", 2.5), ("7", 7.0), ("90/minute", 1.5)],
)
def test_a_rate_reads_per_second_or_minute(text: str, per_second: float) -> None:
    assert parse_rate(text) == per_second


@given(st.text(max_size=30))
def test_any_text_is_a_positive_finite_rate_or_a_config_error(text: str) -> None:
    try:
        rate = parse_rate(text)
    except ConfigError:
        return
    assert 0 < rate < float("inf")
