"""The proxy server: opens the transparent listeners, accepts in batches, runs one task per session.

Start-up problems (not root, port in use, address not local) raise `StartupError` before anything
is served; after start-up nothing that traffic does can stop the process: each session's failure
ends only that session (see `engine.session`), and running out of descriptors pauses accepting
for a moment instead of spinning or crashing.
"""

from __future__ import annotations

import asyncio
import errno
import signal
import socket
from collections.abc import Coroutine
from typing import Any

from tproxy.core.config import ProxyConfig
from tproxy.core.endpoint import Endpoint
from tproxy.engine.session import SessionContext, run_session
from tproxy.interception.nofile import raise_nofile_limit
from tproxy.interception.self_connect import SelfConnectGuard
from tproxy.interception.sockopts import (
    SocketSetupError,
    is_local_address,
    open_transparent_listener,
    prepare_client_socket,
)
from tproxy.observability.eventlog import EventLog
from tproxy.observability.events import Listening, Notice, Stopped

# Accept at most this many connections per readiness event, so one busy listener cannot starve
# the sessions already running on the loop.
ACCEPT_BATCH = 64
# Out of descriptors or memory: stop accepting for this long, then try again.
ACCEPT_BACKOFF_S = 0.1
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class StartupError(Exception):
    """The proxy cannot start as configured; the message is one sentence for the operator."""


class ProxyServer:
    """Listens on every configured endpoint and serves each accepted connection as a session."""

    def __init__(self, config: ProxyConfig, log: EventLog) -> None:
        self._config = config
        self._log = log
        self._listeners: list[socket.socket] = []
        self._sessions: set[asyncio.Task[None]] = set()
        self._ctx = SessionContext(config, log, SelfConnectGuard(config.listen, is_local_address))
        self._accept_paused = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def open(self) -> int:
        """Raise the descriptor limit and bind every listener; return the descriptor limit.

        Raises:
            StartupError: a listener could not be opened (nothing stays open then).
        """
        nofile = raise_nofile_limit()
        try:
            for endpoint in self._config.listen:
                self._listeners.append(open_transparent_listener(endpoint))
        except SocketSetupError as exc:
            self.close_listeners()
            raise StartupError(str(exc)) from None
        return nofile

    def close_listeners(self) -> None:
        for listener in self._listeners:
            if self._loop is not None and listener.fileno() >= 0:
                self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()

    async def serve(self, nofile_limit: int) -> None:
        """Serve until SIGTERM or SIGINT; then stop accepting, cut live sessions and return."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        stop = asyncio.Event()
        received: list[str] = []

        def on_signal(signum: signal.Signals) -> None:
            received.append(signum.name)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        self._resume_accepting()
        self._log.emit(
            Listening(
                [str(Endpoint.from_sockaddr(s.getsockname())) for s in self._listeners],
                self._config.spoof_source,
                self._config.mark,
                nofile_limit,
            )
        )
        try:
            await stop.wait()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            self.close_listeners()
            cut = len(self._sessions)
            for task in list(self._sessions):
                task.cancel()
            if self._sessions:
                await asyncio.wait(list(self._sessions))
            self._log.emit(Stopped(received[0] if received else "exit", cut))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """The one place session tasks are created: keeps a reference until the task is done."""
        task = asyncio.ensure_future(coro)
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)

    def _resume_accepting(self) -> None:
        assert self._loop is not None
        self._accept_paused = False
        for listener in self._listeners:
            self._loop.add_reader(listener.fileno(), self._accept_batch, listener)

    def _pause_accepting(self, exc: OSError) -> None:
        assert self._loop is not None
        if not self._accept_paused:
            self._log.emit(
                Notice(
                    f"accept paused for {ACCEPT_BACKOFF_S:g} s: {exc.strerror} "
                    f"({self._ctx.active} active sessions)"
                )
            )
        self._accept_paused = True
        for listener in self._listeners:
            self._loop.remove_reader(listener.fileno())
        self._loop.call_later(ACCEPT_BACKOFF_S, self._resume_if_open)

    def _resume_if_open(self) -> None:
        if self._listeners:
            self._resume_accepting()

    def _accept_batch(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued: nothing to serve
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._pause_accepting(exc)
                    return
                raise
            try:
                prepare_client_socket(sock)
            except OSError:
                sock.close()  # reset before we got to it
                continue
            self._spawn(run_session(self._ctx, sock, Endpoint.from_sockaddr(addr)))
