"""The proxy server: opens the transparent listeners, accepts in batches, starts a session for each.

Start-up problems (not root, port in use, address not local) raise `StartupError` before anything
is served; after start-up nothing that traffic does can stop the process: each session's failure
ends only that session (see `engine.session`), running out of descriptors never spins or crashes
(see `_accept_batch`), and the timeout sweep -- one task per process that enforces every
session's deadlines (connect, idle, half-closed) -- logs whatever goes wrong in it and carries
on.

Signals: SIGTERM/SIGINT stop accepting at once and let live sessions finish for up to the drain
timeout, then cut the rest (a second signal cuts them at once); SIGHUP reloads the configuration
file, keeping the old configuration if the new one is invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable, Coroutine
from typing import Any

from tproxy.capture.prune import CapturePruner
from tproxy.core.config import (
    InterceptMode,
    ProxyConfig,
    RelayKind,
    max_connections_for,
    reload_from,
)
from tproxy.core.endpoint import format_sockaddr
from tproxy.core.options import ConfigError
from tproxy.core.reasons import CloseReason
from tproxy.core.session_id import SessionIds
from tproxy.core.worker_protocol import Reloaded
from tproxy.engine.client_limits import busiest, client_key, limits_for, refusal_detail
from tproxy.engine.deadlines import DeadlineQueue
from tproxy.engine.poller import Poller
from tproxy.engine.pump import splice_works
from tproxy.engine.session import Session, SessionContext
from tproxy.engine.tls_relay import interception_for
from tproxy.engine.worker_channel import WorkerChannel, list_sessions
from tproxy.interception.nofile import raise_nofile_limit
from tproxy.interception.original_dst import destination_lookup
from tproxy.interception.self_connect import SelfConnectGuard
from tproxy.interception.sockopts import (
    SocketSetupError,
    abort_socket,
    is_local_address,
    open_listener,
    prepare_client_socket,
)
from tproxy.observability.counters import Counters
from tproxy.observability.eventlog import EventLog
from tproxy.observability.events import (
    ConnectionsRefused,
    Event,
    Listening,
    Notice,
    SessionsListed,
    Stopped,
)
from tproxy.tls.ca import CAError
from tproxy.tls.contexts import KEYLOG_DESCRIPTORS, open_keylog

# Accept at most this many connections per readiness event, so one busy listener cannot starve
# the sessions already running on the loop.
ACCEPT_BATCH = 64
# How long stopping waits for its own tasks once cancelled (an addon's hook may never end).
TASKS_STOP_TIMEOUT_S = 5.0
# Out of descriptors even for the reserve trick: stop accepting for this long, then try again.
ACCEPT_BACKOFF_S = 0.1
# How often timeouts are checked, at most: a session is cut within this much after its timeout
# (and within a quarter of the shortest timeout, for short ones).
SWEEP_INTERVAL_S = 1.0
REFUSED_CLIENTS_KEPT = 1024
"""Clients a per-client limit refused, counted by name between two notices (the rest in sum)."""
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

ConfigLoader = Callable[[], ProxyConfig]


def sweep_interval_s(config: ProxyConfig) -> float:
    """How long the timeout sweep sleeps: a second, or a quarter of the shortest timeout."""
    shortest = min(config.connect_timeout_s, config.idle_timeout_s, config.half_closed_timeout_s,
                   config.tls_handshake_timeout_s)  # fmt: skip
    return min(SWEEP_INTERVAL_S, shortest / 4)


def _quiet(_event: Event) -> None:
    """Where a supervised worker's reload notices go: the supervisor writes them once."""


class StartupError(Exception):
    """The proxy cannot start as configured; the message is one sentence for the operator."""


def open_listeners(config: ProxyConfig) -> list[socket.socket]:
    """Bind every configured listener, or none.

    Raises:
        StartupError: one could not be opened (the others are closed again).
    """
    listeners: list[socket.socket] = []
    transparent = config.mode is InterceptMode.TPROXY
    try:
        for endpoint in config.listen:
            listeners.append(open_listener(endpoint, transparent=transparent))
    except SocketSetupError as exc:
        for listener in listeners:
            listener.close()
        raise StartupError(str(exc)) from None
    return listeners


