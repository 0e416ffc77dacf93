"""The addons' byte hooks of one direction of a claimed session: a chunk (or the source's end)
in, what the hooks return out (issue 12; issue 13 runs it on an intercepted session's
plaintext).

A chain is the claiming addons' `client_data` (up) or `server_data` (down) hooks, in the order
the addons were given, each getting the previous one's output; a hook that returns b"" holds the
chunk back and the next ones see nothing. At the source's end (`run(None)`), each claiming
addon's `client_eof` / `server_eof` is called in order, and what it returns goes through the
*later* addons' data hooks. What comes out is handed to `emit`, in order; the chain owns no
socket and no queue: its relay decides where the bytes go (`engine.addon_relay` queues them for
a socket, `engine.tls_relay` encrypts them for the sink's TLS).

A chain of plain functions runs at once, inside the caller. When any hook of the direction is an
`async def`, every run is a task and the chain is `busy` until it is done (then `done()` is
called): its relay reads nothing more that way meanwhile, so only that direction of that
session waits (each await at most `ADDON_HOOK_TIMEOUT_S`). Both run the same coroutine
(`_process`): without async hooks nothing in it can suspend, so it is driven to its end with one
`send(None)` (no task, no event loop round trip). Anything a hook raises, or a return that is
not bytes, is the host's `hook_failed` (the session ends: `addon_error`); never the process.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from tproxy.engine.addon_session import ADDON_HOOK_TIMEOUT_S, cancelling

if TYPE_CHECKING:
    from tproxy.addons.loader import Addon, Hook

# One claiming addon's hooks for one direction: (its data hook, its eof hook), either missing.
Step = tuple["Hook | None", "Hook | None"]


class ChainHost(Protocol):
    """What a chain needs from its relay."""

    @property
    def over(self) -> bool:
        """The session has ended (or is past its close): hooks' results are dropped."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]: ...

    def hook_failed(self, hook: Hook, exc: BaseException) -> None:
        """A hook raised or returned nonsense: end the session (`addon_error`)."""

    def pump_failed(self, exc: BaseException) -> None:
        """A bug of ours: end the session (`error`)."""


def chain_of(
    addons: tuple[Addon, ...], claimers: list[str] | tuple[()], up: bool
) -> tuple[Step, ...]:
    """The steps of one direction: for each claiming addon, in the addons' order, its
    `client_data`/`client_eof` (`up`) or `server_data`/`server_eof`."""
    data_name, eof_name = ("client_data", "client_eof") if up else ("server_data", "server_eof")
    steps = []
    for addon in addons:
        if addon.name in claimers:
            hooks = {hook.name: hook for hook in addon.hooks}
            steps.append((hooks.get(data_name), hooks.get(eof_name)))
    return tuple(steps)


def _as_bytes(out: object, hook: Hook) -> bytes:
    if type(out) is bytes:
        return out
    if isinstance(out, (bytes, bytearray, memoryview)):
        return bytes(out)  # a copy: the addon may change its bytearray later
    if inspect.iscoroutine(out):  # a plain def that returned a coroutine: never awaited
        out.close()
    raise TypeError(
        f"{hook.name} returned {type(out).__name__}: return the bytes to send on "
        "(b'' to hold them back)"
    )


