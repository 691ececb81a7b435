"""KServe v2 over gRPC on slimserve's own HTTP/2 connection layer (unary calls only): the
call layer. Frames, settings, streams and flow control are transport/h2conn.py's.

grpcio's Python server costs ~190 us of CPU per unary call here even when its handler does
nothing (benchmarks/grpc_echo.py driven by h2load): more than the rest of an MLP request put
together. Every RPC of the v2 service is unary, so a server for them needs only a small part of
HTTP/2 (h2conn.py), answers with precomputed header blocks that never touch a dynamic table,
and calls the same `InferenceServicer` as the grpc.aio server (transport/grpc.py).
`--grpc-server grpcio` keeps grpc.aio.

A call (gRPC's PROTOCOL-HTTP2.md): POST, content-type application/grpc[+proto], one
length-prefixed message (gzip or deflate compressed when grpc-encoding says so), `grpc-timeout`
as the call's deadline, metadata for the servicer (`authorization`); answered with :status
200, the message and grpc-status trailers, or trailers only for an error; a reset stream or a
lost connection cancels the call's task. Metadata over settings.max_header_bytes and messages
over settings.max_body_bytes are RESOURCE_EXHAUSTED (the message is not buffered past the
limit); a call refused before its message is whole is answered at once and its stream reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf.message import Message

from slimserve.config import Settings
from slimserve.errors import ConfigError
from slimserve.serving.engine import Engine
from slimserve.transport import h2wire as wire
from slimserve.transport.grpc import SERVICE, InferenceServicer
from slimserve.transport.h2conn import H2Limits, H2ServerConnection, H2Stream
from slimserve.transport.h2fields import RequestHead
from slimserve.transport.limits import TensorLimits

log = logging.getLogger("slimserve.grpc")

_METHODS = {f"/{SERVICE.full_name}/{m.name}".encode(): m.name for m in SERVICE.methods}


_STATUS_200 = b"\x88"  # static table index 8: ":status: 200"
_RESPONSE_HEADERS = _STATUS_200 + wire.literal(b"content-type", b"application/grpc")
_OK_TRAILERS = wire.literal(b"grpc-status", b"0")
_ACCEPT = wire.literal(b"grpc-accept-encoding", b"identity,deflate,gzip")


def _percent_encode(text: str) -> bytes:
    """grpc-message: printable ASCII but '%' as is, everything else %XX of its UTF-8."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def _timeout_s(value: bytes) -> float | None:
    """grpc-timeout: up to 8 digits and a unit (H M S m u n)."""
    units = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in units:
        return None
    return int(digits) * units[unit]


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        super().__init__(details)
        self.code, self.details, self.trailing = code, details, trailing


class CallContext:
    """What the servicer asks of a call (the part of grpc.aio.ServicerContext it uses)."""

    __slots__ = ("_clock", "_deadline", "_metadata", "_peer")

    def __init__(
        self,
        metadata: tuple[tuple[str, str], ...],
        peer: str,
        deadline: float | None,
        clock: Callable[[], float],
    ) -> None:
        self._metadata, self._peer, self._deadline = metadata, peer, deadline
        self._clock = clock

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - self._clock())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise _Abort(code, details, trailing_metadata)


class _Stream(H2Stream):
    __slots__ = ("body", "deadline", "encoding", "metadata", "method", "refused", "task")

    def __init__(self, stream_id: int, send_window: int, recv_window: int) -> None:
        super().__init__(stream_id, send_window, recv_window)
        self.method: str | None = None
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.deadline: float | None = None
        self.encoding = b"identity"
        self.body: bytearray | memoryview = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.refused: tuple[grpc.StatusCode, str] | None = None  # answer without running


Handler = Callable[[bytes | memoryview, CallContext], Awaitable[Message]]