class ProxyServer:
    """Listens on every configured endpoint and serves each accepted connection as a session.

    Args:
        config: the configuration to start with.
        log: where events go.
        reload: re-reads the configuration on SIGHUP (raises ConfigError); None without a file.
    """

    def __init__(
        self,
        config: ProxyConfig,
        log: EventLog,
        reload: ConfigLoader | None = None,
        *,
        listeners: list[socket.socket] | None = None,
        share: int = 1,
        worker: int = 0,
        channel: WorkerChannel | None = None,
    ) -> None:
        self._log = log
        self._reload = reload
        self._listeners: list[socket.socket] = listeners or []
        # This process's share of --max-connections when several workers split the load.
        self._share = share
        # The supervisor's channel (heartbeats, requests), when this process is one of several.
        self._channel = channel
        self._tasks: set[asyncio.Task[None]] = set()
        self._ctx = SessionContext(
            config,
            log,
            SelfConnectGuard(config.listen, is_local_address),
            self._spawn,
            SessionIds(worker),
            destination_lookup(config.mode),
        )
        # With a supervisor, the counters its metrics and `tproxy top` sum (the heartbeats
        # carry them); without one nobody would read them.
        if channel is not None:
            self._ctx.metrics = Counters()
        self._nofile = 0
        self._splice_works = True
        self._max_connections = 0
        # One descriptor kept free so that, when accept() fails with EMFILE, we can free it,
        # accept the waiting connection and reset it instead of leaving it to time out.
        self._reserve_fd = -1
        self._keylog_fd = -1  # --keylog's descriptor, see `open_keylog`
        self._accept_paused = False
        # Connections reset at accept since the last sweep: reason -> [count, detail].
        self._refused: dict[str, list[Any]] = {}
        # Of those, the per-client limits' by client (at most `REFUSED_CLIENTS_KEPT` named).
        self._refused_clients: dict[str, int] = {}
        self._refused_others = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reloading = asyncio.Lock()
        # Without a supervisor this process prunes the capture directory; with one, the
        # supervisor does, for all its workers (`capture.prune`).
        self._pruner = CapturePruner() if channel is None else None

    @property
    def config(self) -> ProxyConfig:
        return self._ctx.config

    def prepare(self) -> None:
        """Per-process set-up: descriptor limit, connection limit, the reserve, splice probe."""
        self._nofile = raise_nofile_limit()
        self._max_connections = self._limit_for(self.config)
        self._ctx.client_limits = limits_for(self.config.max_connections_per_client,
                                             self.config.new_connections_per_client)  # fmt: skip
        self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self._splice_works = splice_works()
        config = self.config
        if config.ca_dir is not None:  # each worker its own leaf key, caches and contexts
            keylog = None
            if config.keylog is not None:  # opened once per process (`open_keylog`)
                try:
                    self._keylog_fd, keylog = open_keylog(config.keylog)
                except ConfigError as exc:
                    raise StartupError(str(exc)) from None
            try:
                self._ctx.interception = interception_for(
                    config.ca_dir,
                    config.upstream_ca,
                    config.tls_handshake_timeout_s,
                    keylog=keylog,
                )
            except CAError as exc:
                raise StartupError(f"--ca: {exc}") from None
        if self.config.relay is RelayKind.SPLICE and not self._splice_works:
            self._ctx.config = dataclasses.replace(self.config, relay=RelayKind.COPY)
            self._log.emit(Notice("splice does not work on this kernel: relaying by copy"))

    def release(self) -> None:
        """Give back what `prepare` took (the reserve descriptor); `serve` does it at its end."""
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
        if self._keylog_fd >= 0:  # the contexts hold their own opens of the file
            os.close(self._keylog_fd)
            self._keylog_fd = -1

    def _limit_for(self, config: ProxyConfig) -> int:
        if config.max_connections is None:
            nofile = self._nofile
            if config.keylog is not None and config.ca_dir is not None:
                nofile -= KEYLOG_DESCRIPTORS  # each context with the key log holds it open
            return max_connections_for(nofile, 3 if config.may_capture else 2)
        return -(-config.max_connections // self._share)  # ceil: the workers' shares add up

    def close_listeners(self) -> None:
        for listener in self._listeners:
            if self._loop is not None and listener.fileno() >= 0:
                self._loop.remove_reader(listener.fileno())
            listener.close()
        self._listeners.clear()

    async def serve(self) -> None:
        """Serve until SIGTERM or SIGINT, drain, and return."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._ctx.poller = Poller(loop)
        self._ctx.sniff_deadlines = DeadlineQueue(loop, self._deadline_failed)
        stop = asyncio.Event()
        received: list[str] = []

        def on_stop_signal(signum: signal.Signals) -> None:
            received.append(signum.name)
            if stop.is_set():  # a second signal: no more waiting
                self._cut_all(CloseReason.SECOND_SIGNAL)
            stop.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        loop.add_signal_handler(signal.SIGUSR1, self._on_list_request)
        self._resume_accepting()
        self._spawn(self._sweep_timeouts())
        if self._channel is not None:
            self._channel.start(loop, self._ctx, reload=self.reload_off_loop)
        self._log.emit(
            Listening(
                [format_sockaddr(s.getsockname()) for s in self._listeners],
                self.config.spoof_source,
                self.config.mark,
                self._nofile,
                self._max_connections,
            )
        )
        try:
            await stop.wait()
        finally:
            self.close_listeners()
            cut = await self._drain(self.config.drain_timeout_s)
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
                loop.remove_signal_handler(signum)
            if self._ctx.ending_hooks:  # the last sessions' async session_end: let them run
                await asyncio.wait(list(self._ctx.ending_hooks), timeout=TASKS_STOP_TIMEOUT_S)
            for task in list(self._tasks):
                task.cancel()
            if self._tasks:
                _, stuck = await asyncio.wait(list(self._tasks), timeout=TASKS_STOP_TIMEOUT_S)
                if stuck:  # an addon's hook that will not stop: not a reason never to exit
                    self._log.emit(Notice(f"{len(stuck)} task(s) did not stop within "
                                          f"{TASKS_STOP_TIMEOUT_S:g} s of being cancelled (an "
                                          "addon's hook?): left behind"))  # fmt: skip
            self._ctx.sniff_deadlines.close()
            self._ctx.poller.close()
            self.release()
            if self._channel is not None:
                self._channel.close()
            self._flush_refusals()  # counted since the last sweep
            self._log.emit(Stopped(received[0] if received else "exit", cut))
            self._log.flush()

    async def _drain(self, timeout_s: float) -> int:
        """Let live sessions finish for up to `timeout_s`; cut the rest; return how many."""
        live = len(self._ctx.sessions)
        if live:
            self._log.emit(
                Notice(
                    f"stopped accepting; draining {live} live sessions for up to {timeout_s:g} s"
                )
            )
        deadline_at = time.monotonic() + timeout_s
        while self._ctx.sessions and time.monotonic() < deadline_at:
            await asyncio.sleep(min(0.05, max(0.0, deadline_at - time.monotonic())))
        cut = len(self._ctx.sessions)
        if cut:
            self._cut_all(CloseReason.DRAIN_TIMEOUT)
            while self._ctx.sessions:
                await asyncio.sleep(0.01)
        return cut

    def _cut_all(self, reason: CloseReason) -> None:
        for session in list(self._ctx.sessions):
            session.close(reason)

    def _on_list_request(self) -> None:
        """SIGUSR1: without a supervisor, log this process's live sessions as the supervisor
        would; a worker leaves listings to its supervisor (which asks over the channel), so a
        stray `pkill -USR1 tproxy` costs nothing."""
        if self._channel is None:
            listing = {"worker": 0, "pid": os.getpid(), **list_sessions(self._ctx, {})}
            self._log.emit(SessionsListed([listing], []))

    def _on_reload(self) -> None:
        """SIGHUP: reload off the event loop (reading the files is quick, but resolving the
        policy's host names may wait for DNS, and sessions must not), then apply."""
        self._spawn(self._reload_quietly())

    async def _reload_quietly(self) -> None:
        await self.reload_off_loop()

    async def reload_off_loop(self) -> Reloaded:
        """Reload (SIGHUP, or the supervisor's `reload` request, `tproxy reload`): whether the
        files were applied, and the notices that say what happened."""
        async with self._reloading:  # one at a time, in the order the signals came
            loaded = await asyncio.to_thread(reload_from, self.config, self._reload)
            return self._apply_reload(*loaded)

    def reload_now(self) -> None:
        """Reload at once, on this thread (what SIGHUP does, for tests and callers without a
        loop)."""
        self._apply_reload(*reload_from(self.config, self._reload))

    def _apply_reload(self, new: ProxyConfig | None, notices: list[str]) -> Reloaded:
        """Apply what can be applied, keep the rest; whether `new` was applied, and every notice
        of this reload. A worker reloads silently: its supervisor reloads the same files and
        writes the notices once for all workers -- except what only a worker can find (its TLS
        interception kept), which each worker says."""
        say = self._log.emit if self._channel is None else _quiet
        said = list(notices)
        if new is not None:
            if new.relay is RelayKind.SPLICE and not self._splice_works:
                new = dataclasses.replace(new, relay=RelayKind.COPY)
            self._ctx.config = new
            # Sessions read the configuration when they start, the sweep on every round; the
            # log's format is the one thing to switch here (before the notices: they show it).
            self._log.log_format = new.log_format
        for notice in notices:
            say(Notice(notice))
        if new is None:
            return False, said
        interception = self._ctx.interception
        if interception is not None and new.ca_dir is not None:
            try:
                self._ctx.interception = interception_for(
                    new.ca_dir, new.upstream_ca, new.tls_handshake_timeout_s, running=interception
                )
            except (OSError, ssl.SSLError) as exc:  # --upstream-ca edited since it was checked
                kept = f"reload: keeping the running TLS interception: --upstream-ca: {exc}"
                self._log.emit(Notice(kept))
                said.append(kept)
        self._max_connections = self._limit_for(new)
        self._ctx.client_limits = limits_for(new.max_connections_per_client,
                                             new.new_connections_per_client,
                                             self._ctx.client_limits)  # fmt: skip
        done = f"reloaded the configuration (max connections {self._max_connections})"
        say(Notice(done))
        said.append(done)
        return True, said

    async def _sweep_timeouts(self) -> None:
        """Every sweep interval, enforce the sessions' deadlines and write the refusal count.

        This one task carries every timeout of the process: whatever goes wrong in one round is
        logged and the next round runs (an exception escaping here would end every timeout of
        this worker, silently).
        """
        while True:
            await asyncio.sleep(sweep_interval_s(self.config))
            try:
                self.sweep_once(time.monotonic())
            except Exception as exc:
                self._log.emit(
                    Notice(f"timeout sweep failed, carrying on: {type(exc).__name__}: {exc}")
                )

    def sweep_once(self, now: float) -> None:
        """One round of the sweep: each session checks its deadlines; a session whose check
        raises is ended as failed (logged with its id), and the others are still checked."""
        for session in list(self._ctx.sessions):
            try:
                session.sweep(now)
            except Exception as exc:  # the session boundary, as in the session's own callbacks
                try:
                    session.fail(exc)
                except Exception as teardown:  # logged; the round goes on
                    self._log.emit(
                        Notice(f"could not end a failed session: {type(teardown).__name__}: "
                               f"{teardown}")
                    )  # fmt: skip
        self._flush_refusals()
        self._prune_captures_if_due(now)

    # --- capture directory pruning (issue 11), only without a supervisor -----------------------

    def _prune_captures_if_due(self, now: float) -> None:
        if self._pruner is not None and self._pruner.due(now, self.config):
            self._spawn(self._prune_captures_off_loop(self._pruner))

    async def _prune_captures_off_loop(self, pruner: CapturePruner) -> None:
        """Listing and deleting files may wait for the disk; sessions must not."""
        try:
            notices = await asyncio.to_thread(pruner.run, self.config)
        except Exception as exc:  # logged; the next round tries again
            notices = [f"capture prune failed: {type(exc).__name__}: {exc}"]
        for notice in notices:
            self._log.emit(Notice(notice))

    def _deadline_failed(self, _waiter: object, exc: Exception) -> None:
        """A sniff deadline's handler raised past its session's own boundary (a bug): logged,
        and the queue goes on with the next."""
        self._log.emit(Notice(f"sniff deadline failed: {type(exc).__name__}: {exc}"))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """The one place tasks are created: keeps a reference until the task is done."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
            self._reopen_reserve()
            self._resume_accepting()

    def _refuse(self, sock: socket.socket, reason: str, why: str) -> None:
        abort_socket(sock)
        if self._ctx.metrics is not None:
            self._ctx.metrics.refuse(reason)
        counted = self._refused.get(reason)
        if counted is None:
            self._refused[reason] = [1, why]
        else:
            counted[0] += 1
            counted[1] = why  # the latest words (the limit may have been reloaded)

    def _refuse_client(self, sock: socket.socket, reason: str, key: str) -> None:
        """A per-client limit refused `key`'s new connection: counted with the others, and by
        client for the notice that names the busiest."""
        limits = self._ctx.client_limits
        assert limits is not None
        self._refuse(sock, reason, refusal_detail(reason, limits))
        clients = self._refused_clients
        if key in clients:
            clients[key] += 1
        elif len(clients) < REFUSED_CLIENTS_KEPT:
            clients[key] = 1
        else:
            self._refused_others += 1

    def _flush_refusals(self) -> None:
        for reason, (count, why) in self._refused.items():
            self._log.emit(ConnectionsRefused(count, reason, why))
        self._refused.clear()
        clients = self._refused_clients
        if clients:
            total = sum(clients.values()) + self._refused_others
            self._log.emit(
                Notice(
                    f"per-client limits reset {total} new connections since the last notice; "
                    f"the busiest clients: {busiest(clients)}"
                )
            )
            clients.clear()
            self._refused_others = 0

    def _accept_batch(self, listener: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued: nothing to serve
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._reset_one_waiting(listener):
                    continue
                if exc.errno in _RESOURCE_ERRNOS:
                    self._pause_accepting(exc)
                    return
                raise
            if self._ctx.active >= self._max_connections:
                why = f"max connections ({self._max_connections}) reached"
                self._refuse(sock, "max_connections", why)
                continue
            key = None
            limits = self._ctx.client_limits
            if limits is not None:
                key = client_key(addr[0])
                over = limits.admit(key, time.monotonic())
                if over is not None:
                    self._refuse_client(sock, over, key)
                    continue
            try:
                prepare_client_socket(sock)
            except OSError:
                abort_socket(sock)  # reset before we got to it
                if limits is not None and key is not None:
                    limits.release(key)
                continue
            Session(self._ctx, sock, addr, key).start()  # (never raises: its own boundary)

    def _reset_one_waiting(self, listener: socket.socket) -> bool:
        """Out of descriptors: free the reserve, accept one waiting connection, reset it."""
        if self._reserve_fd < 0:
            return False
        os.close(self._reserve_fd)
        self._reserve_fd = -1
        try:
            sock, _ = listener.accept()
        except OSError:
            sock = None
        if sock is not None:
            # Frees the slot the reserve had.
            self._refuse(sock, "out_of_descriptors", "out of file descriptors")
        self._reopen_reserve()
        return sock is not None

    def _reopen_reserve(self) -> None:
        if self._reserve_fd < 0:
            with contextlib.suppress(OSError):
                self._reserve_fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