class AddonChain:
    """One direction's byte hooks (the module docstring).

    Args:
        host: the relay (its end, its task spawner, where failures go).
        session: what the hooks are called with (`tproxy.addons.api.Session`).
        steps: the direction's steps (`chain_of`).
        emit: given each output, in order.
        done: called when a run that went to a task (`busy`) has ended well.
    """

    __slots__ = ("_done", "_emit", "_hook", "_host", "_session", "_steps", "_task", "busy",
                 "has_async", "stopped")  # fmt: skip

    def __init__(
        self,
        host: ChainHost,
        session: object,
        steps: tuple[Step, ...],
        emit: Callable[[bytes], None],
        done: Callable[[], None],
    ) -> None:
        self._host = host
        self._session = session
        self._steps = steps
        self._emit = emit
        self._done = done
        self.has_async = any(hook.is_async for step in steps for hook in step if hook)
        self.busy = False  # a run is in a task
        self._task: asyncio.Task[None] | None = None
        self._hook: Hook | None = None  # the hook a task awaits (for its errors)
        self.stopped = False

    def run(self, data: bytes | None) -> None:
        """Pass `data` (None: the source's end) through the chain: at once for plain hooks; in a
        task when some hook is an `async def` (`busy` until it ends, then `done()`). Nothing
        once stopped."""
        if self.stopped:
            return
        if self.has_async:
            self.busy = True
            task = self._task = self._host.spawn(self._in_task(data))
            task.add_done_callback(self._task_done)
            return
        process = self._process(data)
        try:
            process.send(None)
        except StopIteration:
            return
        process.close()  # nothing in a chain of plain hooks awaits: a bug of ours if it did
        raise RuntimeError("a chain of plain hooks suspended")

    def stop(self) -> None:
        """Call no hook and emit nothing more; a task still running is cancelled."""
        self.stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()

    async def _in_task(self, data: bytes | None) -> None:
        try:
            await self._process(data)
        except Exception as exc:  # a bug of ours past the hooks
            self._host.pump_failed(exc)
            return
        self._task = None
        self.busy = False
        if self.stopped:
            return
        try:
            self._done()
        except Exception as exc:
            self._host.pump_failed(exc)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        """A run's task ended. Cancelled while still the chain's (not by `stop()`, which
        forgets it first): cancelled by something else, such as the hook itself -- its
        direction would wait forever, so that is the hook's error."""
        if task is self._task and task.cancelled():
            self._task = None
            hook = self._hook
            if hook is not None:
                self._host.hook_failed(hook, asyncio.CancelledError("its task was cancelled"))
            else:
                self._host.pump_failed(asyncio.CancelledError("a chain's task was cancelled"))

    async def _process(self, data: bytes | None) -> None:
        """Run the chain over one chunk, or (None) over the source's end: each claiming addon's
        eof hook, its output through the later addons' data hooks. Emit what comes out."""
        if data is not None:
            out = await self._through(data, 0)
            if out:
                self._emit(out)
            return
        for index, (_, eof_hook) in enumerate(self._steps):
            if eof_hook is None:
                continue
            flushed = await self._call(eof_hook)
            if flushed:
                flushed = await self._through(flushed, index + 1)
            if flushed is None:
                return
            if flushed:
                self._emit(flushed)

    async def _through(self, data: bytes, start: int) -> bytes | None:
        """`data` through the data hooks of the steps from `start` on; None if the session
        ended meanwhile (a hook raised, reset it, ...)."""
        for data_hook, _ in self._steps[start:]:
            if data_hook is None:
                continue
            out = await self._call(data_hook, data)
            if not out:
                return out  # held back (b""), or the end (None): the rest see nothing
            data = out
        return data

    async def _call(self, hook: Hook, *args: bytes) -> bytes | None:
        """Call one hook (awaiting an `async def` one, within `ADDON_HOOK_TIMEOUT_S`); its bytes,
        or None when the session ended meanwhile (what it raised has been reported)."""
        self._hook = hook
        try:
            out = hook.fn(self._session, *args)
            if hook.is_async:
                timeout = asyncio.timeout(ADDON_HOOK_TIMEOUT_S)
                try:
                    async with timeout:
                        out = await out
                except TimeoutError:
                    if not timeout.expired():
                        raise  # the hook's own
                    raise TimeoutError(f"{hook.name} did not return within "
                                       f"{ADDON_HOOK_TIMEOUT_S:g} s") from None  # fmt: skip
            data = _as_bytes(out, hook)
        except BaseException as exc:  # anything a hook raises ends its session only
            if isinstance(exc, asyncio.CancelledError) and cancelling():
                raise  # the task is being cancelled: `stop()`, or `_task_done` reports it
            self._host.hook_failed(hook, exc)
            return None
        if self.stopped or self._host.over:
            return None  # the hook reset the session (or the session ended around it)
        return data
