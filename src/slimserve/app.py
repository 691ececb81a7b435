"""The composition root: the one place that builds and wires the parts of a server.

`build_server(settings)` builds everything from Settings (thread pools, model residency,
admission, authenticator, audit log, metrics, response caches, the engine, the HTTP app and the
gRPC service) and returns a `Server`; `serve` runs one on sockets until a signal (launch.py
runs it in one process or several: `slimserve serve`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, cast

from slimserve.config import Settings
from slimserve.errors import ConfigError
from slimserve.repository.store import Repository
from slimserve.runtimes.base import RuntimeOptions
from slimserve.runtimes.launch import WorkerLauncher
from slimserve.security.audit import AuditLog
from slimserve.security.crypto import resolve_data_key
from slimserve.security.keys import Authenticator
from slimserve.serving.admission import Admission
from slimserve.serving.cache import ResponseCaches
from slimserve.serving.catalog import Catalog, hide_path
from slimserve.serving.control import ModelControl
from slimserve.serving.engine import Engine
from slimserve.serving.metrics import Metrics
from slimserve.serving.models import ModelManager, RuntimeFactory
from slimserve.serving.threads import InferenceThreads
from slimserve.transport.asgi import Router, create_app
from slimserve.transport.grpc import InferenceServicer, create_server
from slimserve.transport.grpc_h2 import NativeGrpcServer
from slimserve.transport.http_protocol import ConnectionLimits, protocol_class
from slimserve.transport.limits import TensorLimits
from slimserve.types import Clock

log = logging.getLogger("slimserve")


def build_engine(
    settings: Settings,
    *,
    repository: Repository | None = None,
    runtime_factory: RuntimeFactory | None = None,
    clock: Clock = time.monotonic,
    launcher: WorkerLauncher | None = None,
) -> Engine:
    """The engine and every part it works with, built from `settings`.

    `runtime_factory` (target, options) -> Runtime replaces the backends (tests pass toy
    runtimes); `clock` (monotonic seconds) is the one clock of every decision by time: batching
    windows, deadlines, rate limits, breakers, residency, cache expiry, generation deadlines
    (tests pass `slimserve.testing.FakeClock`); `launcher` starts the worker processes of
    models split over several (runtimes/launch.py; None: local processes). The engine owns
    what is built here:
    `Engine.stop` closes it all.
    """
    repository = repository or Repository(settings.repository)
    threads = settings.inference_threads or os.cpu_count() or 1
    metrics = Metrics()
    models = ModelManager(
        repository,
        settings,
        InferenceThreads(threads),
        ThreadPoolExecutor(2, thread_name_prefix="slimserve-load"),
        runtime_options(settings, clock, launcher),
        runtime_factory,
        clock=clock,
        on_batch=metrics.batch_observer,
    )
    admission = Admission(settings)
    caches = ResponseCaches(settings.redis_url, clock)
    metrics.watch(models, admission, caches)
    public = hide_path(repository.root)
    catalog = Catalog(repository, models, admission, public)
    audit = AuditLog(settings.audit_log)
    auth = Authenticator(settings.api_keys_file) if settings.api_keys_file else None
    control = ModelControl(repository, models, audit, auth, settings.model_control, public)
    return Engine(
        repository,
        settings,
        models=models,
        admission=admission,
        metrics=metrics,
        caches=caches,
        catalog=catalog,
        control=control,
        audit=audit,
        clock=clock,
    )


def runtime_options(
    settings: Settings, clock: Clock, launcher: WorkerLauncher | None = None
) -> RuntimeOptions:
    """What every runtime is built with: threads, ONNX Runtime's graph level, spinning, the
    data key for encrypted artifacts (read once, here) and the clock."""
    return RuntimeOptions(
        intra_op_threads=settings.intra_op_threads,
        graph_optimization=settings.ort_graph_optimization,
        spin_wait=settings.spin_wait,
        data_key=resolve_data_key(
            settings.data_key_file, settings.data_key_env, settings.data_key_environment()
        ),
        clock=clock,
        memory_budget_bytes=settings.memory_budget_bytes,
        launcher=launcher,
    )


class GrpcServer(Protocol):
    """What both gRPC servers (grpc.aio's and the native HTTP/2 one) offer."""

    async def start(self) -> None: ...

    async def stop(self, grace: float | None) -> None: ...


@dataclass
class Server:
    """One server's parts, built by `build_server`. Nothing listens until `serve`.

    Without owning sockets (a Ray replica, a test, an embedding program)::

        server = build_server(settings)
        await server.start()            # begin loading the startup models (live at once)
        app = server.http_app           # the ASGI app: KServe v2 + OpenAI (+ what you mount)
        app.mount("/ui", ui_app)        # another ASGI app on a path prefix (transport/asgi.py)
        response = await server.engine.infer(request)   # or call the engine directly
        servicer = server.grpc_servicer()               # the v2 gRPC methods, transport-free
        await server.stop()             # unload the models, close caches, audit log, pools

    `await server.serve()` instead listens on settings.host's HTTP and gRPC ports and runs
    until SIGINT/SIGTERM (what `slimserve serve` does).
    """

    settings: Settings
    engine: Engine
    http_app: Router
    clock: Clock = time.monotonic  # the engine's: the gRPC layer's deadlines and limits too

    async def start(self, wait: bool = False) -> None:
        """Start the engine; `wait=True` returns once the startup models are loaded."""
        await self.engine.start(wait)

    async def stop(self) -> None:
        await self.engine.stop()

    def grpc_servicer(self) -> InferenceServicer:
        """The KServe v2 gRPC methods over this engine, for a gRPC server of your own."""
        return InferenceServicer(self.engine, TensorLimits.from_settings(self.settings))

    def grpc_server(self) -> GrpcServer:
        """The configured gRPC server (--grpc-server) for settings.host:grpc_port, not started."""
        if self.settings.grpc_server == "grpcio":
            return cast(GrpcServer, create_server(self.engine, self.settings))
        return NativeGrpcServer(self.engine, self.settings, clock=self.clock)

    async def serve(
        self,
        started: asyncio.Event | None = None,
        http_sockets: list[socket.socket] | None = None,
    ) -> None:
        """Start the engine and the listeners; stop them in order on SIGINT/SIGTERM."""
        settings = self.settings
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        http_task, http_server, grpc_server = None, None, None
        try:
            if settings.http_port:
                http_server = _http_server(self.http_app, settings)
                http_task = loop.create_task(http_server.serve(sockets=http_sockets))
            if settings.grpc_port:
                grpc_server = self.grpc_server()
                await grpc_server.start()
            log.info(
                "serving %s on %s (http %s, grpc %s)",
                self.engine.repository.root,
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
            await self.stop()


def build_server(
    settings: Settings,
    *,
    runtime_factory: RuntimeFactory | None = None,
    clock: Clock = time.monotonic,
    launcher: WorkerLauncher | None = None,
) -> Server:
    """A whole server built from `settings` (see `Server` for how to run it; `launcher`:
    see build_engine)."""
    repository = Repository(settings.repository)
    if not repository.root.is_dir():
        raise ConfigError(
            f"setting 'repository' = '{settings.repository}': no such folder; create it or "
            "point --repository at your model repository"
        )
    engine = build_engine(
        settings,
        repository=repository,
        runtime_factory=runtime_factory,
        clock=clock,
        launcher=launcher,
    )
    return Server(settings, engine, create_app(engine, settings), clock)


async def serve(
    settings: Settings,
    started: asyncio.Event | None = None,
    http_sockets: list[socket.socket] | None = None,
) -> None:
    """Build a server from `settings` and run it until SIGINT/SIGTERM."""
    await build_server(settings).serve(started, http_sockets)


async def _wait_for(stop: asyncio.Event, http_task: asyncio.Task[None] | None) -> None:
    waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(stop.wait())]
    if http_task is not None:
        waiters.append(http_task)  # the HTTP server failing to bind ends the process
    done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    if http_task is not None and http_task in done and http_task.exception():
        raise http_task.exception()  # type: ignore[misc]


def _http_server(app: Router, settings: Settings) -> Any:
    import uvicorn

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
        app,
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
