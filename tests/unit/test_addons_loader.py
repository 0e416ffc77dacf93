"""Loading addon files: hooks found in order (module-level, then `addons` objects), sync and
async told apart, `sniff` recorded; every mistake one line naming the file and line; each file
its own module (never a real module's name); a reload runs the edited code; a failed load leaves
the running addons' modules as they were; `--addon` and `addon = [...]` load them into the
configuration, and `tproxy addon check` reports them."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import tproxy.cli.main as cli_main
from tproxy.addons.api import HOOKS
from tproxy.addons.loader import (
    MODULE_PREFIX,
    Addons,
    load_addon_file,
    load_addons,
    module_name,
)
from tproxy.cli.main import _load_config, build_parser, cli_overrides, main
from tproxy.core.config import ConfigError, ProxyConfig, reload_from


@pytest.fixture(autouse=True)
def _forget_addon_modules() -> Iterator[None]:
    """Each test starts and ends with no addon module registered."""
    yield
    for name in [k for k in sys.modules if k.startswith(MODULE_PREFIX)]:
        del sys.modules[name]


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


MODULE_HOOKS = """\
    def session_start(session):
        return None

    async def client_data(session, data):
        return data

    def session_end(session):
        session.state["ended"] = True
"""

OBJECTS = """\
    sniff = True

    def session_end(session):
        pass

    class Counter:
        sniff = True

        def __init__(self):
            self.seen = 0

        async def session_start(self, session):
            self.seen += 1

        def server_eof(self, session):
            return b""

    class Quiet:
        def session_end(self, session):
            pass

    addons = [Counter(), Quiet()]
