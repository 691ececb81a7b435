"""The composition root: builds the settings, the repository, the engine and the transports,
runs them on one event loop, and stops them in order. Also defines `slimserve serve`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import typing
from collections.abc import Coroutine, Iterator
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from slimserve.config import Settings
from slimserve.errors import ConfigError, SlimserveError
from slimserve.repository.store import Repository
from slimserve.serving.engine import Engine

log = logging.getLogger("slimserve")


def register(sub: Any) -> None:
    """`slimserve serve`: one flag per Settings field, help from its description."""
    parser = sub.add_parser(
        "serve",
        help="serve a model repository over HTTP and gRPC",
        description="Serve every model in a repository (KServe v2 over HTTP and gRPC). "
        "Options also come from SLIMSERVE_<OPTION> environment variables and --config FILE; "
        "flags win over the environment, which wins over the file.",
    )
    parser.add_argument("--config", type=Path, help="YAML file of settings (keys as below).")
    for name, field in Settings.model_fields.items():
        _add_flag(parser, name, field)
    parser.set_defaults(handler=_serve_command)


def _add_flag(parser: argparse.ArgumentParser, name: str, field: Any) -> None:
    flag = "--" + name.replace("_", "-")
    default = field.default_factory() if field.default_factory else field.default
    help_text = f"{field.description} (default: {default})"
    annotation = field.annotation
    optional = [a for a in typing.get_args(annotation) if a is not type(None)]
    if type(None) in typing.get_args(annotation) and len(optional) == 1:
        annotation = optional[0]  # `X | None`: the flag takes an X
    if annotation is bool:
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    elif typing.get_origin(annotation) is typing.Literal:
        parser.add_argument(flag, choices=typing.get_args(annotation), default=None, help=help_text)
    elif typing.get_origin(annotation) is list:
        parser.add_argument(
            flag,
            type=lambda s: [x for x in s.split(",") if x],
            default=None,
            help=help_text + "; comma-separated",
        )
    else:
        parser.add_argument(flag, type=annotation, default=None, help=help_text)


def _serve_command(args: argparse.Namespace) -> int:
    flags = {name: getattr(args, name) for name in Settings.model_fields}
    settings = Settings.load(args.config, **flags)
    run_server(settings)
    # Everything is stopped and flushed; skip interpreter teardown, where gRPC's core alone
    # spends over a second, so that a restart or rolling update is not held up.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def configure_logging(settings: Settings) -> None:
    from slimserve import logs

    logs.configure(settings.log_level, settings.log_format)


def run_server(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, on uvloop where available; several processes with workers."""
    configure_logging(settings)
    configure_threads(settings)
    if settings.workers > 1:
        from slimserve.cluster.processes import run_workers

        if run_workers(settings, run_worker):
            raise SlimserveError("a worker kept crashing (a crash loop); see the log above")
        return
    _run_loop(serve(settings))


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
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)


async def serve(
    settings: Settings,
    started: asyncio.Event | None = None,
    http_sockets: list[socket.socket] | None = None,
) -> None:
    """Start the engine and the transports; stop them in order on a signal."""
    repository = Repository(settings.repository)
    if not repository.root.is_dir():
        raise ConfigError(
            f"setting 'repository' = '{settings.repository}': no such folder; create it or "
            "point --repository at your model repository"
        )
    engine = Engine(repository, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await engine.start()
    http_task, http_server, grpc_server = None, None, None
    try:
        if settings.http_port:
            http_server = _http_server(engine, settings)
            http_task = loop.create_task(http_server.serve(sockets=http_sockets))
        if settings.grpc_port:
            grpc_server = _grpc_server(engine, settings)
            await grpc_server.start()
        log.info(
            "serving %s on %s (http %s, grpc %s)",
            repository.root,
            settings.host,
            settings.http_port or "off",
            settings.grpc_port or "off",
        )
        if started is not None:
            started.set()
        await _wait_for(stop, http_task)
    finally:
        log.info("shutting down")
        if http_server is not None and http_task is not None:
            http_server.should_exit = True
            await http_task
        if grpc_server is not None:
            await grpc_server.stop(grace=2.0)
        await engine.stop()


async def _wait_for(stop: asyncio.Event, http_task: asyncio.Task[None] | None) -> None:
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
    if http_task is not None:
        waiters.append(http_task)  # the HTTP server failing to bind ends the process
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if http_task is not None and http_task in done and http_task.exception():
        raise http_task.exception()  # type: ignore[misc]


def _grpc_server(engine: Engine, settings: Settings) -> Any:
    if settings.grpc_server == "grpcio":
        from slimserve.transport.grpc import create_server

        return create_server(engine, settings)
    from slimserve.transport.grpc_h2 import NativeGrpcServer

    return NativeGrpcServer(engine, settings)


def _http_server(engine: Engine, settings: Settings) -> Any:
    import uvicorn

    from slimserve.transport.http import create_app
    from slimserve.transport.http_protocol import ConnectionLimits, protocol_class

    class _Server(uvicorn.Server):
        # Signals are handled by `serve` so that gRPC and the engine stop in order too.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    tls: dict[str, Any] = {}
    if settings.tls_cert is not None:
        import ssl

        tls = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
        if settings.tls_client_ca is not None:
            tls["ssl_ca_certs"] = str(settings.tls_client_ca)
            tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
    config = uvicorn.Config(
        create_app(engine, settings),
        **tls,
        host=settings.host,
        port=settings.http_port,
        # httptools with header and body deadlines and a header cap (slowloris defence).
        http=protocol_class(ConnectionLimits.from_settings(settings)),
        ws="none",
        loop="none",
        lifespan="off",
        access_log=False,
        log_level=settings.log_level,
        log_config=None,  # uvicorn's records go through our handler (JSON lines)
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # call_later takes float s
        limit_concurrency=settings.max_connections or None,
    )
    return _Server(config)