class _Connection(H2ServerConnection):
    """One client connection: its gRPC calls over the HTTP/2 layer."""

    def __init__(self, server: NativeGrpcServer) -> None:
        super().__init__(server.h2, server.clock)
        self.server = server
        self.max_body = server.settings.max_body_bytes

    def on_connection(self, made: bool) -> None:
        self.server.connection_changed(self, made)

    def new_stream(self, stream_id: int, send_window: int, recv_window: int) -> H2Stream:
        return _Stream(stream_id, send_window, recv_window)

    def on_cancel(self, stream: H2Stream) -> None:
        task = cast(_Stream, stream).task
        if task is not None:
            task.cancel()

    # -- a request arrives -------------------------------------------------------------------

    def on_request(self, base: H2Stream, head: RequestHead, end: bool) -> None:
        stream = cast(_Stream, base)
        metadata: list[tuple[str, str]] = []
        size = 0
        content_type = b""
        for name, value in head.fields:
            size += len(name) + len(value) + 32  # RFC 9113 6.5.2
            if name == b"grpc-timeout":
                timeout = _timeout_s(value)
                if timeout is not None:
                    stream.deadline = self.clock() + timeout
            elif name == b"grpc-encoding":
                stream.encoding = value
            elif name == b"content-type":
                content_type = value
            elif name != b"te":
                metadata.append((name.decode("latin-1"), value.decode("latin-1")))
        stream.metadata = tuple(metadata)
        stream.refused = self._refusal(head, size, content_type, stream)
        if stream.refused is not None and not end:
            self._answer_refused(stream, more=True)  # at once: no need to send the message

    def _refusal(
        self, head: RequestHead, size: int, content_type: bytes, stream: _Stream
    ) -> tuple[grpc.StatusCode, str] | None:
        limit = self.server.settings.max_header_bytes
        if size > limit:
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the call's metadata ({size} bytes) is larger than the server's limit of "
                f"{limit} bytes (max_header_bytes)",
            )
        if head.method != b"POST" or not content_type.startswith(b"application/grpc"):
            return (
                grpc.StatusCode.UNIMPLEMENTED,
                "not a gRPC call: use POST with content-type application/grpc",
            )
        if stream.encoding not in (b"identity", b"gzip", b"deflate"):
            return (
                grpc.StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {stream.encoding.decode('latin-1')!r} is not supported; use "
                "identity, gzip or deflate",
            )
        stream.method = _METHODS.get(head.path)
        if stream.method is None:
            return (
                grpc.StatusCode.UNIMPLEMENTED,
                f"method {head.path.decode('latin-1')} is not served here",
            )
        return None

    def on_data(self, base: H2Stream, data: memoryview, end: bool) -> None:
        stream = cast(_Stream, base)
        if not stream.body and end:
            stream.body = data  # the whole message in one frame: kept as a view, no copy
        else:
            assert isinstance(stream.body, bytearray)  # a view only once the stream ended
            stream.body += data
        if len(stream.body) > self.max_body + 5:
            stream.refused = (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the message is larger than the server's limit of "
                f"{self.max_body} bytes (max_body_bytes)",
            )
            stream.body = bytearray()
            self._answer_refused(stream, more=not end)

    def on_end(self, base: H2Stream) -> None:
        stream = cast(_Stream, base)
        if stream.refused is not None:
            self._answer_refused(stream)
            return
        body = stream.body
        stream.body = bytearray()
        message = self._message(stream, body)
        if message is None:
            self._answer_refused(stream)
            return
        handler = self.server.handlers[stream.method or ""]
        context = CallContext(stream.metadata, self.peer_name, stream.deadline, self.clock)
        stream.task = asyncio.get_running_loop().create_task(
            self._call(stream, handler, message, context)
        )

    def _message(self, stream: _Stream, body: bytearray | memoryview) -> memoryview | bytes | None:
        """The one length-prefixed message of a unary call, decompressed."""
        if len(body) < 5:
            stream.refused = (
                grpc.StatusCode.INTERNAL,
                "a unary call needs one length-prefixed message",
            )
            return None
        compressed = body[0]
        length = wire.U32.unpack_from(body, 1)[0]
        if len(body) != 5 + length:
            stream.refused = (
                grpc.StatusCode.INTERNAL,
                f"the message prefix says {length} bytes but {len(body) - 5} came "
                "(one message per unary call)",
            )
            return None
        message = memoryview(body)[5:]
        if not compressed:
            return message
        return self._inflate(stream, message)

    def _inflate(self, stream: _Stream, message: memoryview) -> bytes | None:
        if stream.encoding == b"identity":
            stream.refused = (
                grpc.StatusCode.INTERNAL,
                "a compressed message without grpc-encoding",
            )
            return None
        wbits = 31 if stream.encoding == b"gzip" else 15
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(message, self.max_body + 1)
        except zlib.error as exc:
            stream.refused = (grpc.StatusCode.INTERNAL, f"cannot decompress the message: {exc}")
            return None
        if len(out) > self.max_body or inflater.unconsumed_tail:
            stream.refused = (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the decompressed message is larger than the server's limit of "
                f"{self.max_body} bytes (max_body_bytes)",
            )
            return None
        return out

    # -- calls and answers -------------------------------------------------------------------

    async def _call(
        self, stream: _Stream, handler: Handler, message: memoryview | bytes, context: CallContext
    ) -> None:
        try:
            reply = await handler(message, context)
        except _Abort as abort:
            self._answer_error(stream, abort.code, abort.details, abort.trailing)
        except asyncio.CancelledError:
            return  # RST_STREAM or the connection went away: nobody to answer
        except Exception:
            log.exception("unhandled error in gRPC %s", stream.method)
            self._answer_error(stream, grpc.StatusCode.INTERNAL, "internal server error", ())
        else:
            message = reply.SerializeToString()
            body = b"\x00" + wire.U32.pack(len(message)) + message
            self.send_answer(stream, _RESPONSE_HEADERS, body, _OK_TRAILERS)

    def _answer_refused(self, stream: _Stream, more: bool = False) -> None:
        """The refusal as trailers-only; `more`: the client is still sending, stop it."""
        code, details = stream.refused or (grpc.StatusCode.INTERNAL, "refused")
        self._answer_error(stream, code, details, ())
        if more:
            self.stop_receiving(stream)

    def _answer_error(
        self, stream: _Stream, code: grpc.StatusCode, details: str, trailing: Any
    ) -> None:
        """Trailers-only: one HEADERS frame with the status."""
        block = bytearray(_RESPONSE_HEADERS)
        block += wire.literal(b"grpc-status", str(code.value[0]).encode())
        if details:
            block += wire.literal(b"grpc-message", _percent_encode(details)[:8192])
        for key, value in trailing or ():
            raw = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
            block += wire.literal(key.encode("latin-1"), raw)
        if code == grpc.StatusCode.UNIMPLEMENTED:
            block += _ACCEPT
        self.send_trailers_only(stream, bytes(block))


