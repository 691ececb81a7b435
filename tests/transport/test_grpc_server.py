"""The gRPC server's boundary in process, for both implementations (`--grpc-server native`
and `grpcio`): status mapping, Retry-After, unexpected errors answered INTERNAL and logged
once, and a clear error when the port is taken.

The engine here is a stand-in that fails on purpose (the real engine is exercised end to end
in tests/e2e/test_grpc.py); what is under test is the real server and its real client.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from slimserve.config import Settings
from slimserve.errors import ConfigError, NotFound, ResourceExhausted
from slimserve.transport.grpc import STATUS, create_server
from slimserve.transport.grpc_h2 import NativeGrpcServer
from slimserve.transport.vendor import grpc_service_pb2 as pb
from slimserve.transport.vendor import grpc_service_pb2_grpc as pb_grpc
from slimserve.types import ModelMetadata
from tests.grpc_standin import StandInEngine, free_port

pytestmark = pytest.mark.timeout(60)


class FailingEngine(StandInEngine):
    """Answers health; every model question fails the way the test sets."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        raise self.error


@pytest.fixture(params=["native", "grpcio"])
def impl(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_server(impl: str, engine: Any, settings: Settings) -> Any:
    if impl == "native":
        return NativeGrpcServer(engine, settings)
    return create_server(engine, settings)


def run_with_server(
    impl: str, engine: Any, call: Callable[[pb_grpc.GRPCInferenceServiceStub], Awaitable[Any]]
) -> Any:
    settings = Settings(host="127.0.0.1", grpc_port=free_port(), http_port=0)

    async def main() -> Any:
        server = make_server(impl, engine, settings)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as channel:
                return await call(pb_grpc.GRPCInferenceServiceStub(channel))
        finally:
            await server.stop(grace=None)

    return asyncio.run(main())


async def metadata_error(stub: pb_grpc.GRPCInferenceServiceStub) -> grpc.aio.AioRpcError:
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelMetadata(pb.ModelMetadataRequest(name="m"))
    return info.value


def test_every_error_code_has_a_grpc_status() -> None:
    from slimserve.errors import Code

    assert set(STATUS) == set(Code)
    assert STATUS[Code.PAYLOAD_TOO_LARGE] == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_slimserve_errors_keep_their_code_and_message(impl: str) -> None:
    error = run_with_server(impl, FailingEngine(NotFound("model 'm' is not here")), metadata_error)
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert error.details() == "model 'm' is not here"


def test_retry_after_travels_as_trailing_metadata(impl: str) -> None:
    engine = FailingEngine(ResourceExhausted("slow down", retry_after_s=1.2))
    error = run_with_server(impl, engine, metadata_error)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert ("retry-after", "2") in tuple(error.trailing_metadata() or ())


def test_unexpected_errors_are_internal_and_logged_once(
    impl: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="slimserve.grpc"):
        error = run_with_server(impl, FailingEngine(RuntimeError("secret detail")), metadata_error)
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in error.details() and "internal server error" in error.details()
    records = [r for r in caplog.records if r.name == "slimserve.grpc"]
    assert len(records) == 1 and "ModelMetadata" in records[0].getMessage()
    assert records[0].exc_info is not None


def test_a_taken_port_is_a_clear_config_error(impl: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = Settings(host="127.0.0.1", grpc_port=port, http_port=0)

        async def main() -> None:
            server = make_server(impl, FailingEngine(RuntimeError()), settings)
            await server.start()

        with pytest.raises(ConfigError, match=f"cannot listen for gRPC on 127.0.0.1:{port}"):
            asyncio.run(main())
