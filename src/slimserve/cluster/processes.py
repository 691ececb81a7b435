"""Several server processes sharing one machine's ports (`slimserve serve --workers N`).

Python runs one request's parsing and encoding at a time per process, so on a machine with
spare cores one process is bound by its event loop long before the model is. The parent binds
the HTTP socket once and hands it to N worker processes (started with `spawn`, so no state is
shared by accident); the kernel spreads new connections across the workers accepting on it.
Each worker binds the gRPC port itself with SO_REUSEPORT. Every worker is a whole server with
its own engine: its own models (the memory budget is split between workers unless given),
batches, rate limits and metrics; the response cache is shared only with --redis-url.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import socket
from collections.abc import Callable, Sequence
from types import FrameType

from slimserve.config import Settings
from slimserve.errors import ConfigError

log = logging.getLogger("slimserve.workers")

Worker = Callable[[Settings, list[socket.socket]], None]


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


def run_workers(settings: Settings, worker: Worker) -> int:
    """Start `settings.workers` processes running `worker`; stop them all on SIGINT/SIGTERM
    or when one dies. Returns the exit code (0 after a clean stop)."""
    sockets = [bind_http(settings)] if settings.http_port else []
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(target=worker, args=(settings, sockets), name=f"slimserve-worker-{i}")
        for i in range(settings.workers)
    ]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for proc in procs:
            if proc.is_alive() and proc.pid is not None:
                proc.terminate()  # SIGTERM: each worker stops its transports and engine in order

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for proc in procs:
            proc.start()
        log.info("started %d workers: %s", len(procs), ", ".join(str(p.pid) for p in procs))
        return _supervise(procs, lambda: stopping, stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()


def _supervise(
    procs: Sequence[multiprocessing.process.BaseProcess],
    stopping: Callable[[], bool],
    stop: Callable[[int, FrameType | None], None],
) -> int:
    """Wait for the workers; if one dies on its own, stop the others (fail as a whole)."""
    failed = False
    while any(p.is_alive() for p in procs):
        for proc in procs:
            proc.join(timeout=0.2)
            if not proc.is_alive() and not stopping() and not failed:
                failed = True
                log.error("worker %s exited with %s; stopping the others", proc.pid, proc.exitcode)
                stop(signal.SIGTERM, None)
    return 1 if failed else 0