class NativeGrpcServer:
    """The v2 gRPC service on slimserve's HTTP/2 layer; start() and stop(grace) as grpc.aio."""

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        h2: H2Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.h2 = h2 or H2Limits.from_settings(settings)  # the HTTP/2 limits (SECURITY.md)
        self.clock = clock
        servicer = InferenceServicer(engine, TensorLimits.from_settings(settings))
        self.handlers: dict[str, Handler] = {
            m.name: getattr(servicer, m.name) for m in SERVICE.methods
        }
        self.connections: set[_Connection] = set()
        self._drained = asyncio.Event()  # set while no connection is open
        self._drained.set()
        self._server: asyncio.base_events.Server | None = None

    def connection_changed(self, connection: _Connection, opened: bool) -> None:
        if opened:
            self.connections.add(connection)
            self._drained.clear()
        else:
            self.connections.discard(connection)
            if not self.connections:
                self._drained.set()

    def ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if s.tls_cert is None or s.tls_key is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(s.tls_cert), str(s.tls_key))
            if s.tls_client_ca is not None:
                context.load_verify_locations(str(s.tls_client_ca))
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot use the TLS files for gRPC: {exc}") from None
        context.set_alpn_protocols(["h2"])
        return context

    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        tls = self.ssl_context()
        try:
            self._server = await loop.create_server(
                lambda: _Connection(self),
                s.host,
                s.grpc_port,
                ssl=tls,
                ssl_handshake_timeout=s.header_timeout_s if tls is not None else None,
                reuse_port=s.shares_ports() or None,
                backlog=2048,
            )
        except OSError as exc:
            raise ConfigError(
                f"cannot listen for gRPC on {s.host}:{s.grpc_port} ({exc.strerror or exc}); "
                "choose another --grpc-port or --host, or 0 to disable gRPC"
            ) from None

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.shutdown()
        if grace:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._drained.wait(), grace)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
