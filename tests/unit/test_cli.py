"""The command line's parsing and messages, with nothing that could touch this machine's network.

Every rules action is replaced by a stub that fails the test if reached: these tests run in the
test machine's own network namespace, so they must be unable to change nftables, routing or
sysctls there. What the rules actions print and do is tested in namespaces of their own
(tests/integration/test_rules_*.py).
"""

from __future__ import annotations

from typing import NoReturn

import pytest

import tproxy.cli.main
from tproxy.cli.main import main


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


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["run", "--help"], ["rules", "apply", "--help"], ["lab", "--help"],
     ["doctor", "--help"]],
)  # fmt: skip
def test_help_explains_the_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    assert "usage: tproxy" in capsys.readouterr().out


def test_spoofing_in_redirect_mode_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--mode", "redirect", "--spoof-source"]) == 1
    err = capsys.readouterr().err
    assert "not available in redirect mode" in err and len(err.strip().splitlines()) == 1
