"""The supervisor: N worker processes, kept alive, watched, asked, and told to stop.

The parent binds the listeners (so "port in use" is caught once, before anything forks), then
forks one worker per CPU. Each worker runs its own event loop and sessions. The parent does
nothing on the data path: it forwards SIGTERM/SIGINT/SIGHUP to the workers, restarts a worker
that dies without being told to (with a pause if workers keep dying), and exits 0 once every
worker has finished its drain after a stop signal. At the first stop signal it closes its own
copies of the listening sockets, as each worker does: a listening socket lives as long as any
copy of it, and one left open in the parent would complete new handshakes into a backlog that
nobody reads for the whole drain.

Listening: one socket per worker, each client address steered to one worker
(`engine.steering`: SO_REUSEPORT and a classic BPF program on the client's source address), so
that per-client state can live in one worker. Measured against one listening socket shared by
all workers (bench/steering.py; two workers on the shared 2-core machine, load average 2.5-7.3;
wrk `Connection: close` through the TPROXY path, 10 interleaved rounds): steered/shared new
connections/s in the same round, 64 clients 1.03 (0.82-1.83) IPv4 and 0.92 (0.64-2.52) IPv6,
one client 0.94 (0.39-1.63) and 1.22 (0.56-2.50) -- no cost that clears the noise. Balance over
64 equal clients: the busiest worker had 0.50 of the sessions steered, 0.50-0.58 shared; but one
client is always one worker's. nft's `tproxy` lookup honoured the program on IPv4 and IPv6 in
every measurement. The parent keeps every socket open so a restarted worker gets its own back.

The channel: each worker has a SOCK_SEQPACKET socketpair with the parent (`core.worker_protocol`
for the messages, `engine.worker_channel` for the worker's end). Workers send a heartbeat with
their counters every second; a worker silent for `STALL_AFTER_S` is reported once in a notice,
and so is its recovery. `Supervisor.ask` sends a request to every worker and collects the
replies (SIGUSR1: the live sessions of every worker, logged as one `sessions` event; the
control socket's `sessions`, `kill` and `reload`, answered once the workers replied).

TLS passthrough, shared: a worker sends each entry its memory remembers (`Learned`); the
supervisor merges it into a copy of its own (a `PassthroughMemory`, bounded alike, expired on its
tick) and passes it on to every other worker; a worker it starts (or restarts after a crash) gets
the whole copy first. Bounded: what a worker's channel cannot take at once waits in its outbox
(the snapshot of a full memory is larger than a channel's buffer), at most `OUTBOX_BYTES`; past
that it is dropped and counted, one notice every `DROPS_REPORT_EVERY_S`.

The loop is plain `selectors`, not asyncio (forking from inside an event loop is asking for
trouble): signals arrive as bytes through `signal.set_wakeup_fd`, next to the channels.
docs/life-of-a-connection.md ("State across workers") has the whole design, with what happens
when a worker dies or stalls.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import socket
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from tproxy.core.worker_protocol import (
    MAX_MESSAGE_BYTES,
    RELOAD_TIMEOUT_S,
    REPLY_TIMEOUT_S,
    STALL_AFTER_S,
    Drops,
    Gathering,
    Heartbeat,
    Learned,
    MessageError,
    Reloaded,
    Reply,
    Request,
    Watchdog,
    decode,
    encode,
    learned_batches,
)
from tproxy.engine.control import Answer, ControlError, ControlServer, Handover
from tproxy.engine.metrics_endpoint import MetricsEndpoint
from tproxy.observability.counters import Sums
from tproxy.observability.eventlog import EventLog
from tproxy.observability.events import Notice, SessionsListed
from tproxy.observability.prometheus import Process, render
from tproxy.service.notify import Notifier
from tproxy.service.readiness import ServiceNotes
from tproxy.tls.passthrough import PassthroughMemory

_STOP = (signal.SIGTERM, signal.SIGINT)
_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD, signal.SIGUSR1)
# A worker that dies this soon after its start counts as crashing; restarts then wait.
CRASH_WINDOW_S = 1.0
RESTART_PAUSE_S = 1.0
# The supervisor's loop wakes up at least this often (watchdog, reply deadlines, restarts).
TICK_S = 0.25
CHANNEL_BUFFER_BYTES = 1 << 20
# What may wait for one worker's channel to take it (learned passthrough entries): a snapshot
# of a full memory is 1-3.5 MiB (10,000 entries of 100-350 bytes), more than a channel's buffer.
OUTBOX_BYTES = 4 << 20

WorkerMain = Callable[[int, socket.socket], int]
"""Runs in the child as worker `worker_id` with its end of the channel; returns its exit status.
It must install its own signal handling (the child starts with the default dispositions)."""

ListingDone = Callable[[Gathering], None]


class Outbox:
    """What waits for a worker's channel: the messages its buffer could not take yet, in
    order, at most `limit_bytes` of them."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit_bytes = limit_bytes
        self._bytes = 0
        self._queue: deque[bytes] = deque()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def send(self, sock: socket.socket, data: bytes) -> bool:
        """Send `data` after what already waits, or keep it to send later; False: dropped (the
        outbox is full)."""
        if self._queue or not _sent(sock, data):
            if self._bytes + len(data) > self._limit_bytes:
                return False
            self._queue.append(data)
            self._bytes += len(data)
        return True

    def flush(self, sock: socket.socket) -> None:
        """Send what waits, until the channel takes no more."""
        while self._queue and _sent(sock, self._queue[0]):
            self._bytes -= len(self._queue.popleft())

    def clear(self) -> None:
        self._queue.clear()
        self._bytes = 0


