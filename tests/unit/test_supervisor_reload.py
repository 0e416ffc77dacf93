"""`tproxy reload`'s supervisor half (the control socket's `reload`): the supervisor reloads
first and asks its workers only when it applied the files (a refused file is refused by all,
nothing half-applied); the answer waits for every worker's reply, names the ones that refused
with their reasons, and the ones silent past the timeout as missing."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.unit.conftest import SupervisorLab
from tproxy.core.worker_protocol import Reply, Request, encode
from tproxy.engine import supervisor as supervisor_module


def _reload(channels: SupervisorLab, outcome: tuple[bool, list[str]]) -> list[dict[str, Any]]:
    """Ask the supervisor to reload, its own part giving `outcome`; the answers so far."""
    answers: list[dict[str, Any]] = []
    channels.supervisor._on_reload = lambda: outcome
    channels.supervisor._reload_for_control({"command": "reload"}, answers.append)
    return answers


def test_a_file_the_supervisor_refuses_is_answered_at_once_and_no_worker_is_asked(
    channels: SupervisorLab,
) -> None:
    channels.start(1)
    channels.start(2)
    channels.received(1), channels.received(2)  # (what a started worker gets first)
    why = "reload failed, keeping the running configuration: policy.toml: rule[3] (x).to"
    answers = _reload(channels, (False, [why]))
    assert answers == [{"reloaded": False, "notices": [why]}]
    channels.supervisor._step()
    assert channels.received(1) == channels.received(2) == []


def test_the_answer_waits_for_every_worker_and_says_who_refused_and_why(
    channels: SupervisorLab,
) -> None:
    channels.start(1)
    channels.start(2)
    channels.received(1), channels.received(2)
    said = ["reloaded the configuration in 2 workers"]
    answers = _reload(channels, (True, said))
    [asked_1] = channels.received(1)
    [asked_2] = channels.received(2)
    assert isinstance(asked_1, Request) and asked_1.command == "reload" and asked_2 == asked_1
    channels.ends[1].send(encode(Reply(asked_1.id, 1, {"reloaded": True, "notices": ["fine"]})))
    channels.supervisor._step()
    assert answers == []  # worker 2 has not answered yet
    channels.ends[2].send(encode(Reply(asked_1.id, 2, error="RuntimeError: oops")))
    channels.supervisor._step()
    assert answers == [{
        "reloaded": True, "notices": said, "missing": [],
        "workers": {"1": {"reloaded": True, "notices": ["fine"]},
                    "2": {"reloaded": False, "notices": ["RuntimeError: oops"]}},
    }]  # fmt: skip


def test_a_worker_silent_past_the_timeout_is_named_missing(
    channels: SupervisorLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "RELOAD_TIMEOUT_S", 0.05)
    channels.start(1)
    channels.received(1)
    answers = _reload(channels, (True, []))
    [asked] = channels.received(1)
    assert isinstance(asked, Request)
    time.sleep(0.1)
    channels.supervisor._step()
    assert answers == [{"reloaded": True, "notices": [], "workers": {}, "missing": [1]}]


def test_a_stopping_proxy_reloads_nothing(channels: SupervisorLab) -> None:
    channels.start(1)
    channels.received(1)
    channels.supervisor._stopping = True
    answers = _reload(channels, (True, []))
    assert answers == [{"reloaded": False, "notices": ["it is stopping: nothing reloaded"]}]
    assert channels.received(1) == []
