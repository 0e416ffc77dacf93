"""The command line's parsing and messages, with nothing that could touch this machine's network.

Every rules action is replaced by a stub that fails the test if reached: these tests run in the
test machine's own network namespace, so they must be unable to change nftables, routing or
sysctls there. What the rules actions print and do is tested in namespaces of their own
(tests/integration/test_rules_*.py).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

import tproxy.cli.main
from tproxy.cli.main import build_parser, main
from tproxy.core.config import RUN_OPTIONS


@pytest.fixture(autouse=True)
def _no_rules_actions(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> NoReturn:
        pytest.fail("a unit test reached a rules action, in the host's network namespace")

    for action in ("apply_rules", "plan_rules", "remove_rules", "show_rules"):
        monkeypatch.setattr(tproxy.cli.main, action, refuse)


@pytest.mark.parametrize(
    "argv",
    [
        ["run", "--listen", "1.2.3:80"],
        ["run", "--listen", "1.2.3.4:99999"],
        ["run", "--mark", "0"],
        ["run", "--connect-timeout", "-1"],
        ["run", "--bogus"],
        ["rules", "apply", "--ports", "70000"],
        ["rules", "apply", "--ports", "80", "--mode", "redirect", "--when-down", "pass"],
        ["rules", "apply", "--ports", "80", "--mode", "redirect", "--bridge", "br0"],
        ["rules", "apply", "--ports", "80", "--bridge", "no/such"],
        ["rules", "apply", "--ports", "443", "--exclude", "198.18.2.1/24"],
        ["rules", "apply", "--ports", "443", "--exclude", "2001:db8:2::1/64", "--dry-run"],
        ["rules", "apply", "--ports", "443", "--exclude", "198.18.2.0/33"],
        ["rules", "apply", "--ports", "443", "--exclude", "lan"],
        ["run", "--mode", "nat"],
        ["doctor", "--proxy-port", "0"],
        ["rules", "apply"],
        ["rules", "explode"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_input_is_one_line_and_status_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(argv)
    except SystemExit as exited:  # argparse's own checks
        code = exited.code  # type: ignore[assignment]
    assert code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "error:" in err


# The options each command's help must explain; `run`'s are its option table.
MAIN_OPTIONS = {
    (): ["--version", "run", "rules", "doctor", "lab"],
    ("run",): [*(spec.flag for spec in RUN_OPTIONS if spec.flag is not None), "--user"],
    ("rules", "apply"): ["--ports", "--proxy-port", "--mark", "--divert-mark", "--table",
                         "--rule-priority", "--when-down", "--mode", "--local", "--bridge",
                         "--exclude", "--block-quic", "--dry-run"],
    ("doctor",): ["--mode", "--bridge", "--proxy-port", "--divert-mark", "--table",
                  "--max-connections", "--json"],
    ("lab",): ["--keep-going", "--bridge"],
}  # fmt: skip


def _help_texts(command: tuple[str, ...]) -> dict[str, str]:
    """Each option (or subcommand) of `command` and its help text, from the parser itself."""
    parser = build_parser()
    for name in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    texts: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            texts.update({c.dest: c.help or "" for c in action._choices_actions})
        for flag in action.option_strings:
            texts[flag] = action.help or ""
    return texts


def _squashed(text: str) -> str:
    """Without whitespace: argparse wraps lines (and breaks after hyphens) where it likes."""
    return "".join(text.split())


@pytest.mark.parametrize("command", list(MAIN_OPTIONS), ids=lambda c: " ".join(c) or "tproxy")
def test_help_explains_the_options(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['tproxy', *command])} ")
    texts = _help_texts(command)
    if command == ("run",):
        own = {spec.flag: spec.help for spec in RUN_OPTIONS if spec.flag is not None}
        texts = {**own, "--user": texts["--user"]}
    for option in MAIN_OPTIONS[command]:
        assert len(texts.get(option, "")) > 10, f"{option} has no help text"
        assert _squashed(f"{option}") in _squashed(out), f"--help does not name {option}"
        assert _squashed(texts[option]) in _squashed(out), f"--help does not explain {option}"


def test_spoofing_in_redirect_mode_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--mode", "redirect", "--spoof-source"]) == 1
    err = capsys.readouterr().err
    assert "not available in redirect mode" in err and len(err.strip().splitlines()) == 1


def test_more_workers_than_session_ids_have_room_for_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["run", "--workers", "1024"]) == 1
    assert "--workers 1024 is more than tproxy runs (1023 at most)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read policy {path}: No such file or directory"),
        ('[[rule]]\nname = "m"\naction = "redirect"\n',
         '{path}: rule[0] (m).to is required with action = "redirect"'),
    ],
)  # fmt: skip
def test_a_policy_that_cannot_be_loaded_stops_the_start_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, message: str
) -> None:
    path = tmp_path / "policy.toml"
    if text is not None:
        path.write_text(text)
    assert main(["run", "--policy", str(path), "--listen", "127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message.format(path=path) in err, err


def test_output_into_a_pipe_whose_reader_left_ends_quietly(tmp_path: Path) -> None:
    """`tproxy ca show DIR | head -1`: the reader exits early; no traceback, status 0."""
    assert main(["ca", "create", str(tmp_path / "ca")]) == 0
    reader, writer = os.pipe()
    os.close(reader)  # the reader has gone before anything is written
    done = subprocess.run(
        [sys.executable, "-m", "tproxy", "ca", "show", str(tmp_path / "ca")],
        stdout=writer, stderr=subprocess.PIPE, check=False,
    )  # fmt: skip
    os.close(writer)
    assert (done.returncode, done.stderr) == (0, b"")
