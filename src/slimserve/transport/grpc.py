"""KServe v2 over gRPC (`inference.GRPCInferenceService`) on grpc.aio.

Each RPC parses its message, decodes it (`grpc_codec`), calls one `Engine` method and encodes
the answer; a `SlimserveError` becomes the gRPC status from `STATUS` with the error's message,
bytes that are not a valid message are INVALID_ARGUMENT, anything else is logged once and
answered INTERNAL. Messages above settings.max_body_bytes are refused by gRPC itself with
RESOURCE_EXHAUSTED before they are parsed. The call's deadline becomes the request's timeout
(`RequestControls.timeout_s`; the earlier of it and a `timeout` parameter). RPCs of Triton's
service that are not declared here (streaming, shared memory, trace, log settings) answer
UNIMPLEMENTED.

A model name may carry a variant ("mlp:int8"), or the request a string parameter `variant`.
Python clients can use the generated stub, `vendor.grpc_service_pb2_grpc`, or tritonclient.grpc.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError, Message

from slimserve.config import Settings
from slimserve.errors import Code, ConfigError, InvalidArgument, SlimserveError
from slimserve.security.keys import Identity, bearer_token
from slimserve.serving.engine import Engine
from slimserve.transport import grpc_codec as codec
from slimserve.transport.limits import TensorLimits, check_inputs
from slimserve.transport.vendor import grpc_service_pb2 as pb

log = logging.getLogger("slimserve.grpc")
_INT32_MAX = 2**31 - 1

# The one table from error codes to gRPC status codes.
STATUS: dict[Code, grpc.StatusCode] = {
    Code.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Code.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Code.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    Code.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    Code.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Code.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.PAYLOAD_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Code.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    Code.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    Code.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Code.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    Code.INTERNAL: grpc.StatusCode.INTERNAL,
}

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Request = TypeVar("Request", bound=Message)
Handler = Callable[[Any, Request, Context], Awaitable[Message]]
RawHandler = Callable[[Any, bytes, Context], Awaitable[Message]]


def create_server(engine: Engine, settings: Settings) -> grpc.aio.Server:
    """A grpc.aio server for `engine` bound to settings.host:settings.grpc_port (not started)."""
    server = grpc.aio.server(options=server_options(settings))
    add_servicer(InferenceServicer(engine, TensorLimits.from_settings(settings)), server)
    address = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{address}:{settings.grpc_port}"
    try:
        credentials = server_credentials(settings)
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        port, reason = 0, str(exc)
    else:
        reason = "the address is in use or not local"
    if port == 0:
        raise ConfigError(
            f"cannot listen for gRPC on {address} ({reason}); choose another --grpc-port "
            "or --host, or 0 to disable gRPC"
        )
    return server


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS from settings.tls_cert/tls_key; client certificates required with tls_client_ca."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    try:
        chain = settings.tls_cert.read_bytes()
        key = settings.tls_key.read_bytes()
        ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
    except OSError as exc:
        raise ConfigError(f"cannot read a TLS file: {exc}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=ca, require_client_auth=ca is not None
    )


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
        # gRPC's limits are C ints: larger settings mean "as large as gRPC allows".
        ("grpc.max_receive_message_length", min(settings.max_body_bytes, _INT32_MAX)),
        ("grpc.max_send_message_length", -1),  # answers are as large as the model makes them
        # One process: refuse a port another server holds (it would steal half the calls).
        # Several workers (--workers): they share the port on purpose.
        ("grpc.so_reuseport", 1 if settings.shares_ports() else 0),
        # Limits (see SECURITY.md): metadata size, a deadline on the TLS and HTTP/2
        # handshake, idle connections closed (clients reconnect by themselves), and keepalive
        # pings every 60 s that drop a peer silent for 20 s more.
        ("grpc.max_metadata_size", settings.max_header_bytes),
        ("grpc.server_handshake_timeout_ms", int(settings.header_timeout_s * 1000)),
        ("grpc.max_connection_idle_ms", int(settings.keep_alive_s * 10 * 1000)),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
    ]


def add_servicer(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register every RPC of the service. Requests reach the handlers as bytes, so that a
    malformed message is parsed inside `_rpc` and answered INVALID_ARGUMENT (gRPC's own
    deserializer would answer UNKNOWN and log a traceback per bad request)."""
    handlers = {
        method.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name), response_serializer=_serialize
        )
        for method in SERVICE.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    if hasattr(server, "add_registered_method_handlers"):  # grpcio >= 1.62: faster dispatch
        server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _serialize(message: Message) -> bytes:
    return cast(bytes, message.SerializeToString())