"""


# --- what is found ---------------------------------------------------------------------------


def test_module_level_hooks_are_found_in_hook_order_with_sync_and_async_told_apart(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path / "a.py", MODULE_HOOKS)
    addons = load_addons([path])
    (addon,) = addons.addons
    assert (addon.name, addon.path, addon.sniff) == (path, path, False)
    assert [(h.name, h.is_async, h.addon) for h in addon.hooks] == [
        ("session_start", False, path),
        ("client_data", True, path),
        ("session_end", False, path),
    ]
    assert addons.session_start == (addon.hooks[0],)
    assert addons.client_data == (addon.hooks[1],)
    assert addons.server_data == addons.client_eof == addons.server_eof == ()
    assert not addons.wants_sniff


def test_addons_objects_follow_the_module_level_hooks_with_bound_methods(tmp_path: Path) -> None:
    path = _write(tmp_path / "objects.py", OBJECTS)
    addons = load_addons([path])
    assert [(a.name, a.sniff) for a in addons.addons] == [
        (path, True),
        (f"{path}:Counter", True),
        (f"{path}:Quiet", False),
    ]
    assert [h.addon for h in addons.session_end] == [path, f"{path}:Quiet"]
    (start,) = addons.session_start
    assert start.is_async
    counter = getattr(start.fn, "__self__")  # noqa: B009 (a bound method)
    assert type(counter).__name__ == "Counter" and counter.seen == 0
    assert [h.addon for h in addons.server_eof] == [f"{path}:Counter"]
    assert addons.wants_sniff


def test_two_objects_of_one_class_are_told_apart_by_their_index(tmp_path: Path) -> None:
    path = _write(tmp_path / "twice.py", """\
        class Log:
            def session_end(self, session):
                pass

        addons = [Log(), Log()]
    """)  # fmt: skip
    assert [a.name for a in load_addons([path]).addons] == [f"{path}:Log[0]", f"{path}:Log[1]"]


def test_files_keep_the_order_given(tmp_path: Path) -> None:
    first = _write(tmp_path / "b.py", "def session_end(session): pass\n")
    second = _write(tmp_path / "a.py", "def session_end(session): pass\n")
    assert [h.addon for h in load_addons([first, second]).session_end] == [first, second]
    assert [h.addon for h in load_addons([second, first]).session_end] == [second, first]


def test_every_hook_has_a_field_and_hooks_looks_it_up(tmp_path: Path) -> None:
    body = "".join(f"def {name}(session, data=None): return b''\n" for name in HOOKS)
    addons = load_addons([_write(tmp_path / "all.py", body)])
    for name in HOOKS:
        (hook,) = addons.hooks(name)
        assert hook.name == name and hook.fn.__name__ == name
    with pytest.raises(KeyError):
        addons.hooks("session_started")
    assert Addons().hooks("client_data") == ()


def test_sniff_alone_on_the_module_counts_for_the_objects_hooks(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.py", """\
        sniff = True

        class A:
            def session_start(self, session):
                return None

        addons = [A()]
    """)  # fmt: skip
    addons = load_addons([path])
    assert [(a.name, len(a.hooks), a.sniff) for a in addons.addons] == [
        (path, 0, True),
        (f"{path}:A", 1, False),
    ]
    assert addons.wants_sniff


def test_helpers_that_do_not_look_like_hooks_are_left_alone(tmp_path: Path) -> None:
    path = _write(tmp_path / "helpers.py", """\
        import os
        from os.path import join as session_ender  # imported, not defined here

        def _session_started(session):  # private: may look like a hook
            pass

        def rewrite_header(data):
            return data

        class Helper:
            pass

        def client_data(session, data):
            return rewrite_header(data)
    """)  # fmt: skip
    assert [h.name for h in load_addons([path]).client_data] == ["client_data"]


def test_an_addon_may_use_dataclasses_and_keeps_its_own_annotations(tmp_path: Path) -> None:
    path = _write(tmp_path / "dc.py", """\
        from dataclasses import dataclass
        from typing import ClassVar

        @dataclass
        class Seen:
            count: ClassVar[int] = 0
            name: str = ""

        def session_end(session: object) -> None:
            Seen(name="x")
    """)  # fmt: skip
    (hook,) = load_addons([path]).session_end
    # The loader's `from __future__ import annotations` is not passed on to the addon.
    assert hook.fn.__annotations__ == {"session": object, "return": None}
    hook.fn(None)


# --- modules ---------------------------------------------------------------------------------


def test_two_files_with_one_name_are_two_modules(tmp_path: Path) -> None:
    one = _write(tmp_path / "one" / "log.py", "WHO = 1\ndef session_end(session): return WHO\n")
    two = _write(tmp_path / "two" / "log.py", "WHO = 2\ndef session_end(session): return WHO\n")
    first, second = load_addons([one, two]).session_end
    assert (first.fn(None), second.fn(None)) == (1, 2)
    assert first.fn.__module__ != second.fn.__module__
    assert module_name(one) != module_name(two)
    assert sys.modules[module_name(one)].__file__ == one


def test_an_addon_named_like_a_real_module_does_not_shadow_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "json.py", "def session_end(session): pass\n")
    load_addons([path])
    assert sys.modules["json"] is json
    assert module_name(path).startswith(MODULE_PREFIX + "json_")


def test_loading_writes_no_bytecode_next_to_the_addon(tmp_path: Path) -> None:
    load_addons([_write(tmp_path / "a.py", MODULE_HOOKS)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.py"]


def test_a_reload_runs_the_edited_code_even_of_the_same_size_in_the_same_second(
    tmp_path: Path,
) -> None:
    path = _write(tmp_path / "a.py", "def session_end(session): return 1\n")
    (old,) = load_addons([path]).session_end
    _write(tmp_path / "a.py", "def session_end(session): return 2\n")
    (new,) = load_addons([path]).session_end
    assert (old.fn(None), new.fn(None)) == (1, 2)
    assert sys.modules[module_name(path)].session_end is new.fn


def test_a_failed_load_leaves_the_running_modules_registered(tmp_path: Path) -> None:
    good = _write(tmp_path / "good.py", "def session_end(session): return 1\n")
    load_addons([good])
    running = sys.modules[module_name(good)]
    _write(tmp_path / "good.py", "def session_end(session): return 2\n")
    broken = _write(tmp_path / "broken.py", "raise RuntimeError('no')\n")
    with pytest.raises(ConfigError):
        load_addons([good, broken])
    assert sys.modules[module_name(good)] is running
    assert module_name(broken) not in sys.modules


# --- what is refused: one line naming the file and the line -----------------------------------

BROKEN = [
    pytest.param("def session_start(session)\n    pass\n", 1, "SyntaxError: expected ':'",
                 id="syntax-error"),
    pytest.param("import os\nimport no_such_module_here\n", 2,
                 "ModuleNotFoundError: No module named 'no_such_module_here'", id="import-error"),
    pytest.param("from os import no_such_name\n", 1,
                 "ImportError: cannot import name 'no_such_name' from 'os'", id="from-import"),
    pytest.param("x = 1\nraise RuntimeError('not\\nconfigured')\n", 2,
                 "RuntimeError: not; configured", id="raises-at-import"),
    pytest.param("def boom():\n    return {}['key']\n\nboom()\n", 2, "KeyError: 'key'",
                 id="raises-in-a-function-called-at-import"),  # the innermost line of the file
    pytest.param("import sys\nsys.exit(3)\n", 2, "SystemExit: 3", id="sys-exit"),
    pytest.param("x = 1\nsession_start = 'later'\n", 2,
                 "session_start must be a function, not str", id="not-callable"),
    pytest.param("session_end = None\n", 1, "session_end must be a function, not NoneType",
                 id="none"),
    pytest.param("\ndef session_started(session):\n    pass\n", 2,
                 "session_started is not a hook: did you mean session_start?", id="near-miss"),
    pytest.param("def session_end(session): pass\n\nasync def Client_Data(s, d): pass\n", 3,
                 "Client_Data is not a hook: did you mean client_data?", id="near-miss-case"),
    pytest.param("def client_data(session):\n    return b''\n", 1,
                 "client_data must take (session, data), not (session)", id="wrong-arity"),
    pytest.param("def session_end(session):\n    yield\n", 1,
                 "session_end is a generator (it yields); a hook returns its answer",
                 id="generator"),
    pytest.param("def session_end(session): pass\nsniff = 'yes'\n", 2,
                 "sniff must be True or False, not str", id="sniff-not-bool"),
    pytest.param("class A:\n    def session_end(self, s): pass\n\naddons = (A(),)\n", 4,
                 "addons must be a list of objects with hook methods, not tuple",
                 id="addons-not-a-list"),
    pytest.param("class A:\n    def session_end(self, s): pass\n\naddons = [A]\n", 4,
                 "addons[0] is the class A, not an object (did you mean A()?)",
                 id="addons-holds-a-class"),
    pytest.param("class A:\n    pass\n\naddons = [A()]\n", 4,
                 "addons[0] (A) has none of the hook methods", id="object-without-hooks"),
    pytest.param("class A:\n    def session_end(self):\n        pass\n\naddons = [A()]\n", 2,
                 "A.session_end must take (session), not ()", id="method-arity"),
    pytest.param("class A:\n    def session_end(self, s): pass\n\n    def server_dat(self, s, d):"
                 " pass\n\naddons = [A()]\n", 4,
                 "A.server_dat is not a hook: did you mean server_data?", id="method-near-miss"),
    pytest.param("class A:\n    session_end = 5\n\naddons = [A()]\n", 4,
                 "A.session_end must be a function, not int", id="method-not-callable"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "line", "message"), BROKEN)
def test_a_broken_addon_is_one_line_naming_its_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = _write(tmp_path / "broken.py", text)
    with pytest.raises(ConfigError) as raised:
        load_addons([path])
    (text_line,) = str(raised.value).splitlines()
    assert text_line.startswith(f"addon {path}:{line}: "), text_line
    assert message in text_line


def test_an_error_raised_in_an_imported_module_names_the_import_and_where_it_was_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    helper = _write(
        tmp_path / "lib" / "helper_for_addon_test.py", "x = 1\nraise ValueError('bad')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    path = _write(tmp_path / "a.py", "\nimport helper_for_addon_test\n")
    with pytest.raises(ConfigError) as raised:
        load_addons([path])
    assert str(raised.value) == (f"addon {path}:2: ValueError: bad (raised at {helper}:2)")


def test_a_file_without_hooks_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "empty.py", "sniff = True\n")
    with pytest.raises(ConfigError, match=r"^addon .*empty\.py: defines no hook: "):
        load_addons([path])


@pytest.mark.parametrize("name", ["missing.py", "."])
def test_an_unreadable_file_is_one_line(tmp_path: Path, name: str) -> None:
    path = str(tmp_path / name)
    with pytest.raises(ConfigError, match=r"^cannot read addon .*: "):
        load_addon_file(path)


def test_a_file_listed_twice_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.py", MODULE_HOOKS)
    other_spelling = str(tmp_path / "." / "a.py")
    with pytest.raises(ConfigError, match="is listed twice"):
        load_addons([path, other_spelling])


# --- the configuration: --addon, addon = [...], reload ---------------------------------------


def _overrides(*argv: str) -> dict[str, Any]:
    return cli_overrides(build_parser().parse_args(["run", *argv]))


def test_addon_on_the_command_line_loads_into_the_configuration(tmp_path: Path) -> None:
    one = _write(tmp_path / "one.py", MODULE_HOOKS)
    two = _write(tmp_path / "two.py", OBJECTS)
    config = _load_config(None, _overrides("--addon", one, "--addon", two))
    assert config.addon_files == [one, two]
    assert config.addons is not None
    assert [a.name for a in config.addons.addons] == [one, two, f"{two}:Counter", f"{two}:Quiet"]


def test_addon_in_the_config_file_loads_into_the_configuration(tmp_path: Path) -> None:
    one = _write(tmp_path / "one.py", MODULE_HOOKS)
    toml = _write(tmp_path / "tproxy.toml", f'addon = ["{one}"]\n')
    config = _load_config(toml, {})
    assert config.addons is not None
    assert [h.addon for h in config.addons.session_start] == [one]


def test_without_addons_there_is_nothing_to_load(tmp_path: Path) -> None:
    assert _load_config(None, {}).addons is None
    assert ProxyConfig().addon_files == []
    empty = _load_config(_write(tmp_path / "tproxy.toml", "addon = []\n"), {})
    assert (empty.addon_files, empty.addons) == ([], None)


def test_a_broken_addon_fails_the_configuration(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.py", "import no_such_module_here\n")
    with pytest.raises(ConfigError, match=rf"^addon {path}:1: ModuleNotFoundError"):
        _load_config(None, _overrides("--addon", path))


def test_a_reload_loads_the_edited_addon_or_keeps_the_running_one(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.py", "def session_end(session): return 1\n")
    load = partial(_load_config, None, _overrides("--addon", path))
    running = load()
    _write(tmp_path / "a.py", "def session_end(session) return 2\n")
    new, notices = reload_from(running, load)
    assert new is None
    assert notices == [
        f"reload failed, keeping the running configuration: addon {path}:1: SyntaxError: "
        "expected ':'"
    ]
    assert running.addons is not None and running.addons.session_end[0].fn(None) == 1
    _write(tmp_path / "a.py", "def session_end(session): return 3\n")
    new, notices = reload_from(running, load)
    assert new is not None and new.addons is not None and notices == []
    assert new.addons.session_end[0].fn(None) == 3


# --- tproxy addon check ----------------------------------------------------------------------


def test_addon_check_prints_one_line_per_addon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    one = _write(tmp_path / "one.py", MODULE_HOOKS)
    two = _write(tmp_path / "two.py", OBJECTS)
    assert main(["addon", "check", one, two]) == 0
    sniffs = "; sniff = True: sessions wait for their first bytes"
    assert capsys.readouterr().out.splitlines() == [
        f"{one}: session_start, client_data (async), session_end",
        f"{two}: session_end{sniffs}",
        f"{two}:Counter: session_start (async), server_eof{sniffs}",
        f"{two}:Quiet: session_end",
    ]
    lonely = _write(tmp_path / "lonely.py", "def client_data(session, data):\n    return data\n")
    assert main(["addon", "check", lonely]) == 0
    assert capsys.readouterr().out == (
        f"{lonely}: client_data; its byte hooks never run: only a session_start can claim() "
        "sessions\n"
    )


def test_addon_check_of_a_broken_file_is_one_line_and_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write(tmp_path / "good.py", MODULE_HOOKS)
    broken = _write(tmp_path / "broken.py", "x = 1\ndef session_started(session): pass\n")
    assert main(["addon", "check", good, broken]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"tproxy addon check: error: addon {broken}:2: session_started is not a hook: did you "
        "mean session_start? (a helper's name must not look like a hook's: start it with _)\n"
    )


def test_an_addons_hostile_error_message_is_one_bounded_printable_line(tmp_path: Path) -> None:
    path = tmp_path / "loud.py"
    path.write_text('raise ValueError("\\x1b[2J" + "A" * 200000)\n')
    with pytest.raises(ConfigError) as raised:
        load_addons([str(path)])
    message = str(raised.value)
    assert message.startswith(f"addon {path}:1: ValueError: \\x1b[2JAAA")
    assert len(message) < 400 + len(str(path)) and "\x1b" not in message


def test_a_configuration_that_fails_after_its_addons_loaded_leaves_their_modules_alone(
    tmp_path: Path,
) -> None:
    """A reload whose capture setup is wrong keeps the running addons, and their modules too
    (the addons load last, once nothing else can fail)."""
    addon = _write(tmp_path / "a.py", "def session_end(session):\n    pass\n")
    running = load_addons([addon])
    name = module_name(addon)
    module = sys.modules[name]
    policy = _write(tmp_path / "p.toml", '[[rule]]\nname = "c"\naction = "allow"\ncapture = true\n')
    with pytest.raises(ConfigError, match="no --capture-dir"):
        cli_main._load_config(None, {"policy": policy, "addon_files": [addon]})
    assert sys.modules[name] is module and running.session_end[0].fn.__module__ == name
