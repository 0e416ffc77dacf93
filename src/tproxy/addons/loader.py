"""Loading addon files: each file run as a module of its own, its hooks found and checked.

The edge of the addons package (it reads files and runs their code); what it returns is data:
`Addons`, per hook the ordered callables, so that the engine pays nothing for a hook nobody
defined (an empty tuple) and never looks a hook up by name on a session's path.

Each file is its own module. Its name is made from the file's name and a hash of its absolute
path (`_tproxy_addon_log_3f2a9c01d4`): two `log.py` in different directories are two modules,
and no addon can shadow a real module (an addon named `json.py` is not `json`). It is put in
`sys.modules` while loaded because some of Python needs that (a dataclass with string
annotations looks its module up there); loading the same file again replaces it. The source is
compiled here, not by importlib's file loader: that loader writes `__pycache__` next to the addon
and trusts a cached file whose modification time and size did not change, so an addon edited
twice in one second could reload as its old code.

Everything that is wrong is found at load and raised as one `ConfigError` line naming the file
and line (`addon /etc/tproxy/log.py:12: ImportError: No module named 'requests'`): an exception
while the file runs (a SyntaxError, an ImportError, anything it raises), a hook that is not
callable, takes the wrong arguments or is a generator, an `addons` that is not a list, a public
function whose name is a near miss of a hook's (`session_started`), a `sniff` that is not a
bool, a file that defines no hook. So `tproxy run` refuses to start, and a SIGHUP reload keeps
the running addons. Loading is all or nothing: a list with one broken file loads nothing.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import hashlib
import importlib.machinery
import importlib.util
import inspect
import os
import re
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tproxy.addons.api import HOOK_PARAMETERS, HOOKS
from tproxy.core.options import ConfigError
from tproxy.sniffers.printable import to_printable

NEAR_MISS_CUTOFF = 0.85
"""How like a hook's name a function's name may be before it is taken for a misspelt hook
(difflib's ratio: `session_started` is 0.93 like `session_start`, `send_header` 0.5)."""


@dataclass(frozen=True, slots=True)
class Hook:
    """One hook of one addon.

    Args:
        addon: the addon's name, for the log (`Addon.name`).
        name: which hook (one of `HOOKS`).
        fn: what to call: a function, or an object's bound method.
        is_async: `fn` is an `async def`: calling it returns an awaitable.
    """

    addon: str
    name: str
    fn: Callable[..., Any]
    is_async: bool


@dataclass(frozen=True, slots=True)
class Addon:
    """One addon: a file's module-level hooks, or one object of its `addons` list.

    Args:
        name: the file as given, and for an object `:` and its class's name (with its index in
            `addons` when the list holds two of one class).
        path: the file as given.
        hooks: its hooks, in `HOOKS` order.
        sniff: it said `sniff = True`: sessions wait for their first bytes before the decision.
    """

    name: str
    path: str
    hooks: tuple[Hook, ...]
    sniff: bool = False


@dataclass(frozen=True, slots=True)
class Addons:
    """Every loaded addon, and per hook the callables in the order to call them: the files in
    the order given and, within a file, its module-level hooks, then its `addons` objects in
    their list's order.

    Args:
        addons: each addon.
        session_start ... session_end: one field per name in `HOOKS`: that hook's callables;
            empty when no addon defines it.
        wants_sniff: some addon said `sniff = True`.
    """

    addons: tuple[Addon, ...] = ()
    session_start: tuple[Hook, ...] = ()
    client_data: tuple[Hook, ...] = ()
    server_data: tuple[Hook, ...] = ()
    client_eof: tuple[Hook, ...] = ()
    server_eof: tuple[Hook, ...] = ()
    session_end: tuple[Hook, ...] = ()
    wants_sniff: bool = False

    @classmethod
    def of(cls, addons: Sequence[Addon]) -> Addons:
        """The addons, with their hooks gathered per hook."""
        per_hook = {
            name: tuple(hook for addon in addons for hook in addon.hooks if hook.name == name)
            for name in HOOKS
        }
        return cls(tuple(addons), wants_sniff=any(a.sniff for a in addons), **per_hook)

    def hooks(self, name: str) -> tuple[Hook, ...]:
        """The callables of hook `name` (one of `HOOKS`), in order."""
        if name not in HOOKS:
            raise KeyError(name)
        hooks: tuple[Hook, ...] = getattr(self, name)
        return hooks


def load_addons(paths: Sequence[str]) -> Addons:
    """The addons in `paths`, in that order; all of them, or none.

    Raises:
        ConfigError: one line naming the file (and line) and what is wrong with it; the modules
            of the files loaded before it are unloaded again.
    """
    seen: dict[str, str] = {}
    loaded: list[Addon] = []
    with _sys_modules_restored_on_error():
        for path in paths:
            real = os.path.realpath(path)
            if real in seen:
                raise ConfigError(f"addon {path} is listed twice (also as {seen[real]})")
            seen[real] = path
            loaded.extend(load_addon_file(path))
    return Addons.of(loaded)


def load_addon_file(path: str) -> tuple[Addon, ...]:
    """One file's addons: its module-level hooks (when it has any, or says `sniff = True`), then
    one per object of its `addons` list.

    Raises:
        ConfigError: one line naming the file and line and what is wrong.
    """
    try:
        source = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read addon {path}: {exc.strerror}") from None
    module = _run_module(path, source)
    return _addons_of(path, module, source)


# --- running the file ------------------------------------------------------------------------


def module_name(path: str) -> str:
    """The module name an addon file is loaded as: unique per file, never a real module's."""
    stem = re.sub(r"\W", "_", Path(path).stem, flags=re.ASCII)
    digest = hashlib.sha256(os.path.abspath(path).encode("utf-8", "surrogateescape"))
    return f"{MODULE_PREFIX}{stem}_{digest.hexdigest()[:10]}"


def _run_module(path: str, source: bytes) -> types.ModuleType:
    name = module_name(path)
    loader = importlib.machinery.SourceFileLoader(name, path)  # for tracebacks' source lines
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None  # a loader was given
    module = importlib.util.module_from_spec(spec)
    previous = sys.modules.get(name)
    sys.modules[name] = module
    try:
        # dont_inherit: this module's `from __future__ import annotations` is not the addon's.
        code = compile(source, path, "exec", dont_inherit=True)
        exec(code, module.__dict__)
    except BaseException as exc:  # KeyboardInterrupt or GeneratorExit from an addon too
        if previous is None:
            del sys.modules[name]
        else:
            sys.modules[name] = previous
        raise ConfigError(_import_error(path, exc)) from None
    return module


# An addon's own words in an error (its exception's message) are cut to this many characters.
MAX_MESSAGE_CHARS = 300


def _one_line(text: str) -> str:
    """`text` as one line of printable ASCII (an addon's message may hold anything, escape
    sequences included), at most `MAX_MESSAGE_CHARS` characters."""
    joined = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    return to_printable(joined.encode("utf-8", "backslashreplace"), MAX_MESSAGE_CHARS)


def _import_error(path: str, exc: BaseException) -> str:
    """`addon PATH:LINE: Type: message`: the line is the file's own where the exception passed
    (the `import` of a broken module, the call that raised), or a SyntaxError's in the file."""
    kind = type(exc).__name__
    if isinstance(exc, SyntaxError) and exc.filename == path:
        line = f":{exc.lineno}" if exc.lineno is not None else ""
        return f"addon {path}{line}: {kind}: {exc.msg}"
    frames = [
        (tb.tb_frame.f_code.co_filename, tb.tb_lineno) for tb in _traceback(exc.__traceback__)
    ]
    own = [line for filename, line in frames if filename == path]
    where = f"{path}:{own[-1]}" if own else path
    try:
        message = _one_line(str(exc))
    except Exception:  # an exception whose __str__ raises
        message = "(its message could not be read)"
    text = f"addon {where}: {kind}: {message}" if message else f"addon {where}: {kind}"
    if frames and frames[-1][0] != path:
        text += f" (raised at {frames[-1][0]}:{frames[-1][1]})"
    return text


def _traceback(tb: types.TracebackType | None) -> Iterator[types.TracebackType]:
    while tb is not None:
        yield tb
        tb = tb.tb_next


# --- finding and checking the hooks ----------------------------------------------------------


@dataclass
class _Where:
    """Where a file's names are defined, for messages: the line of each top-level name."""

    path: str
    lines: dict[str, int] = field(default_factory=dict)

    def of_name(self, name: str) -> str:
        line = self.lines.get(name)
        return f"{self.path}:{line}" if line is not None else self.path

    def of_function(self, fn: Any, fallback: str) -> str:
        code = getattr(inspect.unwrap(fn), "__code__", None)
        if not isinstance(code, types.CodeType):
            return self.of_name(fallback)
        if code.co_filename == self.path:
            return f"{self.path}:{code.co_firstlineno}"
        return f"{self.path} ({code.co_filename}:{code.co_firstlineno})"


def _top_level_lines(source: bytes) -> dict[str, int]:
    """The line where each top-level name is last bound (the file compiled already)."""
    lines: dict[str, int] = {}
    for node in ast.parse(source).body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            lines[node.name] = node.lineno
        elif isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign | ast.AugAssign):
            targets = [node.target]
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                lines[(alias.asname or alias.name).partition(".")[0]] = node.lineno
        for target in targets:
            for name_node in ast.walk(target):
                if isinstance(name_node, ast.Name):
                    lines[name_node.id] = node.lineno
    return lines


