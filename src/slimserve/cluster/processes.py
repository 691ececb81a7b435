"""Several server processes sharing one machine's ports (`slimserve serve --workers N`).

Python runs one request's parsing and encoding at a time per process, so on a machine with
spare cores one process is bound by its event loop long before the model is. The parent binds
the HTTP socket once and hands it to N worker processes (started with `spawn`, so no state is
shared by accident); the kernel spreads new connections across the workers accepting on it.
Each worker binds the gRPC port itself with SO_REUSEPORT. Every worker is a whole server with
its own engine: its own models (the memory budget is split between workers unless given),
batches, rate limits and metrics; the response cache is shared only with --redis-url.

The parent supervises: a worker that dies is started again after a backoff while the others
keep serving (connections waiting in the shared socket's queue go to the live workers); a
worker slot that keeps dying is a crash loop, and the whole server stops saying so
(policies.restart). SIGHUP reloads the workers one at a time: a new process is started for a
slot, and only once it is serving is the old one asked to stop (SIGTERM: it stops accepting
on the shared socket, which the other workers keep accepting on, answers the request in
flight or the next one on each keep-alive connection with `Connection: close`, closes
connections left quiet, and exits: transport/http_protocol.py), so no request fails and
capacity never drops by more than one worker's share.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from types import FrameType

from slimserve.config import Settings
from slimserve.errors import ConfigError
from slimserve.policies.restart import GiveUp, RestartConfig, RestartState, on_death

log = logging.getLogger("slimserve.workers")

# (settings, the shared listening sockets, an event the worker sets once it serves)
Worker = Callable[[Settings, list[socket.socket], Event], None]

STOP_GRACE_S = 30.0  # how long a worker asked to stop may take to finish its requests
READY_TIMEOUT_S = 300.0  # how long a reloaded worker may take to load its models


def bind_http(settings: Settings) -> socket.socket:
    """The listening socket every worker accepts on."""
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.http_port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen for HTTP on {settings.host}:{settings.http_port} ({exc.strerror}); "
            "choose another --http-port or --host"
        ) from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


@dataclass
class _Slot:
    """One of the N worker positions: its current process and its restart history."""

    index: int
    proc: BaseProcess | None = None
    ready: Event | None = None
    restarts: RestartState = field(default_factory=RestartState)
    restart_at: float | None = None  # a restart is due at this time (monotonic seconds)


class WorkerPool:
    """Starts, restarts and reloads the worker processes of one server."""

    def __init__(
        self,
        settings: Settings,
        worker: Worker,
        sockets: list[socket.socket],
        restart: RestartConfig | None = None,
    ) -> None:
        self._settings, self._worker, self._sockets = settings, worker, sockets
        self._restart = restart or RestartConfig()
        self._context = multiprocessing.get_context("spawn")
        self._slots = [_Slot(i) for i in range(settings.workers)]
        self.stopping = False  # set from the signal handler: a reload in progress gives way

    def start(self) -> None:
        for slot in self._slots:
            slot.proc, slot.ready = self._spawn(slot.index)
        log.info("started %d workers: %s", len(self._slots), ", ".join(self.pids()))

    def pids(self) -> list[str]:
        return [str(s.proc.pid) for s in self._slots if s.proc is not None]

    def sentinels(self) -> list[int]:
        return [s.proc.sentinel for s in self._slots if s.proc is not None]

    def step(self, now: float) -> str | None:
        """Reap dead workers and start due restarts; a crash loop's reason ends the pool."""
        for slot in self._slots:
            if slot.proc is not None and not slot.proc.is_alive():
                reason = self._on_exit(slot, now)
                if reason is not None:
                    return reason
            if slot.restart_at is not None and now >= slot.restart_at:
                slot.restart_at = None
                slot.proc, slot.ready = self._spawn(slot.index)
                log.info("worker %d restarted as pid %s", slot.index, slot.proc.pid)
        return None

    def reload(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Replace each worker in turn by a fresh process, the new one serving before the old
        one stops. A new process that fails to start leaves the old one serving."""
        log.info("reloading %d workers one at a time", len(self._slots))
        for slot in self._slots:
            old = slot.proc
            if old is None or not old.is_alive():
                continue  # a dead slot is restarted by step(), already with new settings
            new, ready = self._spawn(slot.index)
            if not self._wait_ready(new, ready, clock):
                log.error(
                    "reload: the new worker %d (pid %s) did not start (exit code %s); the old "
                    "worker %s keeps serving and the reload stops here",
                    slot.index, new.pid, new.exitcode, old.pid,
                )  # fmt: skip
                _stop(new)
                return
            slot.proc, slot.ready = new, ready
            _stop(old)
            log.info("worker %d reloaded: pid %s replaced %s", slot.index, new.pid, old.pid)
        log.info("reload done: workers %s", ", ".join(self.pids()))

    def stop(self) -> None:
        procs = [s.proc for s in self._slots if s.proc is not None]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()  # SIGTERM: each stops its transports and engine in order
        for proc in procs:
            _join(proc)

    def _on_exit(self, slot: _Slot, now: float) -> str | None:
        assert slot.proc is not None
        pid, code = slot.proc.pid, slot.proc.exitcode
        slot.proc, slot.ready = None, None
        decision = on_death(self._restart, slot.restarts, now, code)
        if isinstance(decision, GiveUp):
            return f"worker {slot.index} {decision.reason}"
        slot.restart_at = decision.at
        log.error(
            "worker %d (pid %s) exited with %s; the others keep serving; restart %d in %.1f s",
            slot.index, pid, code, decision.attempt, decision.at - now,
        )  # fmt: skip
        return None

    def _spawn(self, index: int) -> tuple[BaseProcess, Event]:
        ready = self._context.Event()
        proc = self._context.Process(
            target=self._worker,
            args=(self._settings, self._sockets, ready),
            name=f"slimserve-worker-{index}",
        )
        proc.start()
        return proc, ready

    def _wait_ready(self, proc: BaseProcess, ready: Event, clock: Callable[[], float]) -> bool:
        deadline = clock() + READY_TIMEOUT_S
        while clock() < deadline and not self.stopping:
            if ready.wait(0.2):
                return True
            if not proc.is_alive():
                return False
            self.step(clock())  # other slots may die meanwhile: keep restarting them
        return False


def _stop(proc: BaseProcess) -> None:
    if proc.is_alive():
        proc.terminate()
    _join(proc)


def _join(proc: BaseProcess) -> None:
    proc.join(STOP_GRACE_S)
    if proc.is_alive():
        log.error("worker %s did not stop within %.0f s; killing it", proc.pid, STOP_GRACE_S)
        proc.kill()
        proc.join()


def run_workers(settings: Settings, worker: Worker, restart: RestartConfig | None = None) -> int:
    """Run `settings.workers` supervised processes until SIGINT/SIGTERM (exit code 0) or a
    crash loop (1); SIGHUP reloads them one at a time."""
    sockets = [bind_http(settings)] if settings.http_port else []
    restart = restart or RestartConfig(max_restarts=settings.worker_max_restarts)
    pool = WorkerPool(settings, worker, sockets, restart)
    flags = {"stop": False, "reload": False}

    def on_signal(signum: int, frame: FrameType | None) -> None:
        flags["reload" if signum == signal.SIGHUP else "stop"] = True  # acted on by the loop
        pool.stopping = flags["stop"]

    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, on_signal) for sig in handled}
    try:
        pool.start()
        while not flags["stop"]:
            if flags["reload"]:
                flags["reload"] = False
                pool.reload()
            reason = pool.step(time.monotonic())
            if reason is not None:
                log.error("%s; stopping the server", reason)
                return 1
            multiprocessing.connection.wait(pool.sentinels(), timeout=0.2)
        return 0
    finally:
        pool.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()
