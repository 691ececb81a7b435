"""KServe v2 over gRPC on slimserve's own HTTP/2 connection layer (unary calls only).

grpcio's Python server costs ~190 us of CPU per unary call here even when its handler does
nothing (benchmarks/grpc_echo.py driven by h2load): more than the rest of an MLP request put
together. Every RPC of the v2 service is unary, so a server for them needs only a small part of
HTTP/2: this module parses frames itself, decodes header blocks with `hpack` (the HPACK codec of
the python-hyper project), answers with precomputed header blocks that never touch a dynamic
table, and calls the same `InferenceServicer` as the grpc.aio server (transport/grpc.py).
`--grpc-server grpcio` keeps grpc.aio.

What it does (RFC 9113, gRPC's PROTOCOL-HTTP2.md):
- the connection preface and SETTINGS both ways; PING answered; GOAWAY sent on shutdown,
  honoured when received; PRIORITY and unknown frame types ignored; padding removed;
  header blocks spread over CONTINUATION frames joined;
- flow control both ways: the client may send a whole message without waiting (large windows,
  replenished as data arrives); answers respect the client's connection and stream windows and
  its largest frame size, and wait for WINDOW_UPDATE when they run out;
- a call: POST, content-type application/grpc[+proto], one length-prefixed message (gzip or
  deflate compressed when grpc-encoding says so), `grpc-timeout` as the call's deadline,
  metadata for the servicer (`authorization`); answered with :status 200, the message and
  grpc-status trailers, or trailers only for an error; RST_STREAM or a lost connection cancels
  the call's task;
- limits: header blocks above settings.max_header_bytes close the connection
  (ENHANCE_YOUR_CALM), messages above settings.max_body_bytes are RESOURCE_EXHAUSTED without
  being buffered, streams above MAX_CONCURRENT_STREAMS are refused, a client that has not
  finished its preface within header_timeout_s is disconnected, and a connection with no call
  for ten keep-alive periods is closed with GOAWAY (clients reconnect by themselves).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import hpack
import hpack.exceptions
from google.protobuf.message import Message

from slimserve.config import Settings
from slimserve.errors import ConfigError
from slimserve.serving.engine import Engine
from slimserve.transport.grpc import SERVICE, InferenceServicer
from slimserve.transport.h2wire import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_FRAME,
    DEFAULT_WINDOW,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_WINDOW,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    S_ENABLE_PUSH,
    S_INITIAL_WINDOW_SIZE,
    S_MAX_CONCURRENT_STREAMS,
    S_MAX_FRAME_SIZE,
    S_MAX_HEADER_LIST_SIZE,
    SETTINGS,
    U32,
    WINDOW_UPDATE,
    FrameReader,
    FrameTooLarge,
    frame,
    literal,
    unpad,
)
from slimserve.transport.limits import TensorLimits

log = logging.getLogger("slimserve.grpc")

# Error codes (RFC 9113 section 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11
# What this server advertises: frames up to 1 MiB (fewer frames per large tensor), a 16 MiB
# window per stream (most requests never wait for a WINDOW_UPDATE), the whole connection window.
OUR_MAX_FRAME = 1 << 20
OUR_STREAM_WINDOW = 1 << 24
MAX_STREAMS = 1024
_METHODS = {f"/{SERVICE.full_name}/{m.name}".encode(): m.name for m in SERVICE.methods}


_STATUS_200 = b"\x88"  # static table index 8: ":status: 200"
_RESPONSE_HEADERS = _STATUS_200 + literal(b"content-type", b"application/grpc")
_OK_TRAILERS = literal(b"grpc-status", b"0")
_ACCEPT = literal(b"grpc-accept-encoding", b"identity,deflate,gzip")


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

    __slots__ = ("_metadata", "_peer", "_deadline")

    def __init__(self, metadata: tuple[tuple[str, str], ...], peer: str, deadline: float | None):
        self._metadata, self._peer, self._deadline = metadata, peer, deadline

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise _Abort(code, details, trailing_metadata)


class _Stream:
    __slots__ = (
        "id", "method", "metadata", "deadline", "encoding", "body", "ended", "task",
        "send_window", "pending", "trailers", "closed", "refused",
    )  # fmt: skip

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.method: str | None = None
        self.metadata: tuple[tuple[str, str], ...] = ()
        self.deadline: float | None = None
        self.encoding = b"identity"
        self.body: bytearray | memoryview = bytearray()
        self.ended = False  # the client's half is closed
        self.task: asyncio.Task[None] | None = None
        self.send_window = send_window
        self.pending = b""  # answer bytes waiting for window
        self.trailers = b""  # the trailers frame, sent after `pending`
        self.closed = False
        self.refused: tuple[grpc.StatusCode, str] | None = None  # answer without running


Handler = Callable[[bytes | memoryview, CallContext], Awaitable[Message]]


class _Connection(asyncio.Protocol):
    def __init__(self, server: NativeGrpcServer) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader(OUR_MAX_FRAME)
        self.preface = False
        self.preface_bytes = b""
        # Metadata over max_header_bytes fails the call (RESOURCE_EXHAUSTED, _read_call); a
        # header block over 16 times as much, compressed or not (an HPACK bomb), fails the
        # connection: the block must be decoded to keep the connection's HPACK state.
        self.block_limit = 16 * self.limits.max_header_bytes
        self.decoder = hpack.Decoder(max_header_list_size=self.block_limit)
        self.streams: dict[int, _Stream] = {}
        self.last_stream = 0
        self.peer_window = DEFAULT_WINDOW  # initial window of each new stream, from SETTINGS
        self.peer_frame = DEFAULT_FRAME
        self.send_window = DEFAULT_WINDOW  # the connection's
        self.recv_unacked = 0
        self.header_block: bytearray | None = None  # a HEADERS frame waiting for CONTINUATION
        self.header_stream = 0
        self.header_flags = 0
        self.going_away = False
        self.failed = False
        self.peer_name = "unknown"
        self.started = self.last_call = self.last_seen = time.monotonic()
        self.ping_sent: float | None = None
        self.timer: asyncio.TimerHandle | None = None

    # -- connection life ---------------------------------------------------------------------

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        transport: Any = base  # uvloop's transports are not asyncio.Transport subclasses
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            kind = "ipv6" if ":" in peer[0] else "ipv4"
            host = f"[{peer[0]}]" if kind == "ipv6" else peer[0]
            self.peer_name = f"{kind}:{host}:{peer[1]}"
        settings = struct.pack(
            ">HIHIHIHI",
            S_MAX_CONCURRENT_STREAMS, MAX_STREAMS,
            S_INITIAL_WINDOW_SIZE, OUR_STREAM_WINDOW,
            S_MAX_FRAME_SIZE, OUR_MAX_FRAME,
            S_MAX_HEADER_LIST_SIZE, self.limits.max_header_bytes,
        )  # fmt: skip
        grow = struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW)
        transport.write(frame(SETTINGS, 0, 0, settings) + frame(WINDOW_UPDATE, 0, 0, grow))
        self.server.connections.add(self)
        self._schedule_tick()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        for stream in self.streams.values():
            stream.closed = True
            if stream.task is not None:
                stream.task.cancel()
        self.streams.clear()
        self.transport = None

    def _schedule_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(self.server.tick_s, self._tick)

    def _tick(self) -> None:
        """Handshake deadline, idle connections, and keep-alive pings."""
        if self.transport is None:
            return
        now, srv = time.monotonic(), self.server
        if not self.preface and now - self.started > srv.handshake_s:
            self.transport.abort()
            return
        if not self.streams and now - self.last_call > srv.idle_s:
            self._goaway(NO_ERROR, b"idle")
            self.transport.close()
            return
        if self.ping_sent is not None and now - self.ping_sent > srv.ping_timeout_s:
            self.transport.abort()  # no PING ACK: the peer is gone
            return
        if self.ping_sent is None and now - self.last_seen > srv.ping_every_s:
            self.ping_sent = now
            self.transport.write(frame(PING, 0, 0, b"slimserv"))
        self._schedule_tick()

    def _goaway(self, code: int, debug: bytes = b"") -> None:
        if self.transport is not None and not self.going_away:
            self.going_away = True
            payload = struct.pack(">II", self.last_stream, code) + debug
            self.transport.write(frame(GOAWAY, 0, 0, payload))

    def _fail(self, code: int, why: str) -> None:
        """A connection error: GOAWAY with the code and close; nothing more is read."""
        log.debug("gRPC connection from %s closed: %s", self.peer_name, why)
        self._goaway(code, why.encode()[:200])
        self.failed = True
        if self.transport is not None:
            self.transport.close()

    def shutdown(self) -> None:
        """Server stop: no new calls; those in progress may finish."""
        self._goaway(NO_ERROR, b"server stopping")
        if not self.streams and self.transport is not None:
            self.transport.close()

    # -- reading -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.failed:
            return
        self.last_seen = time.monotonic()
        if not self.preface:
            data = self._read_preface(data)
            if not data:
                return
        try:
            for kind, flags, stream_id, payload in self.reader.feed(data):
                self._dispatch(kind, flags, stream_id, payload)
                if self.failed:
                    return
        except FrameTooLarge as exc:
            self._fail(FRAME_SIZE_ERROR, str(exc))
            return
        if self.recv_unacked > (1 << 30) and self.transport is not None:
            self.transport.write(frame(WINDOW_UPDATE, 0, 0, U32.pack(self.recv_unacked)))
            self.recv_unacked = 0

    def _read_preface(self, data: bytes) -> bytes:
        """The bytes after the client's connection preface (b"" while it is incomplete)."""
        seen = self.preface_bytes + data
        if not (PREFACE.startswith(seen) or seen.startswith(PREFACE)):
            self._fail(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
            return b""
        if len(seen) < len(PREFACE):
            self.preface_bytes = seen
            return b""
        self.preface = True
        return seen[len(PREFACE) :]

    def _dispatch(self, kind: int, flags: int, sid: int, payload: memoryview) -> None:
        if self.header_block is not None and kind != CONTINUATION:
            self._fail(PROTOCOL_ERROR, "a header block was interrupted")
            return
        if kind == DATA:
            self._on_data(flags, sid, payload)
        elif kind == HEADERS:
            self._on_headers(flags, sid, payload)
        elif kind == CONTINUATION:
            if self.header_block is None or sid != self.header_stream:
                self._fail(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
                return
            self.header_block += payload
            if len(self.header_block) > self.block_limit:
                self._fail(ENHANCE_YOUR_CALM, "header block over the metadata limit")
                return
            if flags & END_HEADERS:
                block, self.header_block = bytes(self.header_block), None
                self._headers_complete(self.header_stream, self.header_flags, block)
        elif kind == SETTINGS:
            self._on_settings(flags, sid, payload)
        elif kind == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif kind == PING:
            if sid != 0 or len(payload) != 8:
                self._fail(PROTOCOL_ERROR, "bad PING")
            elif flags & ACK:
                self.ping_sent = None
            elif self.transport is not None:
                self.transport.write(frame(PING, ACK, 0, payload))
        elif kind == RST_STREAM:
            stream = self.streams.pop(sid, None)
            if stream is not None:
                stream.closed = True
                if stream.task is not None:
                    stream.task.cancel()
        elif kind == GOAWAY:
            self.going_away = True
            if not self.streams and self.transport is not None:
                self.transport.close()
        elif kind == PUSH_PROMISE:
            self._fail(PROTOCOL_ERROR, "a client may not push")
        # PRIORITY and unknown types are ignored (RFC 9113 5.5).

    def _unpad(self, flags: int, payload: memoryview) -> memoryview | None:
        out = unpad(flags, payload)
        if out is None:
            self._fail(PROTOCOL_ERROR, "padding longer than the frame")
        return out

    def _on_headers(self, flags: int, sid: int, payload: memoryview) -> None:
        block = self._unpad(flags, payload)
        if block is None:
            return
        if sid == 0 or sid % 2 == 0:
            self._fail(PROTOCOL_ERROR, "HEADERS on a stream a client cannot open")
            return
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if len(block) > self.block_limit:
            self._fail(ENHANCE_YOUR_CALM, "header block over the metadata limit")
            return
        if flags & END_HEADERS:
            self._headers_complete(sid, flags, bytes(block))
        else:
            self.header_block, self.header_stream, self.header_flags = bytearray(block), sid, flags

    def _headers_complete(self, sid: int, flags: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block, raw=True)
        except hpack.exceptions.OversizedHeaderListError:
            self._fail(ENHANCE_YOUR_CALM, "metadata over the limit (max_header_bytes)")
            return
        except hpack.exceptions.HPACKError as exc:
            self._fail(COMPRESSION_ERROR, f"bad header block: {exc}")
            return
        stream = self.streams.get(sid)
        if stream is not None:  # trailers from the client: its half ends here
            if not flags & END_STREAM:
                self._fail(PROTOCOL_ERROR, "trailers without END_STREAM")
                return
            self._end_of_request(stream)
            return
        if sid <= self.last_stream:
            self._fail(STREAM_CLOSED, "HEADERS on a closed stream")
            return
        self.last_stream = sid
        self.last_call = time.monotonic()
        if self.going_away:
            self._reset(sid, REFUSED_STREAM)
            return
        if len(self.streams) >= MAX_STREAMS:
            self._reset(sid, REFUSED_STREAM)
            return
        stream = _Stream(sid, self.peer_window)
        self.streams[sid] = stream
        self._read_call(stream, headers)
        if flags & END_STREAM:
            self._end_of_request(stream)

    def _read_call(self, stream: _Stream, headers: Any) -> None:
        path = method = content_type = b""
        metadata: list[tuple[str, str]] = []
        size = 0
        for name, value in headers:
            size += len(name) + len(value) + 32  # RFC 9113 6.5.2
            if name[:1] == b":":
                if name == b":path":
                    path = value
                elif name == b":method":
                    method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = _timeout_s(value)
                if timeout is not None:
                    stream.deadline = time.monotonic() + timeout
            elif name == b"grpc-encoding":
                stream.encoding = value
            elif name != b"te":
                metadata.append((name.decode("latin-1"), value.decode("latin-1")))
        stream.metadata = tuple(metadata)
        if size > self.limits.max_header_bytes:
            stream.refused = (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the call's metadata ({size} bytes) is larger than the server's limit of "
                f"{self.limits.max_header_bytes} bytes (max_header_bytes)",
            )
        elif method != b"POST" or not content_type.startswith(b"application/grpc"):
            stream.refused = (
                grpc.StatusCode.UNIMPLEMENTED,
                "not a gRPC call: use POST with content-type application/grpc",
            )
        elif stream.encoding not in (b"identity", b"gzip", b"deflate"):
            stream.refused = (
                grpc.StatusCode.UNIMPLEMENTED,
                f"grpc-encoding {stream.encoding.decode('latin-1')!r} is not supported; use "
                "identity, gzip or deflate",
            )
        else:
            stream.method = _METHODS.get(path)
            if stream.method is None:
                stream.refused = (
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"method {path.decode('latin-1')} is not served here",
                )

    def _on_data(self, flags: int, sid: int, payload: memoryview) -> None:
        self.recv_unacked += len(payload)
        stream = self.streams.get(sid)
        data = self._unpad(flags, payload)
        if data is None:
            return
        if stream is None or stream.ended:
            if sid > self.last_stream or sid == 0:
                self._fail(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream reset or answered already: the bytes still count for the window
        if stream.refused is None:
            if not stream.body and flags & END_STREAM:
                stream.body = data  # the whole message in one frame: kept as a view, no copy
            else:
                assert isinstance(stream.body, bytearray)  # a view only once the stream ended
                stream.body += data
            if len(stream.body) > self.limits.max_body_bytes + 5:
                stream.refused = (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the message is larger than the server's limit of "
                    f"{self.limits.max_body_bytes} bytes (max_body_bytes)",
                )
                stream.body = bytearray()
                self._answer_refused(stream)
                return
        if len(payload) and not flags & END_STREAM and self.transport is not None:
            self.transport.write(frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", len(payload))))
        if flags & END_STREAM:
            self._end_of_request(stream)

    def _end_of_request(self, stream: _Stream) -> None:
        if stream.ended:
            return
        stream.ended = True
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
        context = CallContext(stream.metadata, self.peer_name, stream.deadline)
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
        length = U32.unpack_from(body, 1)[0]
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
        if stream.encoding == b"identity":
            stream.refused = (
                grpc.StatusCode.INTERNAL,
                "a compressed message without grpc-encoding",
            )
            return None
        wbits = 31 if stream.encoding == b"gzip" else 15
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(message, self.limits.max_body_bytes + 1)
        except zlib.error as exc:
            stream.refused = (grpc.StatusCode.INTERNAL, f"cannot decompress the message: {exc}")
            return None
        if len(out) > self.limits.max_body_bytes or inflater.unconsumed_tail:
            stream.refused = (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the decompressed message is larger than the server's limit of "
                f"{self.limits.max_body_bytes} bytes (max_body_bytes)",
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
        except Exception:  # noqa: BLE001 - the boundary: log once, answer INTERNAL
            log.exception("unhandled error in gRPC %s", stream.method)
            self._answer_error(stream, grpc.StatusCode.INTERNAL, "internal server error", ())
        else:
            self._answer(stream, reply.SerializeToString())

    def _answer(self, stream: _Stream, message: bytes) -> None:
        if stream.closed or self.transport is None:
            return
        sid = stream.id
        head = _RESPONSE_HEADERS
        body = b"\x00" + U32.pack(len(message)) + message
        stream.trailers = frame(HEADERS, END_HEADERS | END_STREAM, sid, _OK_TRAILERS)
        if len(body) <= min(stream.send_window, self.send_window, self.peer_frame):
            # The common case in one write: headers, the message, trailers.
            stream.send_window -= len(body)
            self.send_window -= len(body)
            self.transport.write(
                frame(HEADERS, END_HEADERS, sid, head) + frame(DATA, 0, sid, body) + stream.trailers
            )
            self._close(stream)
            return
        self.transport.write(frame(HEADERS, END_HEADERS, sid, head))
        stream.pending = body
        self._flush(stream)

    def _flush(self, stream: _Stream) -> None:
        """Send what the windows allow of the stream's answer; the trailers when all is out."""
        transport = self.transport
        if transport is None:
            return
        frames = []
        while stream.pending:
            n = min(len(stream.pending), stream.send_window, self.send_window, self.peer_frame)
            if n <= 0:
                break
            frames.append(frame(DATA, 0, stream.id, stream.pending[:n]))
            stream.pending = stream.pending[n:]
            stream.send_window -= n
            self.send_window -= n
        if not stream.pending:
            frames.append(stream.trailers)
        transport.write(b"".join(frames))
        if not stream.pending:
            self._close(stream)

    def _answer_refused(self, stream: _Stream) -> None:
        code, details = stream.refused or (grpc.StatusCode.INTERNAL, "refused")
        self._answer_error(stream, code, details, ())
        if not stream.ended and self.transport is not None:
            # The client is still sending: stop it (the answer is already on its way).
            self.transport.write(frame(RST_STREAM, 0, stream.id, struct.pack(">I", NO_ERROR)))
            stream.ended = True

    def _answer_error(
        self, stream: _Stream, code: grpc.StatusCode, details: str, trailing: Any
    ) -> None:
        """Trailers-only: one HEADERS frame with the status."""
        if stream.closed or self.transport is None:
            return
        block = bytearray(_RESPONSE_HEADERS)
        block += literal(b"grpc-status", str(code.value[0]).encode())
        if details:
            block += literal(b"grpc-message", _percent_encode(details)[:8192])
        for key, value in trailing or ():
            raw = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
            block += literal(key.encode("latin-1"), raw)
        if code == grpc.StatusCode.UNIMPLEMENTED:
            block += _ACCEPT
        self.transport.write(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, bytes(block)))
        self._close(stream)

    def _close(self, stream: _Stream) -> None:
        stream.closed = True
        self.streams.pop(stream.id, None)
        self.last_call = time.monotonic()
        if self.going_away and not self.streams and self.transport is not None:
            self.transport.close()

    def _reset(self, sid: int, code: int) -> None:
        if self.transport is not None:
            self.transport.write(frame(RST_STREAM, 0, sid, struct.pack(">I", code)))

    # -- settings and windows ----------------------------------------------------------------

    def _on_settings(self, flags: int, sid: int, payload: memoryview) -> None:
        if sid != 0 or len(payload) % 6:
            self._fail(FRAME_SIZE_ERROR if sid == 0 else PROTOCOL_ERROR, "bad SETTINGS frame")
            return
        if flags & ACK:
            return
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == S_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    self._fail(FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                    return
                delta, self.peer_window = value - self.peer_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == S_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME <= value <= 2**24 - 1:
                    self._fail(PROTOCOL_ERROR, "max frame size out of range")
                    return
                self.peer_frame = value
            elif key == S_ENABLE_PUSH and value > 1:
                self._fail(PROTOCOL_ERROR, "ENABLE_PUSH must be 0 or 1")
                return
        if self.transport is not None:
            self.transport.write(frame(SETTINGS, ACK, 0))
        self._flush_all()

    def _on_window_update(self, sid: int, payload: memoryview) -> None:
        if len(payload) != 4:
            self._fail(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
            return
        increment = U32.unpack(payload)[0] & 0x7FFFFFFF
        if increment == 0:
            self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            return
        if sid == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                self._fail(FLOW_CONTROL_ERROR, "connection window above 2^31-1")
                return
            self._flush_all()
            return
        stream = self.streams.get(sid)
        if stream is not None:
            stream.send_window += increment
            if stream.pending:
                self._flush(stream)

    def _flush_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.pending and self.send_window > 0:
                self._flush(stream)


class NativeGrpcServer:
    """The v2 gRPC service on slimserve's HTTP/2 layer; start() and stop(grace) as grpc.aio."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.settings = settings
        self.limits = settings
        servicer = InferenceServicer(engine, TensorLimits.from_settings(settings))
        self.handlers: dict[str, Handler] = {
            m.name: getattr(servicer, m.name) for m in SERVICE.methods
        }
        self.connections: set[_Connection] = set()
        self.handshake_s = settings.header_timeout_s
        self.idle_s = settings.keep_alive_s * 10
        self.ping_every_s, self.ping_timeout_s = 60.0, 20.0
        self.tick_s = min(1.0, self.handshake_s / 2)
        self._server: asyncio.base_events.Server | None = None

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
                reuse_port=s.workers > 1 or None,
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
        deadline = time.monotonic() + (grace or 0.0)
        while self.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.abort()
        if self._server is not None:
            await self._server.wait_closed()
