"""The composition root: a whole server built from Settings, run without owning sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from slimserve.app import build_server
from slimserve.config import Settings
from slimserve.errors import ConfigError
from slimserve.testing import EchoRuntime, FakeClock, toy_config, write_model
from slimserve.transport.grpc_h2 import NativeGrpcServer
from slimserve.types import InferRequest


def test_build_server_serves_without_sockets(tmp_path: Path) -> None:
    write_model(tmp_path, "echo", toy_config(width=2))

    async def ui(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = scope["path"].encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def main() -> None:
        settings = Settings(repository=tmp_path)
        server = build_server(settings, runtime_factory=lambda t, o: EchoRuntime(t, o))
        server.http_app.mount("/extra", ui)  # /ui is the console's
        await server.start(wait=True)
        try:
            transport = httpx.ASGITransport(app=server.http_app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get("/v2/health/ready")).status_code == 200
                assert (await client.get("/extra/page")).text == "/extra/page"
                assert (await client.get("/extrax")).status_code == 404  # a prefix, not a stem
                models = await client.get("/v1/models")  # the OpenAI app is mounted too
                assert models.status_code == 200
            x = np.ones((1, 2), np.float32)
            answer = await server.engine.infer(InferRequest("echo", {"input": x}))
            assert answer.outputs["output"].tolist() == [[2.0, 2.0]]  # EchoRuntime doubles
            assert hasattr(server.grpc_servicer(), "ModelInfer")
        finally:
            await server.stop()
        assert not server.engine.live()

    asyncio.run(main())


def test_build_server_names_a_missing_repository(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="repository"):
        build_server(Settings(repository=tmp_path / "absent"))


def test_build_server_passes_its_clock_to_the_native_grpc_server(tmp_path: Path) -> None:
    clock = FakeClock()
    server = build_server(Settings(repository=tmp_path, grpc_server="native"), clock=clock)
    grpc = server.grpc_server()
    assert isinstance(grpc, NativeGrpcServer)
    assert grpc.clock is clock  # deadlines and HTTP/2 rate limits read the one clock
