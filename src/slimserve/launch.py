"""Running servers: one process on uvloop, `--workers N` supervised processes
(cluster/processes.py), or replicas on Ray Serve (cluster/ray_serve.py), each a whole server
built by slimserve.app. `slimserve serve` ends here (serve_cli.py registers its flags)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Coroutine
from multiprocessing.synchronize import Event
from typing import Any

from slimserve import logs
from slimserve.app import build_server, serve
from slimserve.cluster.processes import run_workers
from slimserve.config import Settings
from slimserve.errors import ConfigError, SlimserveError
from slimserve.serve_cli import settings_from


def serve_command(args: argparse.Namespace) -> int:
    run_server(settings_from(args))
    # Everything is stopped and flushed; skip interpreter teardown, where gRPC's core alone
    # spends over a second, so that a restart or rolling update is not held up.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def configure_logging(settings: Settings) -> None:
    logs.configure(settings.log_level, settings.log_format)


def run_server(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, on uvloop where available; several processes with workers,
    replicas on Ray with `ray`."""
    configure_logging(settings)
    configure_threads(settings)
    if settings.ray is not None:
        _ray_serve().run_on_ray(
            settings.model_copy(update={"repository": settings.repository.resolve()}), build_server
        )
        return
    if settings.workers > 1:
        if run_workers(settings, run_worker):
            raise SlimserveError("a worker kept crashing (a crash loop); see the log above")
        return
    _run_loop(serve(settings))


def ray_application(args: dict[str, Any]) -> Any:
    """A Ray Serve application builder for Ray's own tooling (`serve run`, a KubeRay
    RayService's `import_path: slimserve.launch:ray_application`): `args` are settings (as
    in a --config file); the deployment is the one `slimserve serve --ray` makes."""
    settings = Settings.load(None, **{"ray": "external", **args})
    return _ray_serve().application(settings, build_server)


def _ray_serve() -> Any:
    """cluster.ray_serve, imported only when Ray is asked for (importing Ray takes seconds and
    Ray is an optional extra)."""
    try:
        import slimserve.cluster.ray_serve as ray_serve
    except ImportError as exc:
        raise ConfigError(
            f"--ray needs Ray Serve ({exc}); install it with: pip install 'slimserve[ray]'"
        ) from None
    return ray_serve


def configure_threads(settings: Settings) -> None:
    """OpenMP (torch's intra-op pool) reads its wait policy once, when torch is imported: set
    it first. Spinning OpenMP threads took the cores from the event loop and the client on a
    2-core machine (MiniLM batch 32 in-process, other processes busy: 34 rows/s spinning,
    231 sleeping; benchmarks/RESULTS.md). A policy the user set in the environment wins."""
    if not settings.spin_wait:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_worker(settings: Settings, sockets: list[socket.socket], ready: Event) -> None:
    """One worker process of `--workers N` (started and supervised by cluster.processes);
    sets `ready` once it serves."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the supervisor turns SIGHUP into a reload
    configure_logging(settings)
    configure_threads(settings)
    _run_loop(_serve_and_report(settings, sockets, ready))


async def _serve_and_report(settings: Settings, sockets: list[socket.socket], ready: Event) -> None:
    started = asyncio.Event()

    async def report() -> None:
        await started.wait()
        ready.set()

    reporter = asyncio.create_task(report())
    try:
        await serve(settings, started, http_sockets=sockets)
    finally:
        reporter.cancel()


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop  # optional: the event loop of choice where installed
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
