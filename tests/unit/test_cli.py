from __future__ import annotations

import pytest

from tproxy.cli.main import main


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


def test_dry_run_needs_no_root_and_prints_the_ruleset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "apply", "--ports", "80", "--dry-run", "--when-down", "pass"]) == 0
    out = capsys.readouterr().out
    assert "tproxy to :1800" in out
    assert "reject" not in out


def test_spoofing_in_redirect_mode_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--mode", "redirect", "--spoof-source"]) == 1
    err = capsys.readouterr().err
    assert "not available in redirect mode" in err and len(err.strip().splitlines()) == 1


def test_dry_run_of_redirect_mode_prints_nat_and_no_policy_routing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["rules", "apply", "--ports", "80", "--mode", "redirect", "--local",
                 "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "redirect to :1800" in out and "type nat hook output" in out
    assert "ip -4 rule" not in out
