"""`tproxy policy check` and `tproxy policy explain`: no root, one line per error, exit 2 for a
bad file and 0 otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_policy_model import EXAMPLE
from tproxy.cli.main import main


def _run(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exited:  # argparse's own checks
        return exited.code  # type: ignore[return-value]


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(EXAMPLE)
    return path


def test_check_a_valid_file(example: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["policy", "check", str(example)]) == 0
    assert capsys.readouterr().out == "3 rules, default allow\n"


def test_check_one_rule_default_reset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.toml"
    path.write_text('default = "reset"\n[[rule]]\nname = "a"\naction = "allow"\n')
    assert _run(["policy", "check", str(path)]) == 0
    assert capsys.readouterr().out == "1 rule, default reset\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nname = "x"\naction = "allow"\nfoo = 1\n', "unknown setting 'rule[0] (x).foo'"),
        ('[[rule]]\nname = "x"\naction = "allow"\ndst = ["300.0.0.0/8"]\n', "rule[0] (x).dst:"),
        ('[[rule]]\nname = "x"\naction = "allow"\nports = ["5-1"]\n', "rule[0] (x).ports:"),
        ('[[rule]]\nname = "x"\naction = "allow"\n[[rule]]\nname = "x"\naction = "reset"\n',
         "rule[1] (x).name is a duplicate"),
        ('[[rule]]\nname = "x"\naction = "redirect"\n', "rule[0] (x).to is required"),
        ('[[rule]]\nname = "x"\naction = "via"\nvia = "gopher://a:1"\n', "unknown proxy scheme"),
        ('[[rule]]\nname = "x"\naction = "reset"\nremote_name = true\n', "rule[0] (x).remote_name"),
        ('[[rule]]\nname = "x"\naction = "reset"\ncapture = true\n',
         "rule[0] (x).capture is only for an action that connects"),
        ("default = [", "not valid TOML"),
    ],
)  # fmt: skip
def test_check_an_invalid_file_is_one_line_and_status_2(
    tmp_path: Path, text: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    assert _run(["policy", "check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    (line,) = captured.err.splitlines()
    assert line.startswith(f"tproxy policy check: error: {path}: ")
    assert message in line


@pytest.mark.parametrize("name", ["missing.toml", "."])
def test_check_an_unreadable_file_is_status_2(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["policy", "check", str(tmp_path / name)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "cannot read" in line


def test_check_a_file_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "p.toml"
    path.write_bytes(b'default = "\xff"\n')
    assert _run(["policy", "check", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "first_line"),
    [
        (["--dst", "1.2.3.4:443", "--sni", "x.ADS.example."], "reset (rule 'no-ads')"),
        (["--dst", "1.2.3.4:9009", "--proto", "silent"],
         "redirect to 198.18.2.2:9000 (rule 'mirror')"),
        (["--dst", "[2001:db8:2::1]:80", "--host", "a.example"],
         "via socks5://198.18.2.2:1080 asking it for the sniffed name (rule 'out-via-socks')"),
        (["--dst", "1.2.3.4:80", "--sni", "a.example"], "allow (the default: no rule matches)"),
        (["--dst", "1.2.3.4:443"], "waits for the client's first bytes (rule 'no-ads' needs"),
    ],
)  # fmt: skip
def test_explain_prints_the_deciding_rule_and_why(
    example: Path, args: list[str], first_line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["policy", "explain", str(example), "--client", "10.0.0.1", *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(first_line)
    assert out[1].startswith("  rule 'no-ads': ")  # then why, rule by rule


def test_explain_says_a_capturing_rule_captures(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[[rule]]\nname = "tv"\nclient = ["198.18.1.23/32"]\naction = "allow"\n'
                    "capture = true\n")  # fmt: skip
    argv = ["policy", "explain", str(path), "--client", "198.18.1.23", "--dst", "198.18.2.2:443"]
    assert _run(argv) == 0
    assert capsys.readouterr().out.splitlines()[0] == (
        "allow, captured (with --capture-dir) (rule 'tv')"
    )


def test_explain_without_facts_also_says_what_silence_gets(
    example: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["policy", "explain", str(example), "--client", "10.0.0.1", "--dst", "1.2.3.4:9009"]
    assert _run(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "  rule 'no-ads': addresses match, needs sniffed facts"
    assert out[2] == (
        "if the client sends nothing within 1 s: redirect to 198.18.2.2:9000 (rule 'mirror')"
    )
    assert out[3:] == ["  rule 'no-ads': sni does not match", "  rule 'mirror': matches"]


@pytest.mark.parametrize(
    "args",
    [
        ["--client", "nope", "--dst", "1.2.3.4:1"],
        ["--client", "10.0.0.1", "--dst", "1.2.3.4"],
        ["--client", "10.0.0.1", "--dst", "1.2.3.4:1", "--proto", "quic"],
        ["--dst", "1.2.3.4:1"],
    ],
)
def test_explain_bad_arguments_are_one_line_and_status_2(
    example: Path, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["policy", "explain", str(example), *args]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_explain_an_invalid_file_is_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "p.toml"
    path.write_text("bogus = 1\n")
    argv = ["policy", "explain", str(path), "--client", "10.0.0.1", "--dst", "1.2.3.4:1"]
    assert _run(argv) == 2
    assert "unknown setting 'bogus'" in capsys.readouterr().err


def test_the_readme_example_is_a_valid_policy_that_decides_as_it_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("## Policies:") :]
    text = section[section.index("```toml\n") + 8 : section.index("```\n", 8)]
    path = tmp_path / "policy.toml"
    path.write_text(text)
    assert _run(["policy", "check", str(path)]) == 0
    assert capsys.readouterr().out == "4 rules, default allow\n"
    cases = [
        (["--dst", "198.18.2.2:25"], "allow (rule 'mail-and-db')"),
        (["--dst", "198.18.2.2:443", "--sni", "WWW.Ads.Example."], "reset (rule 'no-ads')"),
        (["--dst", "198.18.2.2:443", "--sni", "example.org"],
         "via socks5://198.18.2.2:1080 asking it for the sniffed name (rule 'lab-via-socks')"),
        (["--dst", "198.18.2.2:9005", "--client", "198.18.9.9"],
         "redirect to 198.18.2.2:9000 (rule 'mirror')"),
    ]  # fmt: skip
    for args, first_line in cases:
        argv = ["policy", "explain", str(path), "--client", "198.18.1.2", *args]
        assert _run(argv) == 0
        assert capsys.readouterr().out.splitlines()[0] == first_line, args