def _rpc(request_type: type[Request]) -> Callable[[Handler[Request]], RawHandler]:
    """Parse the request, call the method, map SlimserveError to its status; log anything
    else once and answer INTERNAL."""

    def wrap(method: Handler[Request]) -> RawHandler:
        @functools.wraps(method)
        async def rpc(self: Any, data: bytes, context: Context) -> Message:
            try:
                return await method(self, _parse(request_type, data), context)
            except SlimserveError as exc:
                exc.message = self.engine.public(exc.message)
                await _abort(context, exc)
            except Exception:
                log.exception("unhandled error in gRPC %s", method.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error; see the log")
            raise AssertionError("unreachable: context.abort raises")

        return rpc

    return wrap


def _parse(request_type: type[Request], data: bytes) -> Request:
    try:
        return cast(Request, request_type.FromString(data))
    except DecodeError:
        raise InvalidArgument(
            f"the request is not a valid {request_type.DESCRIPTOR.full_name} message; build it "
            "from the KServe v2 / Triton gRPC definitions (e.g. with tritonclient.grpc)"
        ) from None


async def _abort(context: Context, exc: SlimserveError) -> None:
    trailing: tuple[tuple[str, str], ...] = ()
    if exc.retry_after_s is not None:
        trailing = (("retry-after", str(max(1, math.ceil(exc.retry_after_s)))),)
    code = STATUS.get(exc.code, grpc.StatusCode.INTERNAL)
    await context.abort(code, exc.message, trailing_metadata=trailing)


def _peer_host(peer: str) -> str | None:
    """'ipv4:127.0.0.1:5123' -> '127.0.0.1' (the client identity for rate limits)."""
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return address.rpartition(":")[0].strip("[]") or None
    return address or None


def _token(context: Context) -> str | None:
    """The API key from the `authorization` metadata ('Bearer KEY')."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return bearer_token(value if isinstance(value, str) else value.decode("latin-1"))
    return None


class InferenceServicer:
    """The v2 RPCs, each a thin call into the engine. Health needs no key; everything else
    needs the scope named in its call to `_allow` when the server has API keys."""

    def __init__(self, engine: Engine, limits: TensorLimits | None = None) -> None:
        self.engine = engine
        self.limits = limits or TensorLimits()

    def _allow(self, context: Context, scope: str, model: str | None = None) -> Identity:
        return self.engine.authorize(_token(context), scope, model or None)

    def _model(
        self, context: Context, request: Any, scope: str = "infer"
    ) -> tuple[str, str | None]:
        """Authorizes `scope` on the model a request names; its (name, version or None)."""
        self._allow(context, scope, request.name)
        return request.name, request.version or None

    @_rpc(pb.ServerLiveRequest)
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> Any:
        return pb.ServerLiveResponse(live=self.engine.live())

    @_rpc(pb.ServerReadyRequest)
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> Any:
        return pb.ServerReadyResponse(ready=self.engine.ready())

    @_rpc(pb.ModelReadyRequest)
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> Any:
        ready = self.engine.model_ready(*self._model(context, request))
        return pb.ModelReadyResponse(ready=ready)

    @_rpc(pb.ServerMetadataRequest)
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> Any:
        self._allow(context, "infer")
        return codec.server_metadata_message(self.engine.server_metadata())

    @_rpc(pb.ModelMetadataRequest)
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> Any:
        meta = self.engine.model_metadata(*self._model(context, request))
        return codec.model_metadata_message(meta)

    @_rpc(pb.ModelInferRequest)
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> Any:
        identity = self._allow(context, "infer", request.model_name)
        client = identity.client if identity.key_id else _peer_host(context.peer())
        infer = codec.decode_infer_request(request, client, context.time_remaining())
        check_inputs(infer.inputs, self.limits)
        response = await self.engine.infer(infer)
        return codec.encode_infer_response(response)

    @_rpc(pb.ModelConfigRequest)
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> Any:
        config = self.engine.model_config(*self._model(context, request))
        return codec.model_config_message(config)

    @_rpc(pb.ModelStatisticsRequest)
    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Context) -> Any:
        name, version = self._model(context, request, "metrics")  # no name: every model
        stats = self.engine.model_statistics(name or None, version)
        return codec.statistics_message(stats)

    @_rpc(pb.RepositoryIndexRequest)
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> Any:
        # One repository per server: repository_name is not used.
        self._allow(context, "infer")
        return codec.index_message(self.engine.repository_index(request.ready))

    @_rpc(pb.RepositoryModelLoadRequest)
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> Any:
        identity = self._allow(context, "manage")
        codec.load_parameters(request.parameters)
        await self.engine.load_model(request.model_name, identity)
        return pb.RepositoryModelLoadResponse()

    @_rpc(pb.RepositoryModelUnloadRequest)
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> Any:
        identity = self._allow(context, "manage")
        await self.engine.unload_model(request.model_name, identity)
        return pb.RepositoryModelUnloadResponse()
