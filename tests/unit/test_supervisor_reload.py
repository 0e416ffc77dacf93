"""`tproxy reload`'s supervisor half (the control socket's `reload`): the supervisor reloads
first and asks its workers only when it applied the files (a refused file is refused by all,
nothing half-applied); the answer waits for every worker's reply, names the ones that refused
with their reasons, and the ones silent past the timeout as missing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.unit.test_supervisor_passthrough import _Lab
from tproxy.core.worker_protocol import Reply, Request, encode
from tproxy.engine import supervisor as supervisor_module


@pytest.fixture
def lab(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Lab]:
    monkeypatch.setattr(supervisor_module, "_reap", list)  # no children to reap here
    monkeypatch.setattr(supervisor_module, "TICK_S", 0.0)
    built = _Lab()
    try:
        yield built
    finally:
        built.close()


def _reload(lab: _Lab, outcome: tuple[bool, list[str]]) -> list[dict[str, Any]]:
    """Ask the supervisor to reload, its own part giving `outcome`; the answers so far."""
    answers: list[dict[str, Any]] = []
    lab.supervisor._on_reload = lambda: outcome
    lab.supervisor._reload_for_control({"command": "reload"}, answers.append)
    return answers


def test_a_file_the_supervisor_refuses_is_answered_at_once_and_no_worker_is_asked(
    lab: _Lab,
) -> None:
    lab.start(1)
    lab.start(2)
    lab.received(1), lab.received(2)  # (what a started worker gets first)
    why = "reload failed, keeping the running configuration: policy.toml: rule[3] (x).to"
    answers = _reload(lab, (False, [why]))
    assert answers == [{"reloaded": False, "notices": [why]}]
    lab.supervisor._step()
    assert lab.received(1) == lab.received(2) == []


def test_the_answer_waits_for_every_worker_and_says_who_refused_and_why(lab: _Lab) -> None:
    lab.start(1)
    lab.start(2)
    lab.received(1), lab.received(2)
    said = ["reloaded the configuration in 2 workers"]
    answers = _reload(lab, (True, said))
    [asked_1] = lab.received(1)
    [asked_2] = lab.received(2)
    assert isinstance(asked_1, Request) and asked_1.command == "reload" and asked_2 == asked_1
    lab.ends[1].send(encode(Reply(asked_1.id, 1, {"reloaded": True, "notices": ["fine"]})))
    lab.supervisor._step()
    assert answers == []  # worker 2 has not answered yet
    lab.ends[2].send(encode(Reply(asked_1.id, 2, error="RuntimeError: oops")))
    lab.supervisor._step()
    assert answers == [{
        "reloaded": True, "notices": said, "missing": [],
        "workers": {"1": {"reloaded": True, "notices": ["fine"]},
                    "2": {"reloaded": False, "notices": ["RuntimeError: oops"]}},
    }]  # fmt: skip


def test_a_worker_silent_past_the_timeout_is_named_missing(
    lab: _Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "RELOAD_TIMEOUT_S", 0.05)
    lab.start(1)
    lab.received(1)
    answers = _reload(lab, (True, []))
    [asked] = lab.received(1)
    assert isinstance(asked, Request)
    time.sleep(0.1)
    lab.supervisor._step()
    assert answers == [{"reloaded": True, "notices": [], "workers": {}, "missing": [1]}]


def test_a_stopping_proxy_reloads_nothing(lab: _Lab) -> None:
    lab.start(1)
    lab.received(1)
    lab.supervisor._stopping = True
    answers = _reload(lab, (True, []))
    assert answers == [{"reloaded": False, "notices": ["it is stopping: nothing reloaded"]}]
    assert lab.received(1) == []
