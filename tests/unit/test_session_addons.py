"""Addons' `session_start` and `session_end` called by the engine (issue 12, step 2), on loopback
sockets with fake addons: a verdict replaces the policy's, addons run in order and the first
verdict wins, an exception resets only its session (`addon_error`, one event naming the addon
and hook), an `async def` hook pauses only its own session and is bounded in time, a session
closed meanwhile cancels it, and `session_end` sees the byte counts and the reason."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any, cast

import pytest
import uvloop

import tproxy.cli.main as cli_main
import tproxy.engine.session as session_module
from tests.unit.test_session_phases import _phase, _until
from tests.unit.test_session_policy import (
    ALLOWED_REQUEST,
    HTTP_REQUEST,
    PolicyHarness,
    _accepted,
    _config,
    _recv_all,
    _run,
)
from tproxy.addons import api
from tproxy.addons.loader import Addon, Addons, Hook
from tproxy.core.config import ProxyConfig
from tproxy.core.reasons import CloseReason
from tproxy.core.session import SessionRecord
from tproxy.engine.addon_session import AddonSession, engine_verdict, hook_error
from tproxy.engine.session import Phase, Session
from tproxy.engine.tls_relay import Interception
from tproxy.interception.sockopts import abort_socket
from tproxy.policy.decide import Verdict
from tproxy.policy.model import Action, TLSMode
from tproxy.tls.passthrough import PassthroughReason

HookFn = Callable[..., Any]


def _addon(name: str, sniff: bool = False, **hooks: HookFn) -> Addon:
    return Addon(name, name, tuple(
        Hook(name, hook, fn, asyncio.iscoroutinefunction(fn)) for hook, fn in hooks.items()
    ), sniff)  # fmt: skip


def _with(*addons: Addon, base: ProxyConfig | None = None) -> ProxyConfig:
    base = base or ProxyConfig()
    return ProxyConfig(matcher=base.matcher, addons=Addons.of(addons))


def _sleeping_hook(cancelled: list[bool]) -> HookFn:
    """An `async def session_start` that sleeps 10 s, noting in `cancelled` if it is cancelled."""

    async def start(session: api.Session) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    return start


async def _relay_once(h: PolicyHarness, session: Session | None = None) -> None:
    """Send the allowed request up and a reply down, then end both sides cleanly."""
    session = session or h.session
    conn = await _accepted(h)
    h.client.send(ALLOWED_REQUEST)
    assert await _recv_all(conn, len(ALLOWED_REQUEST)) == ALLOWED_REQUEST
    conn.send(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert await _recv_all(h.client, 27) == b"HTTP/1.1 204 No Content\r\n\r\n"
    conn.close()
    h.client.close()
    await _until(lambda: _phase(session) is Phase.CLOSED)


async def _reset_seen(h: PolicyHarness) -> None:
    await _until(lambda: _phase(h.session) is Phase.CLOSED)
    h.client.settimeout(5)
    with pytest.raises(ConnectionResetError):
        h.client.recv(1)
    assert h.upstream_accept() is None, "connected although reset"


def test_the_session_object_is_an_api_session() -> None:
    record = SessionRecord("01kbj9dq70102", "198.18.1.2:40000", "[2001:db8::2]:443", 0.0)
    session: api.Session = AddonSession(record, None, "allow")  # mypy checks the protocol
    assert (session.id, session.client, session.dst) == (
        "01kbj9dq70102", ("198.18.1.2", 40000), ("2001:db8::2", 443),
    )  # fmt: skip
    assert (session.rule, session.action, session.sniffed, session.tls) == (
        None, "allow", None, None,
    )  # fmt: skip
    record.bytes_up, record.bytes_down = 5, 7
    assert (session.bytes_up, session.bytes_down, session.reason) == (5, 7, None)
    with pytest.raises(RuntimeError, match="only for claimed sessions"):
        session.send_to_client(b"x")
    with pytest.raises(RuntimeError, match="for session_start"):
        session.claim()  # outside session_start: no addon to claim it for


def test_verdicts_become_the_engines_with_the_addon_as_rule() -> None:
    assert engine_verdict(None, "a.py") is None
    verdict = engine_verdict(api.redirect("198.18.2.2:80"), "a.py")
    assert verdict is not None and verdict.rule == "addon:a.py"
    assert verdict.to is not None and verdict.to.host == "198.18.2.2"
    assert engine_verdict(api.via("socks5://[2001:db8::9]:1080"), "a.py") is not None
    with pytest.raises(ValueError, match="IP addresses only"):
        engine_verdict(api.redirect("mirror.example:80"), "a.py")
    with pytest.raises(ValueError, match="IP addresses only"):
        engine_verdict(api.via("http://proxy.example:3128"), "a.py")
    with pytest.raises(TypeError, match="returned str"):
        engine_verdict("reset", "a.py")


def test_a_hooks_error_is_one_escaped_bounded_line() -> None:
    assert hook_error(ValueError("boom")) == "ValueError: boom"
    assert hook_error(KeyError()) == "KeyError"
    text = hook_error(RuntimeError("evil\n\x1b[2Jname\\" + "x" * 1000))
    assert text.startswith("RuntimeError: evil\\x0a\\x1b[2Jname\\x5c")
    assert len(text) <= 300 and "\n" not in text


def test_an_addon_reset_replaces_the_policys_allow() -> None:
    seen: list[api.Session] = []

    def start(session: api.Session) -> api.Verdict:
        seen.append(session)
        return api.reset()

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await _reset_seen(h)
        close = h.events()[-1]
        assert (close["reason"], close["rule"], close["action"], close["relay"]) == (
            "policy_reset", "addon:block.py", "reset", None,
        )  # fmt: skip
        # What the policy said is what the addon saw.
        assert (seen[0].rule, seen[0].action, seen[0].sniffed) == (None, "allow", None)
        assert not any(e["event"] == "upstream_connected" for e in h.events())

    _run(scenario, _with(_addon("block.py", session_start=start)))


def test_addons_run_in_order_and_the_first_verdict_wins() -> None:
    calls: list[str] = []

    def hook(name: str, answer: api.Verdict | None) -> HookFn:
        def start(session: api.Session) -> api.Verdict | None:
            calls.append(name)
            return answer

        return start

    config = _with(
        _addon("quiet.py", session_start=hook("quiet", None)),
        _addon("first.py", session_start=hook("first", api.allow())),
        _addon("late.py", session_start=hook("late", api.reset())),  # observes only
    )

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await _relay_once(h)
        assert calls == ["quiet", "first", "late"]
        close = h.events()[-1]
        assert (close["reason"], close["rule"], close["action"]) == (
            "closed", "addon:first.py", "allow",
        )  # fmt: skip

    _run(scenario, config)


def test_an_addon_allows_what_the_policy_would_redirect_and_redirects_to_an_ip() -> None:
    async def scenario(h: PolicyHarness) -> None:
        port = h.upstream.getsockname()[1]

        def start(session: api.Session) -> api.Verdict:
            assert (session.rule, session.action) == ("elsewhere", "redirect")
            return api.redirect(f"127.0.0.1:{port}")

        h.ctx.config = _with(_addon("r.py", session_start=start), base=_config(
            '[[rule]]\nname = "elsewhere"\naction = "redirect"\nto = "127.0.0.1:1"'))  # fmt: skip
        h.session.start()
        await _relay_once(h)
        close = h.events()[-1]
        assert (close["reason"], close["rule"], close["action"], close["upstream"]) == (
            "closed", "addon:r.py", "redirect", f"127.0.0.1:{port}",
        )  # fmt: skip

    _run(scenario, ProxyConfig())


def test_a_policy_reset_runs_no_addon() -> None:
    calls: list[str] = []
    config = _with(
        _addon("a.py", session_start=lambda s: calls.append("start"),
               session_end=lambda s: calls.append("end")),
        base=_config('[[rule]]\nname = "no"\naction = "reset"'),
    )  # fmt: skip

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await _reset_seen(h)
        assert calls == []
        assert (h.events()[-1]["reason"], h.events()[-1]["rule"]) == ("policy_reset", "no")

    _run(scenario, config)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (ValueError("boom\nsecond line"), "ValueError: boom\\x0asecond line"),
        ("reset", "TypeError: session_start returned str"),
        (api.redirect("mirror.example:80"), "ValueError: redirect to mirror.example:80"),
    ],
)
def test_a_hook_that_raises_or_answers_nonsense_resets_only_its_session(
    answer: object, error: str
) -> None:
    ends: list[str | None] = []

    def start(session: api.Session) -> object:
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await _reset_seen(h)
        events = h.events()
        assert [e["event"] for e in events] == ["session_open", "session_error", "session_close"]
        failed, close = events[1], events[2]
        assert (failed["addon"], failed["hook"]) == ("bad.py", "session_start")
        assert failed["error"].startswith(error), failed
        assert close["reason"] == "addon_error"
        assert ends == ["addon_error"]  # session_start ran: session_end too
        # The next session runs normally.
        h2 = PolicyHarness(h.ctx.config)
        try:
            h2.session.start()
            await _relay_once(h2)
        finally:
            h2.close()

    state = {"calls": 0}  # only the first session is given the bad answer

    def first_only(session: api.Session) -> object:
        state["calls"] += 1
        return start(session) if state["calls"] == 1 else None

    config = _with(
        _addon("bad.py", session_start=first_only, session_end=lambda s: ends.append(s.reason))
    )
    _run(scenario, config)


def test_session_end_sees_the_counts_the_reason_and_the_sniffed_facts() -> None:
    ended: list[tuple[Any, ...]] = []

    def end(session: api.Session) -> None:
        sniffed = session.sniffed
        ended.append((session.reason, session.bytes_up, session.bytes_down,
                      None if sniffed is None else sniffed.http_host,
                      session.state.get("mine")))  # fmt: skip

    def start(session: api.Session) -> None:
        session.state["mine"] = 42

    def broken_end(session: api.Session) -> None:
        raise OSError("disk full")

    config = _with(
        _addon("a.py", session_start=start, session_end=end),
        _addon("b.py", session_end=broken_end),  # logged; changes nothing else
    )

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await _relay_once(h)
        assert ended == [("closed", len(ALLOWED_REQUEST), 27, "www.example.test", 42)]
        events = h.events()
        failed = [e for e in events if e["event"] == "session_error"]
        assert [(f["addon"], f["hook"], f["error"]) for f in failed] == [
            ("b.py", "session_end", "OSError: disk full"),
        ]  # fmt: skip
        assert events[-1]["event"] == "session_close" and events[-1]["reason"] == "closed"

    _run(scenario, config)


def test_sniff_true_makes_sessions_wait_so_session_start_sees_the_host() -> None:
    hosts: list[str | None] = []

    def start(session: api.Session) -> api.Verdict | None:
        sniffed = session.sniffed
        hosts.append(None if sniffed is None else sniffed.http_host)
        blocked = sniffed is not None and sniffed.http_host == "www.blocked.test"
        return api.reset() if blocked else None

    config = _with(_addon("sniffing.py", sniff=True, session_start=start))

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        assert h.session.phase is Phase.SNIFFING  # no policy, but an addon wants the facts
        await asyncio.sleep(0.05)
        assert h.upstream_accept() is None
        h.client.send(HTTP_REQUEST)
        await _reset_seen(h)
        assert hosts == ["www.blocked.test"]
        assert h.events()[-1]["rule"] == "addon:sniffing.py"
        h2 = PolicyHarness(h.ctx.config)
        try:
            h2.session.start()
            assert h2.session.phase is Phase.SNIFFING
            h2.client.send(ALLOWED_REQUEST)
            conn = await _accepted(h2)
            assert await _recv_all(conn, len(ALLOWED_REQUEST)) == ALLOWED_REQUEST
            conn.close()
            assert hosts == ["www.blocked.test", "www.example.test"]
        finally:
            h2.close()

    _run(scenario, config)


def test_sniff_true_waits_at_most_a_second_without_a_policy() -> None:
    config = _with(_addon("s.py", sniff=True, session_start=lambda s: None))

    async def scenario(h: PolicyHarness) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        h.session.start()
        conn = await _accepted(h)  # the client says nothing: connected after the sniff timeout
        waited = loop.time() - started
        assert 0.9 <= waited <= 1.6, waited
        conn.close()
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        assert h.events()[-1]["proto"] == "silent"

    _run(scenario, config)


def test_an_async_hook_pauses_only_its_own_session() -> None:
    calls = {"n": 0}

    async def start(session: api.Session) -> api.Verdict | None:
        calls["n"] += 1
        if calls["n"] == 1:  # the first session waits, the second does not
            await asyncio.sleep(0.5)
        return None

    config = _with(_addon("slow.py", session_start=start))

    async def scenario(h: PolicyHarness) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        h.session.start()
        assert h.session.phase is Phase.ADDONS
        other = PolicyHarness(h.ctx.config)
        try:
            other.session.start()
            await _relay_once(other)
            assert loop.time() - started < 0.4, "the other session waited too"
            assert h.session.phase is Phase.ADDONS
        finally:
            other.close()
        await _relay_once(h)
        assert loop.time() - started >= 0.5
        assert h.events()[-1]["reason"] == "closed"

    _run(scenario, config)


def test_an_async_hook_past_its_deadline_resets_the_session_and_is_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(session_module, "ADDON_HOOK_TIMEOUT_S", 0.1)
    cancelled: list[bool] = []
    start = _sleeping_hook(cancelled)

    config = _with(_addon("stuck.py", session_start=start))

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await _reset_seen(h)
        failed = [e for e in h.events() if e["event"] == "session_error"]
        assert [(f["addon"], f["hook"], f["error"]) for f in failed] == [
            ("stuck.py", "session_start", "TimeoutError: session_start did not return within "
             "0.1 s"),
        ]  # fmt: skip
        assert h.events()[-1]["reason"] == "addon_error"
        assert cancelled == [True]

    _run(scenario, config)


def test_a_session_closed_while_its_hook_runs_cancels_it() -> None:
    cancelled: list[bool] = []
    ends: list[str | None] = []

    async def start(session: api.Session) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    config = _with(_addon("slow.py", session_start=start,
                          session_end=lambda s: ends.append(s.reason)))  # fmt: skip

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await asyncio.sleep(0.02)
        assert h.session.phase is Phase.ADDONS
        h.session.close(CloseReason.DRAIN_TIMEOUT)
        await _until(lambda: bool(cancelled))
        assert ends == ["drain_timeout"]
        assert h.events()[-1]["reason"] == "drain_timeout"
        assert h.upstream_accept() is None

    _run(scenario, config)


def test_sessions_keep_the_addons_they_started_with_across_a_reload() -> None:
    calls: list[str] = []
    config = _with(_addon("a.py", sniff=True, session_start=lambda s: calls.append("start"),
                          session_end=lambda s: calls.append("end")))  # fmt: skip

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        assert h.session.phase is Phase.SNIFFING
        h.ctx.config = ProxyConfig()  # a reload that drops the addons
        h.client.send(ALLOWED_REQUEST)
        conn = await _accepted(h)
        assert await _recv_all(conn, len(ALLOWED_REQUEST)) == ALLOWED_REQUEST
        conn.close()
        h.client.close()
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        assert calls == ["start", "end"]

    _run(scenario, config)


def test_addons_with_only_byte_hooks_take_the_path_without_addons() -> None:
    config = _with(_addon("bytes.py", client_data=lambda s, d: d))

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        assert h.session.phase in (Phase.CONNECTING, Phase.RELAYING)
        assert h.session._addons is None  # nothing made, nothing to call at close
        await _relay_once(h)
        close = h.events()[-1]
        assert (close["reason"], close["rule"], close["relay"]) == ("closed", None, "splice")

    _run(scenario, config)


def test_after_an_async_hook_the_next_ones_run_in_order_and_the_first_verdict_wins() -> None:
    calls: list[str] = []

    async def first(session: api.Session) -> None:
        await asyncio.sleep(0.01)
        calls.append("first")

    def second(session: api.Session) -> api.Verdict:
        calls.append("second")
        return api.reset()

    async def third(session: api.Session) -> api.Verdict:
        calls.append("third")
        return api.allow()

    config = _with(_addon("1.py", session_start=first), _addon("2.py", session_start=second),
                   _addon("3.py", session_start=third))  # fmt: skip

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        assert h.session.phase is Phase.ADDONS
        await _reset_seen(h)
        assert calls == ["first", "second", "third"]
        assert (h.events()[-1]["reason"], h.events()[-1]["rule"]) == ("policy_reset", "addon:2.py")

    _run(scenario, config)


def test_sys_exit_or_a_coroutine_from_a_plain_hook_is_an_addon_error_not_the_end() -> None:
    async def never(session: api.Session) -> None:
        return None

    def exits(session: api.Session) -> None:
        raise SystemExit(3)

    def returns_coroutine(session: api.Session) -> object:
        return never(session)

    async def exits_async(session: api.Session) -> None:
        raise SystemExit(4)

    async def scenario(h: PolicyHarness) -> None:
        cases: list[tuple[HookFn, str]] = [
            (exits, "SystemExit: 3"),
            (exits_async, "SystemExit: 4"),
            (returns_coroutine, "TypeError: session_start returned coroutine"),
        ]
        for fn, error in cases:
            other = PolicyHarness(_with(_addon("x.py", session_start=fn)))
            try:
                other.session.start()
                await _until(lambda o=other: _phase(o.session) is Phase.CLOSED)  # type: ignore[misc]
                events = other.events()
                assert events[-2]["error"].startswith(error), events[-2]
                assert events[-1]["reason"] == "addon_error"
            finally:
                other.close()

    _run(scenario, ProxyConfig())


def test_an_async_session_end_is_scheduled_after_the_close_and_its_error_logged() -> None:
    ended: list[str | None] = []

    async def end(session: api.Session) -> None:
        await asyncio.sleep(0.01)
        ended.append(session.reason)
        raise LookupError("late")

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await _relay_once(h)
        assert ended == []  # not awaited: the close event is written first
        await _until(lambda: bool(ended))
        await asyncio.sleep(0.01)
        events = h.events()
        assert [e["event"] for e in events][-2:] == ["session_close", "session_error"]
        assert (events[-1]["hook"], events[-1]["error"]) == ("session_end", "LookupError: late")
        assert ended == ["closed"]

    _run(scenario, _with(_addon("end.py", session_end=end)))


def test_a_hook_cancelled_by_something_else_ends_its_session_as_an_addon_error() -> None:
    """Two sessions' hooks await one shared future; the first session's close cancels it: the
    second's hook sees CancelledError that is not its own task's. It must not hang in ADDONS."""
    shared: list[asyncio.Future[None]] = []

    async def start(session: api.Session) -> None:
        if not shared:
            shared.append(asyncio.get_running_loop().create_future())
        await shared[0]

    async def scenario(h: PolicyHarness) -> None:
        h2 = PolicyHarness(h.ctx.config)
        try:
            h.session.start()
            h2.session.start()
            await asyncio.sleep(0.02)
            assert h.session.phase is Phase.ADDONS and h2.session.phase is Phase.ADDONS
            shared[0].cancel()  # as a cancelled lookup both awaited would
            await _until(lambda: _phase(h.session) is Phase.CLOSED)
            await _until(lambda: _phase(h2.session) is Phase.CLOSED)
            for harness in (h, h2):
                events = harness.events()
                assert events[-1]["reason"] == "addon_error", events
                assert events[-2]["event"] == "session_error"
                assert events[-2]["error"].startswith("CancelledError")
        finally:
            h2.close()

    _run(scenario, _with(_addon("shared.py", session_start=start)))


@pytest.mark.parametrize("raised", [KeyboardInterrupt, asyncio.CancelledError, GeneratorExit])
def test_any_base_exception_from_a_plain_hook_ends_only_its_session(
    raised: type[BaseException],
) -> None:
    def start(session: api.Session) -> None:
        raise raised("from the addon")

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await _reset_seen(h)
        assert h.events()[-1]["reason"] == "addon_error"
        assert h.session not in h.ctx.sessions

    _run(scenario, _with(_addon("rude.py", session_start=start)))


def test_session_end_raising_anything_still_writes_the_close() -> None:
    class UnprintableError(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    def end(session: api.Session) -> None:
        raise asyncio.CancelledError()

    def end_unprintable(session: api.Session) -> None:
        raise UnprintableError()

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await _relay_once(h)
        events = h.events()
        assert events[-1]["event"] == "session_close" and events[-1]["reason"] == "closed"
        errors = [e["error"] for e in events if e["event"] == "session_error"]
        assert errors == ["CancelledError", "UnprintableError: (its message could not be read)"]

    config = _with(_addon("a.py", session_start=lambda s: None, session_end=end),
                   _addon("b.py", session_end=end_unprintable))  # fmt: skip
    _run(scenario, config)


def test_a_client_that_resets_while_its_hook_runs_ends_the_session_and_nothing_connects() -> None:
    cancelled: list[bool] = []
    start = _sleeping_hook(cancelled)

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await asyncio.sleep(0.02)
        assert h.session.phase is Phase.ADDONS
        abort_socket(h.client)
        await _until(lambda: _phase(h.session) is Phase.CLOSED)
        assert h.events()[-1]["reason"] == "client_reset"
        await _until(lambda: bool(cancelled))
        assert h.upstream_accept() is None

    _run(scenario, _with(_addon("slow.py", session_start=start)))


def test_a_hook_that_swallows_its_cancellation_is_ended_by_the_sweep() -> None:
    tasks: list[asyncio.Task[Any]] = []
    stop: list[bool] = []

    async def start(session: api.Session) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        while not stop:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue  # an addon that retries forever (until the test lets it go)

    async def scenario(h: PolicyHarness) -> None:
        h.session.start()
        await asyncio.sleep(0.02)
        assert h.session.phase is Phase.ADDONS
        h.session.sweep(h.session.connect_deadline_at - 0.001)
        assert _phase(h.session) is Phase.ADDONS
        h.session.sweep(h.session.connect_deadline_at)
        assert _phase(h.session) is Phase.CLOSED
        assert h.events()[-1]["reason"] == "addon_error"
        stop.append(True)
        tasks[0].cancel()
        await asyncio.wait(tasks, timeout=5)

    _run(scenario, _with(_addon("stubborn.py", session_start=start)))


def test_an_addon_allowing_a_session_the_policy_captures_keeps_the_capture() -> None:
    policy = Verdict(Action.ALLOW, rule="watch", capture=True)
    addon = engine_verdict(api.allow(), "a.py")
    assert addon is not None
    final = session_module._final(addon, policy)
    assert (final.rule, final.capture) == ("addon:a.py", True)
    assert session_module._final(None, policy) is policy


def test_an_addon_allowing_a_session_the_policy_intercepts_keeps_the_interception() -> None:
    policy = Verdict(Action.ALLOW, rule="inspect", tls=TLSMode.INTERCEPT, upstream_verify=False,
                     passthrough_on_client_reject=True)  # fmt: skip
    addon = engine_verdict(api.allow(), "a.py")
    assert addon is not None
    final = session_module._final(addon, policy)
    assert (final.rule, final.tls, final.upstream_verify, final.passthrough_on_client_reject) == (
        "addon:a.py", TLSMode.INTERCEPT, False, True,
    )  # fmt: skip


def test_a_task_that_will_not_stop_does_not_keep_the_process_from_exiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(cli_main, "TASKS_STOP_TIMEOUT_S", 0.1)
    ran: list[str] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                ran.append("cancelled")

    async def main() -> None:
        asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0.01)

    loop = uvloop.new_event_loop()
    cli_main.run_to_the_end(loop, main())
    assert loop.is_closed() and ran == ["cancelled"]


def _client_hello(sni: str) -> bytes:
    """A TLS client's first flight, with `sni`."""
    context = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = context.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_an_addon_reset_of_a_name_passed_through_says_no_passthrough() -> None:
    # The close event's `passthrough` is why a session was relayed encrypted, untouched: a
    # session an addon reset was not relayed at all (as when the policy resets it).
    seen: list[api.InterceptedTLS | None] = []

    def start(session: api.Session) -> api.Verdict:
        seen.append(session.tls)
        return api.reset()

    policy = _config('[[rule]]\nname = "inspect"\nsni = ["*.example.test"]\naction = "allow"\n'
                     'tls = "intercept"\nupstream_verify = false')  # fmt: skip

    async def scenario(h: PolicyHarness) -> None:
        # Only looked at for being there: the session never reaches the TLS relay.
        h.ctx.interception = cast(Interception, object())
        h.ctx.passthrough.remember("www.example.test", PassthroughReason.UPSTREAM_WANTS_CLIENT_CERT,
                                   time.monotonic())  # fmt: skip
        h.session.start()
        h.client.send(_client_hello("www.example.test"))
        await _reset_seen(h)
        close = h.events()[-1]
        assert (close["reason"], close["rule"]) == ("policy_reset", "addon:reset.py")
        assert close["passthrough"] is None
        assert seen == [None]  # not intercepted: passed through for now

    _run(scenario, _with(_addon("reset.py", session_start=start), base=policy))