def _addons_of(path: str, module: types.ModuleType, source: bytes) -> tuple[Addon, ...]:
    where = _Where(path, _top_level_lines(source))
    namespace = vars(module)
    own = {name: namespace[name] for name in HOOKS if name in namespace}
    for name, value in namespace.items():
        if inspect.isfunction(value) and value.__module__ == module.__name__:
            _refuse_near_miss(name, where.of_function(value, name))
    sniff = _sniff_of(namespace.get("sniff", False), where.of_name("sniff"))
    addons: list[Addon] = []
    if own or sniff:
        hooks = tuple(_hook(path, name, value, where.of_name(name)) for name, value in own.items())
        addons.append(Addon(path, path, hooks, sniff))
    if "addons" in namespace:
        addons.extend(_objects(path, namespace["addons"], where))
    if not any(addon.hooks for addon in addons):
        raise ConfigError(
            f"addon {path}: defines no hook: a module-level function or an `addons = [...]` "
            f"object's method named {', '.join(HOOKS)}"
        )
    return tuple(addons)


def _objects(path: str, objects: Any, where: _Where) -> list[Addon]:
    at = where.of_name("addons")
    if not isinstance(objects, list):
        raise ConfigError(
            f"addon {at}: addons must be a list of objects with hook methods, not "
            f"{type(objects).__name__}"
        )
    class_names = [type(obj).__name__ for obj in objects]
    addons = []
    for index, obj in enumerate(objects):
        item = f"addons[{index}]"
        if inspect.isclass(obj):
            raise ConfigError(f"addon {at}: {item} is the class {obj.__name__}, not an object "
                              f"(did you mean {obj.__name__}()?)")  # fmt: skip
        if isinstance(obj, types.ModuleType):
            raise ConfigError(f"addon {at}: {item} is a {type(obj).__name__}, not an object "
                              "with hook methods")  # fmt: skip
        cls = type(obj).__name__
        name = f"{path}:{cls}" + (f"[{index}]" if class_names.count(cls) > 1 else "")
        for attr in dir(obj):
            if not attr.startswith("_") and attr not in HOOKS and _looks_like_hook(attr):
                value = inspect.getattr_static(obj, attr, None)
                if inspect.isfunction(value):
                    _refuse_near_miss(attr, where.of_function(value, "addons"), f"{cls}.")
        hooks = []
        for hook in HOOKS:
            if inspect.getattr_static(obj, hook, _ABSENT) is not _ABSENT:
                value = getattr(obj, hook)
                hooks.append(_hook(name, hook, value, where.of_function(value, "addons"),
                                   f"{cls}."))  # fmt: skip
        if not hooks:
            raise ConfigError(f"addon {at}: {item} ({cls}) has none of the hook methods "
                              f"{', '.join(HOOKS)}")  # fmt: skip
        sniff = _sniff_of(inspect.getattr_static(obj, "sniff", False), at, f"{cls}.")
        addons.append(Addon(name, path, tuple(hooks), sniff))
    return addons


