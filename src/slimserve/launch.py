"""Running servers: one process on uvloop, or `--workers N` supervised processes
(cluster/processes.py), each a whole server built by slimserve.app. `slimserve serve` ends
here (serve_cli.py registers its flags)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from collections.abc import Coroutine
from typing import Any

from slimserve import logs
from slimserve.app import serve
from slimserve.cluster.processes import run_workers
from slimserve.config import Settings
from slimserve.errors import SlimserveError
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
    """Run until SIGINT/SIGTERM, on uvloop where available; several processes with workers."""
    configure_logging(settings)
    configure_threads(settings)
    if settings.workers > 1:
        if run_workers(settings, run_worker):
            raise SlimserveError("a worker process failed; see the log above")
        return
    _run_loop(serve(settings))


def configure_threads(settings: Settings) -> None:
    """OpenMP (torch's intra-op pool) reads its wait policy once, when torch is imported: set
    it first. Spinning OpenMP threads took the cores from the event loop and the client on a
    2-core machine (MiniLM batch 32 in-process, other processes busy: 34 rows/s spinning,
    231 sleeping; benchmarks/RESULTS.md). A policy the user set in the environment wins."""
    if not settings.spin_wait:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_worker(settings: Settings, sockets: list[socket.socket]) -> None:
    """One worker process of `--workers N` (started by cluster.processes)."""
    configure_logging(settings)
    configure_threads(settings)
    _run_loop(serve(settings, http_sockets=sockets))


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop  # optional: the event loop of choice where installed
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
