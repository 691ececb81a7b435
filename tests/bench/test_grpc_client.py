"""bench's lean gRPC client (bench/grpc_client.py) against both gRPC servers, grpc.aio's and
slimserve's own: answers, error statuses with their messages, large messages both ways (flow
control and frame sizes), and many calls in flight on one connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from slimserve.bench.grpc_client import GrpcCallError, GrpcConnection, request_headers
from slimserve.config import Settings
from slimserve.errors import NotFound
from slimserve.transport.grpc import create_server
from slimserve.transport.grpc_h2 import NativeGrpcServer
from slimserve.transport.vendor import grpc_service_pb2 as pb
from slimserve.types import ModelMetadata, TensorSpec
from tests.grpc_standin import StandInEngine, free_port

pytestmark = pytest.mark.timeout(60)
SERVICE = "/inference.GRPCInferenceService/"


class MetadataEngine(StandInEngine):
    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        if name == "missing":
            raise NotFound("model 'missing' is not here; 100% sure")
        # The name comes back in the answer: a long name makes a large request and answer.
        inputs = tuple(TensorSpec(f"in{i}", "FP32", (-1, 4)) for i in range(3000))
        return ModelMetadata(name, ("1",), "", inputs, (), "READY")


@pytest.mark.parametrize("impl", ["native", "grpcio"])
def test_the_client_against_both_servers(impl: str) -> None:
    settings = Settings(host="127.0.0.1", grpc_port=free_port(), http_port=0)

    async def main() -> None:
        engine = MetadataEngine()
        server: Any = (
            NativeGrpcServer(engine, settings)  # type: ignore[arg-type]
            if impl == "native"
            else create_server(engine, settings)  # type: ignore[arg-type]
        )
        await server.start()
        conn = await GrpcConnection.open("127.0.0.1", settings.grpc_port)
        try:
            live = request_headers("localhost", SERVICE + "ServerLive")
            answers = await asyncio.gather(
                *(conn.call(live, pb.ServerLiveRequest().SerializeToString()) for _ in range(200))
            )
            assert all(pb.ServerLiveResponse.FromString(a).live for a in answers)

            meta = request_headers("localhost", SERVICE + "ModelMetadata")
            name = "m" * 300_000  # a 300 KB request: several frames and window updates
            answer = await conn.call(meta, pb.ModelMetadataRequest(name=name).SerializeToString())
            reply = pb.ModelMetadataResponse.FromString(answer)
            assert reply.name == name and len(reply.inputs) == 3000

            with pytest.raises(GrpcCallError) as info:
                await conn.call(meta, pb.ModelMetadataRequest(name="missing").SerializeToString())
            assert info.value.status == "NOT_FOUND"
            assert info.value.message == "model 'missing' is not here; 100% sure"
        finally:
            conn.close()
            await conn.closed
            await server.stop(grace=0)

    asyncio.run(main())


def test_a_closed_port_is_an_os_error() -> None:
    async def main() -> None:
        with pytest.raises(OSError):
            await GrpcConnection.open("127.0.0.1", free_port())

    asyncio.run(main())
