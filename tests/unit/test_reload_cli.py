"""`tproxy reload`: the answer read into lines and an exit status (done only when the supervisor
and every worker applied the files), any JSON read without raising, the notices escaped; and
the command against a fake control socket (exit 0 with the notices on stdout, 1 with them on
stderr, one line when nothing answers)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_top_cli import FakeProxy
from tproxy.cli.main import main
from tproxy.cli.reload import describe_reload

RELOADED = {
    "ok": True, "reloaded": True,
    "notices": ["listen changes only on restart: kept"],
    "workers": {
        "1": {"reloaded": True, "notices": ["listen changes only on restart: kept",
                                            "reloaded the configuration (max connections 5000)"]},
        "2": {"reloaded": True, "notices": [
            "reload: keeping the running TLS interception: --upstream-ca: no such file",
            "reloaded the configuration (max connections 5000)"]},
    },
    "missing": [], "died": [], "waited_s": 20.0,
}  # fmt: skip
WHY = "reload failed, keeping the running configuration: rule[3] (x).to is required"
REFUSED = {"ok": True, "reloaded": False, "notices": [WHY]}


def test_done_says_the_supervisors_notices_what_a_worker_adds_and_how_many_reloaded() -> None:
    assert describe_reload(RELOADED) == (True, [
        "listen changes only on restart: kept",
        "worker 2: reload: keeping the running TLS interception: --upstream-ca: no such file",
        "reloaded the configuration in 2 workers",
    ])  # fmt: skip


def test_refused_by_the_supervisor_is_not_done() -> None:
    assert describe_reload(REFUSED) == (False, [WHY])


def test_a_worker_that_refused_or_never_answered_makes_it_not_done() -> None:
    answer = {**RELOADED, "workers": {"1": {"reloaded": False, "notices": ["BrokenError: x"]},
                                      "12": {"reloaded": True, "notices": []}},
              "missing": [3, 4], "waited_s": 31.5}  # fmt: skip
    assert describe_reload(answer) == (False, [
        "listen changes only on restart: kept",
        "worker 1 kept its running configuration: BrokenError: x",
        "workers 3, 4 did not confirm the reload within 31.5 s",
        "reloaded the configuration in 1 of 4 workers",
    ])  # fmt: skip


def test_a_worker_that_died_meanwhile_is_replaced_with_the_new_configuration() -> None:
    answer = {**RELOADED, "workers": {"1": {"reloaded": True, "notices": []}}, "died": [2]}
    assert describe_reload(answer) == (True, [
        "listen changes only on restart: kept",
        "worker 2 stopped during the reload: a worker started in place of one runs the new "
        "configuration",
        "reloaded the configuration in 1 of 2 workers",
    ])  # fmt: skip


def test_no_worker_running_is_done_for_those_started_next() -> None:
    done, lines = describe_reload({**RELOADED, "workers": {}})
    assert done and lines[-1].startswith("reloaded the configuration (no worker was running")


def test_terminal_controls_in_a_notice_are_escaped() -> None:
    answer = {"reloaded": False, "notices": ["bad name 'a\x1b[2J\nb'"]}
    assert describe_reload(answer) == (False, ["bad name 'a\\x1b[2J\\x0ab'"])


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.sampled_from(["reloaded", "notices", "workers", "missing", "x"]), JSON))
def test_any_answer_is_read_without_raising(answer: dict[str, Any]) -> None:
    done, lines = describe_reload(answer)
    assert isinstance(done, bool) and all(isinstance(line, str) for line in lines)
    assert done is False or answer.get("reloaded") is True


@given(st.dictionaries(st.text(max_size=3), JSON, max_size=3), JSON)
def test_any_workers_and_missing_are_read_without_raising(workers: Any, missing: Any) -> None:
    describe_reload({**RELOADED, "workers": workers, "missing": missing, "died": missing})


@pytest.fixture
def socket_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "control.sock"


def test_the_command_prints_the_notices_and_its_status_says_done(
    socket_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    answers: list[tuple[dict[str, Any], int]] = [(RELOADED, 0), (REFUSED, 1)]
    for answer, status in answers:

        def respond(_command: str, _count: int, answer: dict[str, Any] = answer) -> dict[str, Any]:
            return answer

        fake = FakeProxy(socket_path, respond)
        try:
            assert main(["reload", "--control", str(socket_path)]) == status
        finally:
            fake.stop()
        assert fake.asked == {"reload": 1}
        out, err = capsys.readouterr()
        if status == 0:
            assert out.splitlines()[-1] == "reloaded the configuration in 2 workers" and not err
        else:
            assert out == ""
            assert err == f"tproxy: {WHY}\n"


def test_the_config_files_control_key_says_where_to_ask(tmp_path: Path) -> None:
    socket_path = tmp_path / "elsewhere.sock"
    config = tmp_path / "tproxy.toml"
    config.write_text(f'control = "{socket_path}"\nworkers = 2\n')
    fake = FakeProxy(socket_path, lambda _command, _count: RELOADED)
    try:
        assert main(["reload", "--config", str(config)]) == 0
        assert fake.asked == {"reload": 1}
    finally:
        fake.stop()


def test_an_older_tproxy_without_the_command_gets_a_hint(
    socket_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeProxy(socket_path, lambda _c, _n: {"ok": False, "error": "unknown command 'reload'"})
    try:
        assert main(["reload", "--control", str(socket_path)]) == 1
    finally:
        fake.stop()
    assert "send it SIGHUP, or restart it" in capsys.readouterr().err


def test_nothing_answering_is_one_line_and_status_1(
    socket_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["reload", "--control", str(socket_path)]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "no tproxy answers on the control socket" in err[0], err
