"""One driver per protocol: encode the request once, check one answer, hand out senders.

A driver's `senders(n)` returns n zero-argument coroutines functions, one per simulated client,
each sending the pre-encoded request once and returning "ok" or an error label.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from slimserve.bench import payload as pl
from slimserve.bench.grpc_client import GrpcCallError, GrpcConnection, request_headers
from slimserve.bench.http_client import Connection, build_request, connect
from slimserve.bench.runner import Send
from slimserve.errors import InvalidArgument, NotFound, SlimserveError, Unavailable

PROTOCOLS = ("http-json", "http-binary", "grpc")
_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"


def model_path(model: str, version: str) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")


async def fetch_metadata(host: str, port: int, model: str, version: str) -> dict[str, Any]:
    """GET the model's v2 metadata; NotFound/Unavailable with the server's own words."""
    conn = await connect(host, port, keep_body=True)
    try:
        status, body = await conn.request(
            build_request("GET", host, port, model_path(model, version))
        )
    finally:
        conn.close()
    if status == 404:
        raise NotFound(f"model '{model}' not found at http://{host}:{port}: {body[:200]!r}")
    if status != 200:
        raise Unavailable(f"model metadata answered {status}: {body[:200]!r}")
    meta: dict[str, Any] = orjson.loads(body)
    return meta


class HttpDriver:
    """http-json or http-binary over keep-alive HTTP/1.1, one connection per client."""

    def __init__(
        self, protocol: str, host: str, port: int, model: str, version: str, p: pl.Payload
    ) -> None:
        self.protocol, self.host, self.port = protocol, host, port
        path = model_path(model, version) + "/infer"
        if protocol == "http-json":
            headers = {"Content-Type": "application/json"}
            body = pl.json_body(p)
        else:
            body, head_len = pl.binary_body(p)
            headers = {
                "Content-Type": "application/octet-stream",
                "Inference-Header-Content-Length": str(head_len),
            }
        self.raw = build_request("POST", host, port, path, body, headers)
        self._conns: list[Connection] = []

    async def probe(self) -> None:
        """Send once and check the answer is a successful v2 response with outputs."""
        conn = await connect(self.host, self.port, keep_body=True)
        try:
            status, body = await conn.request(self.raw)
        finally:
            conn.close()
        if status != 200:
            raise InvalidArgument(f"{self.protocol}: the server answered {status}: {body[:300]!r}")
        if self.protocol == "http-json":
            head = body
        else:
            size = int(conn.last_headers.get("inference-header-content-length", len(body)))
            head = body[:size]
        try:
            outputs = orjson.loads(head).get("outputs")
        except orjson.JSONDecodeError:
            outputs = None
        if not outputs:
            raise InvalidArgument(f"{self.protocol}: the answer has no outputs: {body[:300]!r}")

    async def senders(self, n: int) -> list[Send]:
        self._conns = [await connect(self.host, self.port) for _ in range(n)]
        return [self._sender(i) for i in range(n)]

    def _sender(self, i: int) -> Send:
        raw = self.raw

        async def send() -> str:
            conn = self._conns[i]
            if not conn.open:  # the server closed it after an answer: reconnect quietly
                try:
                    conn = self._conns[i] = await connect(self.host, self.port)
                except SlimserveError:
                    await asyncio.sleep(0.01)  # nothing listens: do not spin
                    return "connection"
            try:
                status, _ = await conn.request(raw)
            except (ConnectionError, OSError):
                return "connection"
            return "ok" if status == 200 else str(status)

        return send

    async def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns = []


class GrpcDriver:
    """v2 gRPC ModelInfer through grpc.aio (`--grpc-client grpcio`) with a pre-serialized
    request; all clients share one channel."""

    def __init__(self, target: str, model: str, version: str, p: pl.Payload) -> None:
        self.protocol, self.target = "grpc", target
        self.request = pl.grpc_request(p, model, version)
        self._channel: Any = None

    def _method(self) -> Any:
        import grpc

        if self._channel is None:
            opts = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
            self._channel = grpc.aio.insecure_channel(self.target, options=opts)
        # No serializers: bytes go out as given and come back as bytes (no parsing per call).
        return self._channel.unary_unary(_INFER_METHOD)

    async def probe(self) -> None:
        import grpc

        try:
            answer = await self._method()(self.request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable(
                    f"grpc: cannot reach {self.target} ({exc.details()}); is the server "
                    "listening there? Fix --grpc-url"
                ) from None
            raise InvalidArgument(
                f"grpc: the server answered {exc.code().name}: {exc.details()}"
            ) from None
        response = pl.grpc_messages().ModelInferResponse.FromString(answer)
        if not response.outputs:
            raise InvalidArgument(f"grpc: the answer has no outputs: {response}")

    async def senders(self, n: int) -> list[Send]:
        import grpc

        method, request = self._method(), self.request

        async def send() -> str:
            try:
                await method(request)
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)
            return "ok"

        return [send] * n

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class NativeGrpcDriver:
    """v2 gRPC ModelInfer through bench/grpc_client.py (the default: a fraction of grpc.aio's
    CPU per call); all clients share one HTTP/2 connection, as grpc.aio's share a channel."""

    def __init__(self, target: str, model: str, version: str, p: pl.Payload) -> None:
        self.protocol, self.target = "grpc", target
        host, _, port = target.rpartition(":")
        if not host or not port.isdigit():
            raise InvalidArgument(f"--grpc-url {target!r}: give host:port")
        self.host, self.port = host.strip("[]"), int(port)
        self.request = pl.grpc_request(p, model, version)
        self.block = request_headers(target, _INFER_METHOD)
        self._conn: GrpcConnection | None = None

    async def _connection(self) -> GrpcConnection:
        if self._conn is None or self._conn.transport is None:
            try:
                self._conn = await GrpcConnection.open(self.host, self.port)
            except OSError as exc:
                raise Unavailable(
                    f"grpc: cannot reach {self.target} ({exc.strerror or exc}); is the server "
                    "listening there? Fix --grpc-url"
                ) from None
        return self._conn

    async def probe(self) -> None:
        conn = await self._connection()
        try:
            answer = await asyncio.wait_for(conn.call(self.block, self.request), 30)
        except GrpcCallError as exc:
            if exc.status == "UNAVAILABLE":
                raise Unavailable(f"grpc: {self.target} is unavailable: {exc.message}") from None
            raise InvalidArgument(f"grpc: the server answered {exc}") from None
        response = pl.grpc_messages().ModelInferResponse.FromString(answer)
        if not response.outputs:
            raise InvalidArgument(f"grpc: the answer has no outputs: {response}")

    async def senders(self, n: int) -> list[Send]:
        conn = await self._connection()
        call, block, request = conn.call, self.block, self.request

        async def send() -> str:
            try:
                await call(block, request)
            except GrpcCallError as exc:
                return exc.status
            return "ok"

        return [send] * n

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            await self._conn.closed
            self._conn = None
