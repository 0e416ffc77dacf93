"""`tproxy reload`'s supervisor half (the control socket's `reload`): the supervisor reloads
first and asks its workers only when it applied the files (a file it refuses is offered to no
worker); the answer waits for every worker's reply (at least `RELOAD_TIMEOUT_S`, twice the
supervisor's own reload if longer), names the ones that refused with their reasons, the ones
silent past the wait as missing, and the ones that died meanwhile at once."""

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
    said = ["listen changes only on restart: kept"]
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
        "reloaded": True, "notices": said, "missing": [], "died": [], "waited_s": 20.0,
        "workers": {"1": {"reloaded": True, "notices": ["fine"]},
                    "2": {"reloaded": False, "notices": ["RuntimeError: oops"]}},
    }]  # fmt: skip


def test_a_worker_silent_past_the_timeout_is_named_missing(
    channels: SupervisorLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor_module, "RELOAD_TIMEOUT_S", 0.1)
    channels.start(1)
    channels.received(1)
    answers = _reload(channels, (True, []))
    [asked] = channels.received(1)
    assert isinstance(asked, Request)
    time.sleep(0.15)
    channels.supervisor._step()
    assert answers == [{"reloaded": True, "notices": [], "workers": {}, "missing": [1],
                        "died": [], "waited_s": 0.1}]  # fmt: skip


def test_the_workers_get_twice_as_long_as_the_supervisors_own_reload_took(
    channels: SupervisorLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker resolves the policy's names again: a slow DNS server that held the
    supervisor for a while holds each worker as long."""
    monkeypatch.setattr(supervisor_module, "RELOAD_TIMEOUT_S", 0.01)
    channels.start(1)
    channels.received(1)

    def slow_reload() -> tuple[bool, list[str]]:
        time.sleep(0.2)
        return True, []

    answers: list[dict[str, Any]] = []
    channels.supervisor._on_reload = slow_reload
    channels.supervisor._reload_for_control({"command": "reload"}, answers.append)
    [asked] = channels.received(1)
    assert isinstance(asked, Request)
    time.sleep(0.1)  # past RELOAD_TIMEOUT_S, within twice the supervisor's 0.2 s
    channels.supervisor._step()
    assert answers == []
    channels.ends[1].send(encode(Reply(asked.id, 1, {"reloaded": True, "notices": []})))
    channels.supervisor._step()
    [answer] = answers
    assert answer["workers"] == {"1": {"reloaded": True, "notices": []}}, answer
    assert answer["missing"] == [] and answer["waited_s"] >= 0.4, answer


def test_a_worker_that_dies_meanwhile_is_named_as_died_at_once(
    channels: SupervisorLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    channels.start(1)
    channels.start(2)
    channels.received(1), channels.received(2)
    answers = _reload(channels, (True, []))
    [asked] = channels.received(1)
    assert isinstance(asked, Request)
    channels.ends[1].send(encode(Reply(asked.id, 1, {"reloaded": True, "notices": []})))
    monkeypatch.setattr(supervisor_module, "_reap", lambda: [(1002, 9)])  # SIGKILLed
    channels.supervisor._step()
    assert answers == [{"reloaded": True, "notices": [], "missing": [], "died": [2],
                        "waited_s": 20.0,
                        "workers": {"1": {"reloaded": True, "notices": []}}}]  # fmt: skip


def test_a_stopping_proxy_reloads_nothing(channels: SupervisorLab) -> None:
    channels.start(1)
    channels.received(1)
    channels.supervisor._stopping = True
    answers = _reload(channels, (True, []))
    assert answers == [{"reloaded": False, "notices": ["it is stopping: nothing reloaded"]}]
    assert channels.received(1) == []