_ABSENT = object()


def _looks_like_hook(name: str) -> str | None:
    """The hook `name` is probably a misspelling of, or None."""
    close = difflib.get_close_matches(name.lower(), HOOKS, n=1, cutoff=NEAR_MISS_CUTOFF)
    return close[0] if close and close[0] != name else None


def _refuse_near_miss(name: str, at: str, owner: str = "") -> None:
    if name.startswith("_") or name in HOOKS:
        return
    hook = _looks_like_hook(name)
    if hook is not None:
        raise ConfigError(
            f"addon {at}: {owner}{name} is not a hook: did you mean {hook}? (a helper's name "
            "must not look like a hook's: start it with _)"
        )


def _sniff_of(value: Any, at: str, owner: str = "") -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"addon {at}: {owner}sniff must be True or False, not "
                          f"{type(value).__name__}")  # fmt: skip
    return value


def _hook(addon: str, name: str, fn: Any, at: str, owner: str = "") -> Hook:
    """`fn` as hook `name`, checked: callable, not a generator, taking the hook's arguments."""
    what = f"{owner}{name}"
    if not callable(fn):
        raise ConfigError(f"addon {at}: {what} must be a function, not {type(fn).__name__}")
    if inspect.isgeneratorfunction(fn) or inspect.isasyncgenfunction(fn):
        raise ConfigError(f"addon {at}: {what} is a generator (it yields); a hook returns its "
                          "answer")  # fmt: skip
    parameters = HOOK_PARAMETERS[name]
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some built-ins have none: let the call tell
        signature = None
    if signature is not None:
        try:
            signature.bind(*parameters)
        except TypeError:
            raise ConfigError(f"addon {at}: {what} must take ({', '.join(parameters)}), "
                              f"not {signature}") from None  # fmt: skip
    return Hook(addon, name, fn, inspect.iscoroutinefunction(fn))


MODULE_PREFIX = "_tproxy_addon_"


@contextlib.contextmanager
def _sys_modules_restored_on_error() -> Iterator[None]:
    """Put the addon modules in `sys.modules` back as they were if the block raises: a failed
    reload leaves the running addons' modules registered, not half of the new ones."""
    before = {k: v for k, v in sys.modules.items() if k.startswith(MODULE_PREFIX)}
    try:
        yield
    except BaseException:
        for name in [k for k in sys.modules if k.startswith(MODULE_PREFIX)]:
            if name not in before:
                del sys.modules[name]
        sys.modules.update(before)
        raise