def _sent(sock: socket.socket, data: bytes) -> bool:
    """Whether the channel took `data` at once (a dying worker's takes everything: its
    reap follows)."""
    try:
        sock.send(data)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        pass
    return True


@dataclass(slots=True)
class _Worker:
    id: int
    pid: int
    started_at: float
    channel: socket.socket | None
    outbox: Outbox = field(default_factory=lambda: Outbox(OUTBOX_BYTES))


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The handler the supervisor's signals get: the wakeup descriptor does the rest."""


class Supervisor:
    """Forks `count` workers, keeps them running, multiplexes signals and worker channels.

    Args:
        count: how many workers.
        worker_main: what each child runs.
        log: the supervisor's own notices.
        listeners: the parent's copies of the listening sockets, closed at the first stop signal.
        stall_after_s: a worker silent this long is reported as stalled.
        on_reload: the supervisor's own part of SIGHUP and `tproxy reload` (its log's format,
            the configuration a restarted worker starts with, the notices, written once for
            all workers): whether it applied the files, and those notices.
        on_tick: housekeeping done once for all workers, called with the monotonic time on
            every round of the loop (at least every `TICK_S`) until the first stop signal; it
            keeps its own schedule (pruning the capture directory: `capture.prune`).
        notifier: systemd's notify socket (`service.notify`), told READY=1, WATCHDOG=1,
            STATUS= and STOPPING=1 as `service.readiness` decides.
        watchdog_every_s: how often systemd wants WATCHDOG=1 (None: no watchdog).
        control: the control socket's listening socket and path (`engine.control`), served
            from the start; None: none yet.
        handover: what a `takeover` request gets (`engine.takeover.handover`).
        on_serving: called once, when every worker serves; may return the control socket to
            serve from then on (a takeover's new process gets its path only then).
        metrics: the metrics endpoint's listening socket (`--metrics-listen`), served from
            the start (or, `metrics_when_serving`, once every worker serves) until the first
            stop signal; None: none.
        metrics_when_serving: the socket came from the proxy this one takes over, which
            answers on it until then: two processes answering in turn would show the scraper
            two sets of counters.
        version: tproxy's version, for the metrics' build info and `tproxy top`.
    """

    def __init__(
        self,
        count: int,
        worker_main: WorkerMain,
        log: EventLog,
        listeners: Sequence[socket.socket] = (),
        *,
        stall_after_s: float = STALL_AFTER_S,
        on_reload: Callable[[], Reloaded] | None = None,
        on_tick: Callable[[float], None] | None = None,
        notifier: Notifier | None = None,
        watchdog_every_s: float | None = None,
        control: tuple[socket.socket, str] | None = None,
        handover: Handover | None = None,
        on_serving: Callable[[], tuple[socket.socket, str] | None] | None = None,
        metrics: socket.socket | None = None,
        metrics_when_serving: bool = False,
        version: str = "",
    ) -> None:
        self._count = count
        self._metrics_when_serving = metrics_when_serving
        self._metrics_sock = metrics
        self._metrics: MetricsEndpoint | None = None
        self._version = version
        self._started_at = time.time()
        self._started_mono = time.monotonic()
        # Every worker's counters, summed for the metrics and `tproxy top` (`stats`).
        self._sums = Sums()
        self._restarts = 0
        self._control_sock = control
        self._control: ControlServer | None = None
        self._handover = handover
        self._on_serving = on_serving
        self._served = False
        self._notifier = notifier
        self._notes = ServiceNotes(count, watchdog_every_s)
        self._on_reload = on_reload
        self._on_tick = on_tick
        self._worker_main = worker_main
        self._log = log
        self._listeners = listeners
        self._workers: dict[int, _Worker] = {}  # by pid
        self._restart_at: dict[int, float] = {}  # worker id -> when to start it again
        self._watchdog = Watchdog(stall_after_s)
        self._gatherings: list[tuple[Gathering, ListingDone]] = []
        self._next_request_id = 1
        # Every worker's learned passthrough entries (what a worker started later gets first).
        self._passthrough = PassthroughMemory()
        self._learned_drops = Drops()
        self._stopping = False
        self._worst = 0
        self._selector = selectors.DefaultSelector()
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._old_handlers: dict[int, Any] = {}
        self._old_wakeup_fd = -1

    @property
    def latest(self) -> dict[int, Heartbeat]:
        """Each live worker's last heartbeat, by worker id."""
        return dict(self._watchdog.latest)

    def run(self) -> int:
        """Run the workers until every one has stopped after a stop signal; the exit status."""
        self._install_signals()
        if self._control_sock is not None:
            self._serve_control(*self._control_sock)
        if not self._metrics_when_serving:
            self._serve_metrics()
        try:
            for worker_id in range(1, self._count + 1):
                self._start(worker_id)
            while self._workers or (self._restart_at and not self._stopping):
                try:
                    self._step()
                except Exception as exc:  # the supervisor outlives its own bugs: log, go on
                    self._log.emit(
                        Notice(f"supervisor error, carrying on: {type(exc).__name__}: {exc}")
                    )
        finally:
            if self._control is not None:
                self._control.close()
            self._close_metrics()
            self._restore_signals()
            self._selector.close()
        return self._worst

    def _serve_control(self, sock: socket.socket, path: str) -> None:
        self._control = ControlServer(
            sock, path, self._watch,
            handover=None if self._handover is None else self._handover_unless_stopping,
            on_drain=lambda: self._stop("takeover"),
            on_notice=lambda text: self._log.emit(Notice(text)),
            commands={"sessions": self._sessions_for_control, "kill": self._kill_for_control,
                      "stats": self._stats_for_control, "reload": self._reload_for_control},
        )  # fmt: skip

    def _handover_unless_stopping(self) -> tuple[dict[str, Any], list[int]]:
        if self._stopping:
            raise ControlError("it is stopping: start the new one plainly once it has")
        assert self._handover is not None
        return self._handover()

    def _watch(self, sock: socket.socket, callback: Callable[[], None] | None) -> None:
        if callback is None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(sock)
        else:
            self._selector.register(sock, selectors.EVENT_READ, callback)

    def ask(
        self, command: str, args: dict[str, Any], done: ListingDone,
        timeout_s: float = REPLY_TIMEOUT_S,
    ) -> None:  # fmt: skip
        """Send `command` to every live worker; call `done` with the replies once all answered or
        `timeout_s` passed."""
        request = Request(self._next_request_id, command, args)
        self._next_request_id += 1
        data = encode(request)
        asked = {w.id: w for w in self._workers.values() if w.channel is not None}
        gathering = Gathering(request, set(asked), time.monotonic() + timeout_s)
        for worker in asked.values():
            assert worker.channel is not None
            try:
                worker.channel.send(data)
            except OSError:  # its buffer is full (stalled) or it is dying
                gathering.unreachable(worker.id)
        self._gatherings.append((gathering, done))

    # --- the loop ------------------------------------------------------------------------

    def _step(self) -> None:
        for key, _ in self._selector.select(TICK_S):
            if key.data is None:
                self._on_signals()
            elif isinstance(key.data, _Worker):
                self._on_channel(key.data)
            else:
                key.data()  # the control socket's
        self._reap()
        now = time.monotonic()
        if not self._stopping:
            for worker_id, at in list(self._restart_at.items()):
                if now >= at:
                    del self._restart_at[worker_id]
                    self._start(worker_id)
        for stalled in self._watchdog.check(now):
            self._log.emit(
                Notice(
                    f"worker {stalled.worker} ({self._pid_text(stalled.worker)}) sent no "
                    f"heartbeat for {stalled.silent_s:.1f} s: its event loop is stuck or stopped"
                )
            )
        for entry in list(self._gatherings):
            gathering, done = entry
            if gathering.done(now):
                self._gatherings.remove(entry)
                done(gathering)
        self._share_now(now)
        if self._metrics is not None:
            self._metrics.expire(now)
        self._notify(self._notes.tick(now, self._watchdog.latest,
                                      self._watchdog.answering(now, self._count)))  # fmt: skip
        if self._notes.ready and not self._served:
            self._served = True
            self._now_serving()
        if self._on_tick is not None and not self._stopping:
            self._on_tick(now)  # its exceptions: logged by run(), like the loop's own

    def _on_signals(self) -> None:
        assert self._wake_r is not None
        while True:
            try:
                data = self._wake_r.recv(512)
            except (BlockingIOError, InterruptedError):
                return
            for signum in data:
                self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        if signum in _STOP:
            self._stop(signal.Signals(signum).name, signum)
        elif signum == signal.SIGHUP:
            if self._on_reload is not None:
                self._on_reload()  # before the workers: a worker forked after it starts as reloaded
            self._tell(signal.SIGHUP)
        elif signum == signal.SIGUSR1:
            self.ask("sessions", {}, self._log_listing)

    def _stop(self, why: str, signum: int = signal.SIGTERM) -> None:
        """A stop signal (or a takeover's new process serving): close our copies of the
        listening sockets, tell the workers (a second signal cuts their drain)."""
        if not self._stopping:
            self._log.emit(Notice(f"{why}: stopping {self._count} workers"))
            close_all(self._listeners)
            self._stop_metrics()  # a takeover's new process answers there from now on
            self._restart_at.clear()
            self._notify(self._notes.stop(time.monotonic(), self._watchdog.latest))
        self._stopping = True
        self._tell(signum)

    def _now_serving(self) -> None:
        """Every worker serves: a takeover's new process takes the control socket's path now,
        and answers scrapes on the metrics socket it was handed."""
        if self._on_serving is not None:
            try:
                control = self._on_serving()
            except ControlError as exc:
                self._log.emit(Notice(str(exc)))
                return
            if control is not None:
                self._serve_control(*control)
        self._serve_metrics()

    def _on_channel(self, worker: _Worker) -> None:
        channel = worker.channel
        while channel is not None:
            try:
                data = channel.recv(MAX_MESSAGE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the worker is exiting; the reap restarts it if it should
                self._close_channel(worker)
                return
            try:
                message = decode(data)
            except MessageError as exc:
                self._log.emit(Notice(f"worker {worker.id}: ignored a malformed message ({exc})"))
                continue
            now = time.monotonic()
            beat = message if isinstance(message, Heartbeat) else None
            recovered = self._watchdog.heard(worker.id, now, beat)
            if beat is not None:
                self._sums.heard(beat)
            if recovered is not None:
                self._log.emit(
                    Notice(
                        f"worker {worker.id} (pid {worker.pid}) is answering again after "
                        f"{recovered.silent_s:.1f} s of silence"
                    )
                )
            if isinstance(message, Reply):
                for gathering, _ in self._gatherings:
                    gathering.add(message)
            elif isinstance(message, Learned):
                self._learned(worker, message, data, now)

    def _notify(self, datagram: bytes) -> None:
        if datagram and self._notifier is not None:
            self._notifier.send(datagram)  # never raises; a failure is counted there

    # --- passthrough sharing -------------------------------------------------------------

    def _learned(self, sender: _Worker, message: Learned, data: bytes, now: float) -> None:
        """Keep what `sender` learned, and pass it on to every other worker."""
        for key, reason, left_s in message.entries:
            self._passthrough.merge(key, reason, left_s, now)
        for worker in self._workers.values():
            if worker is sender or worker.channel is None:
                continue
            if not worker.outbox.send(worker.channel, data):
                self._learned_drops.add(len(message.entries))

    def _welcome(self, worker: _Worker, now: float) -> None:
        """A worker just started: everything learned so far, before anything else."""
        assert worker.channel is not None
        for batch in learned_batches(self._passthrough.snapshot(now)):
            if not worker.outbox.send(worker.channel, encode(batch)):
                self._learned_drops.add(len(batch.entries))

    def _share_now(self, now: float) -> None:
        """On every round: send what waits, forget what expired, report what was dropped."""
        for worker in self._workers.values():
            if worker.outbox and worker.channel is not None:
                worker.outbox.flush(worker.channel)
        self._passthrough.expire(now)
        dropped = self._learned_drops.due(now)
        if dropped:
            self._log.emit(
                Notice(
                    f"{dropped} learned TLS passthrough entries were not passed on to a worker "
                    "whose channel was full (stalled?): it learns those names for itself"
                )
            )

    def _reap(self) -> None:
        for pid, status in _reap():
            worker = self._workers.pop(pid, None)
            if worker is None:
                continue
            self._close_channel(worker)
            self._watchdog.forget(worker.id)
            self._sums.gone(worker.id)
            for gathering, _ in self._gatherings:
                gathering.lost(worker.id)
            code = os.waitstatus_to_exitcode(status)
            if self._stopping:
                self._worst = max(self._worst, code if code >= 0 else 1)
                continue
            how = f"exit status {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            self._log.emit(
                Notice(f"worker {worker.id} (pid {pid}) ended with {how}; restarting it")
            )
            self._restarts += 1
            crashed = time.monotonic() - worker.started_at < CRASH_WINDOW_S
            self._restart_at[worker.id] = time.monotonic() + (RESTART_PAUSE_S if crashed else 0)

    # --- workers -------------------------------------------------------------------------

    def _start(self, worker_id: int) -> None:
        parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for end in (parent_end, child_end):
            for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    end.setsockopt(socket.SOL_SOCKET, option, CHANNEL_BUFFER_BYTES)
        # Blocked across the fork: a signal must not reach the supervisor's handler in the
        # child (it would write to the supervisor's wakeup socket, as if sent to the parent).
        signal.pthread_sigmask(signal.SIG_BLOCK, _HANDLED)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # A process group of its own: a terminal's Ctrl-C (sent to the whole foreground
                # group) reaches the supervisor only, which passes it on once; otherwise each
                # worker would get it twice and take the second as "cut everything now".
                os.setpgid(0, 0)
                parent_end.close()
                self._become_worker()
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
                code = self._worker_main(worker_id, child_end)
            except Exception:
                traceback.print_exc()  # before _exit, which would lose it
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HANDLED)
        child_end.close()
        self._adopt(worker_id, pid, parent_end)

    def _adopt(self, worker_id: int, pid: int, channel: socket.socket) -> _Worker:
        """The parent's part of starting a worker: watch it and its channel, and send it every
        passthrough entry learned so far (before anything else)."""
        channel.setblocking(False)
        worker = _Worker(worker_id, pid, time.monotonic(), channel)
        self._workers[pid] = worker
        self._selector.register(channel, selectors.EVENT_READ, worker)
        self._watchdog.started(worker_id, worker.started_at)
        self._welcome(worker, worker.started_at)
        return worker

    def _become_worker(self) -> None:
        """In the child: drop everything of the supervisor's (its signal handling, its
        descriptors, the other workers' channels)."""
        self._restore_signals()
        for worker in self._workers.values():
            if worker.channel is not None:
                worker.channel.close()
        self._selector.close()
        if self._control is not None:
            self._control.drop()
        if self._metrics is not None:
            self._metrics.drop()
        elif self._metrics_sock is not None:
            self._metrics_sock.close()
        if self._notifier is not None:  # systemd hears the supervisor only (NotifyAccess=main)
            self._notifier.close()
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            os.environ.pop(name, None)

    def _close_channel(self, worker: _Worker) -> None:
        worker.outbox.clear()
        if worker.channel is not None:
            self._selector.unregister(worker.channel)
            worker.channel.close()
            worker.channel = None

    def _tell(self, signum: int) -> None:
        for pid in self._workers:
            with contextlib.suppress(ProcessLookupError):  # already gone: reaped next
                os.kill(pid, signum)

    def _pid_text(self, worker_id: int) -> str:
        pids = [w.pid for w in self._workers.values() if w.id == worker_id]
        return f"pid {pids[0]}" if pids else "gone"

    def _sessions_for_control(self, request: dict[str, Any], answer: Answer) -> None:
        """`tproxy sessions`: every worker's live sessions, once all answered (or 2 s)."""
        self.ask("sessions", {}, lambda gathering: answer(self._listing(gathering)))

    def _kill_for_control(self, request: dict[str, Any], answer: Answer) -> None:
        """`tproxy kill ID`: every worker is asked; the one whose session it is resets it."""
        session_id = request.get("id")
        if not isinstance(session_id, str) or not session_id:
            answer({"killed": None, "error": "no session id"})
            return

        def done(gathering: Gathering) -> None:
            killed = [w for w, r in gathering.replies.items()
                      if isinstance(r.result, dict) and r.result.get("killed") is True]  # fmt: skip
            answer({"killed": killed[0] if killed else None, "missing": gathering.missing})

        self.ask("kill", {"id": session_id}, done)

    def _reload_for_control(self, request: dict[str, Any], answer: Answer) -> None:
        """`tproxy reload` (systemd's ExecReload): what SIGHUP does, answered once it is done.
        The supervisor reloads the files first; only if it applied them is every worker asked
        to reload them too (a file the supervisor refuses is offered to no worker), and the
        answer waits for their replies, for `RELOAD_TIMEOUT_S` or twice the supervisor's own
        reload, whichever is longer (each worker resolves the policy's names again). It says
        whether the supervisor applied the files, its notices, each worker's outcome and
        notices, the workers that did not answer in that time (`missing`), and those that died
        meanwhile (`died`: a worker started in place of one runs the supervisor's new
        configuration)."""
        if self._stopping:
            answer({"reloaded": False, "notices": ["it is stopping: nothing reloaded"]})
            return
        started = time.monotonic()
        applied, notices = (False, []) if self._on_reload is None else self._on_reload()
        if not applied:
            answer({"reloaded": False, "notices": notices})
            return
        wait_s = max(RELOAD_TIMEOUT_S, 2 * (time.monotonic() - started))

        def done(gathering: Gathering) -> None:
            workers: dict[str, Any] = {}
            for worker_id, reply in sorted(gathering.replies.items()):
                result = reply.result if isinstance(reply.result, dict) else {}
                said = result.get("notices")
                if reply.error:
                    said = [reply.error]
                elif not isinstance(said, list) or not all(isinstance(n, str) for n in said):
                    said = []
                ok = not reply.error and result.get("reloaded") is True
                workers[str(worker_id)] = {"reloaded": ok, "notices": said}
            answer({"reloaded": True, "notices": notices, "workers": workers,
                    "missing": gathering.silent, "died": gathering.died,
                    "waited_s": round(wait_s, 1)})  # fmt: skip

        self.ask("reload", {}, done, timeout_s=wait_s)

    def _stats_for_control(self, request: dict[str, Any], answer: Answer) -> None:
        """`tproxy top`: the counters summed over every worker (their last heartbeats)."""
        answer(self.stats())

    def stats(self) -> dict[str, Any]:
        """The sums as `stats` answers them (README: "Reading tproxy top")."""
        return {
            "version": self._version,
            "uptime_s": round(time.monotonic() - self._started_mono, 3),
            "workers": {"running": len(self._workers), "restarts": self._restarts},
            **self._sums.totals().as_json(),
        }

    def _exposition(self, accept: str) -> tuple[bytes, str]:
        process = Process(self._version, self._started_at, len(self._workers), self._restarts)
        return render(self._sums.totals(), process, accept)

    def _serve_metrics(self) -> None:
        if self._metrics_sock is not None and self._metrics is None and not self._stopping:
            self._metrics = MetricsEndpoint(self._metrics_sock, self._selector, self._exposition)

    def _stop_metrics(self) -> None:
        """Accept no more scrapes (those in flight are answered)."""
        if self._metrics is not None:
            self._metrics.stop_listening()
        elif self._metrics_sock is not None:
            self._metrics_sock.close()
        self._metrics_sock = None

    def _close_metrics(self) -> None:
        self._stop_metrics()
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def _listing(self, gathering: Gathering) -> dict[str, Any]:
        pids = {w.id: w.pid for w in self._workers.values()}
        workers = []
        missing = set(gathering.missing)
        for worker_id, reply in sorted(gathering.replies.items()):
            listing = _listing_of(reply.result)
            if reply.error or listing is None:
                missing.add(worker_id)
                continue
            workers.append({"worker": worker_id, "pid": pids.get(worker_id), **listing})
        return {"workers": workers, "missing": sorted(missing)}

    def _log_listing(self, gathering: Gathering) -> None:
        listing = self._listing(gathering)
        self._log.emit(SessionsListed(listing["workers"], listing["missing"]))

    # --- signals -------------------------------------------------------------------------

    def _install_signals(self) -> None:
        """Signals arrive as bytes on a socketpair the loop watches (signal.set_wakeup_fd): the
        handlers themselves do nothing, so no Python code runs at an arbitrary point."""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        for signum in _HANDLED:
            self._old_handlers[signum] = signal.signal(signum, _ignore)

    def _restore_signals(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()
        signal.set_wakeup_fd(self._old_wakeup_fd)
        for end in (self._wake_r, self._wake_w):
            if end is not None:
                end.close()
        self._wake_r = self._wake_w = None


def _listing_of(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """A worker's `sessions` reply in the shape the `sessions` event promises, or None if it is
    not one (a worker's bug must not become a supervisor's crash)."""
    if not isinstance(result, dict):
        return None
    active, sessions = result.get("active"), result.get("sessions")
    if isinstance(active, bool) or not isinstance(active, int) or not isinstance(sessions, list):
        return None
    return {"active": active, "sessions": sessions, "truncated": bool(result.get("truncated"))}


def run_workers(
    count: int,
    worker_main: WorkerMain,
    log: EventLog,
    listeners: Sequence[socket.socket] = (),
    on_reload: Callable[[], Reloaded] | None = None,
    *,
    on_tick: Callable[[float], None] | None = None,
    notifier: Notifier | None = None,
    watchdog_every_s: float | None = None,
    control: tuple[socket.socket, str] | None = None,
    handover: Handover | None = None,
    on_serving: Callable[[], tuple[socket.socket, str] | None] | None = None,
    metrics: socket.socket | None = None,
    metrics_when_serving: bool = False,
    version: str = "",
) -> int:
    """Run `worker_main(worker_id, channel)` in `count` child processes until told to stop;
    the exit status (the worst of the workers' after a stop). See `Supervisor`."""
    return Supervisor(
        count, worker_main, log, listeners, on_reload=on_reload, on_tick=on_tick,
        notifier=notifier, watchdog_every_s=watchdog_every_s, control=control,
        handover=handover, on_serving=on_serving, metrics=metrics,
        metrics_when_serving=metrics_when_serving, version=version,
    ).run()  # fmt: skip


def _reap() -> list[tuple[int, int]]:
    reaped: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped.append((pid, status))


def close_all(listeners: Sequence[socket.socket]) -> None:
    """Close every listener (closing one twice is harmless)."""
    for listener in listeners:
        listener.close()
