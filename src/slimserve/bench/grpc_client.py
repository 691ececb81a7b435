"""A lean client for unary gRPC calls over one HTTP/2 connection, for `slimserve bench`.

A load generator on the same cores as the server must cost little per call, or it measures
itself: grpc.aio's client spends ~130 us of CPU per call here at 64 concurrent calls and ~270
us at one, as much as the server. This one sends a precomputed header block (literal fields,
no dynamic table) and the pre-serialized message, and reads the answer's frames itself; header
blocks from the server are decoded with `hpack` in order, so any gRPC server can be measured.
`slimserve bench --grpc-client grpcio` uses grpc.aio instead.

Flow control: the server may send up to 16 MiB per call and 2 GiB on the connection before
the client gives window back; requests respect the server's windows and frame size.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any
from urllib.parse import unquote

import hpack
import hpack.exceptions

from slimserve.transport import h2wire as wire

STREAM_WINDOW = 1 << 24
# grpc-status codes by number, for error labels.
STATUS_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)


class GrpcCallError(Exception):
    def __init__(self, status: str, message: str = "") -> None:
        super().__init__(f"{status}: {message}" if message else status)
        self.status, self.message = status, message


def request_headers(authority: str, path: str, metadata: dict[str, str] | None = None) -> bytes:
    block = b"\x83\x86"  # static table: :method POST, :scheme http
    block += b"".join(
        wire.literal(k.encode(), v.encode())
        for k, v in [
            (":path", path),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *(metadata or {}).items(),
        ]
    )
    return block


class _Call:
    __slots__ = ("data", "future", "headers")

    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future
        self.data = bytearray()
        self.headers: dict[bytes, bytes] = {}


class GrpcConnection(asyncio.Protocol):
    """One HTTP/2 connection; `call(block, message)` sends one unary call and returns the
    answer's message bytes, or raises GrpcCallError with the status."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.reader = wire.FrameReader()
        self.decoder = hpack.Decoder()
        self.calls: dict[int, _Call] = {}
        self.next_id = 1
        self.send_window = 65_535
        self.peer_stream_window = 65_535
        self.peer_frame = 16_384
        self.max_streams = 2**31
        self.recv_unacked = 0
        self.header_block: bytearray | None = None
        self.header_stream = self.header_flags = 0
        self.window_waiters: list[asyncio.Future[None]] = []
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.error: str | None = None

    @classmethod
    async def open(cls, host: str, port: int) -> GrpcConnection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(cls, host, port)
        return conn

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        # No push; 16 MiB per stream.
        settings = struct.pack(
            ">HIHI", wire.S_ENABLE_PUSH, 0, wire.S_INITIAL_WINDOW_SIZE, STREAM_WINDOW
        )
        grow = wire.U32.pack(wire.MAX_WINDOW - 65_535)
        transport.write(
            wire.PREFACE
            + wire.frame(wire.SETTINGS, 0, 0, settings)
            + wire.frame(wire.WINDOW_UPDATE, 0, 0, grow)
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(self.error or "UNAVAILABLE")
        self.transport = None
        if not self.closed.done():
            self.closed.set_result(None)

    def _fail_all(self, status: str, message: str = "the connection closed") -> None:
        for call in self.calls.values():
            if not call.future.done():
                call.future.set_exception(GrpcCallError(status, message))
        self.calls.clear()
        for waiter in self.window_waiters:
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    async def call(self, block: bytes, message: bytes) -> bytes:
        if self.transport is None:
            raise GrpcCallError("UNAVAILABLE", self.error or "the connection is closed")
        sid, self.next_id = self.next_id, self.next_id + 2
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.calls[sid] = _Call(future)
        body = b"\x00" + wire.U32.pack(len(message)) + message
        if len(body) <= min(self.send_window, self.peer_stream_window, self.peer_frame):
            self.send_window -= len(body)
            self.transport.write(
                wire.frame(wire.HEADERS, wire.END_HEADERS, sid, block)
                + wire.frame(wire.DATA, wire.END_STREAM, sid, body)
            )
        else:
            self.transport.write(wire.frame(wire.HEADERS, wire.END_HEADERS, sid, block))
            await self._send_large(sid, body)
        return await future

    async def _send_large(self, sid: int, body: bytes) -> None:
        stream_window = self.peer_stream_window
        while body and self.transport is not None:
            n = min(len(body), self.send_window, stream_window, self.peer_frame)
            if n <= 0:
                waiter = asyncio.get_running_loop().create_future()
                self.window_waiters.append(waiter)
                await waiter
                stream_window = max(stream_window, self.peer_stream_window)
                continue
            chunk, body = body[:n], body[n:]
            self.send_window -= n
            stream_window -= n
            self.transport.write(wire.frame(wire.DATA, 0 if body else wire.END_STREAM, sid, chunk))

    # -- reading -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        for kind, flags, sid, payload in self.reader.feed(data):
            self._dispatch(kind, flags, sid, payload)
        if self.recv_unacked > (1 << 30) and self.transport is not None:
            self.transport.write(
                wire.frame(wire.WINDOW_UPDATE, 0, 0, wire.U32.pack(self.recv_unacked))
            )
            self.recv_unacked = 0

    def _dispatch(self, kind: int, flags: int, sid: int, payload: memoryview) -> None:
        if kind == wire.DATA:
            self.recv_unacked += len(payload)
            call = self.calls.get(sid)
            data = wire.unpad(flags, payload)
            if call is not None and data is not None:
                call.data += data
                if flags & wire.END_STREAM:
                    self._finish(sid)
        elif kind in (wire.HEADERS, wire.CONTINUATION):
            if kind == wire.HEADERS:
                payload = wire.unpad(flags, payload) or memoryview(b"")
                if flags & wire.PRIORITY_FLAG:
                    payload = payload[5:]
                self.header_block = bytearray(payload)
                self.header_stream, self.header_flags = sid, flags
            elif self.header_block is not None:
                self.header_block += payload
            if flags & wire.END_HEADERS and self.header_block is not None:
                block, self.header_block = bytes(self.header_block), None
                self._headers(self.header_stream, self.header_flags, block)
        elif kind == wire.SETTINGS and not flags & wire.ACK:
            for i in range(0, len(payload), 6):
                key, value = struct.unpack_from(">HI", payload, i)
                if key == wire.S_MAX_CONCURRENT_STREAMS:
                    self.max_streams = value
                elif key == wire.S_INITIAL_WINDOW_SIZE:
                    self.peer_stream_window = value
                elif key == wire.S_MAX_FRAME_SIZE:
                    self.peer_frame = value
            if self.transport is not None:
                self.transport.write(wire.frame(wire.SETTINGS, wire.ACK, 0))
            self._wake()
        elif kind == wire.WINDOW_UPDATE:
            if sid == 0:
                self.send_window += wire.U32.unpack(payload)[0] & 0x7FFFFFFF
            self._wake()
        elif kind == wire.PING and not flags & wire.ACK and self.transport is not None:
            self.transport.write(wire.frame(wire.PING, wire.ACK, 0, payload))
        elif kind == wire.RST_STREAM:
            call = self.calls.pop(sid, None)
            code = wire.U32.unpack(payload)[0] if len(payload) == 4 else -1
            if call is not None and not call.future.done():
                call.future.set_exception(GrpcCallError("RST_STREAM", f"error code {code}"))
        elif kind == wire.GOAWAY:
            last = wire.U32.unpack(payload[:4])[0] & 0x7FFFFFFF if len(payload) >= 4 else 0
            self.error = "UNAVAILABLE"
            for stream_id in [s for s in self.calls if s > last]:
                call = self.calls.pop(stream_id)
                if not call.future.done():
                    call.future.set_exception(GrpcCallError("UNAVAILABLE", "GOAWAY"))

    def _wake(self) -> None:
        waiters, self.window_waiters = self.window_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _headers(self, sid: int, flags: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block, raw=True)
        except hpack.exceptions.HPACKError as exc:
            self.error = "INTERNAL"
            self._fail_all("INTERNAL", f"bad header block from the server: {exc}")
            self.close()
            return
        call = self.calls.get(sid)
        if call is None:
            return
        call.headers.update(headers)
        if flags & wire.END_STREAM:
            self._finish(sid)

    def _finish(self, sid: int) -> None:
        call = self.calls.pop(sid)
        if call.future.done():
            return
        status = call.headers.get(b"grpc-status")
        if status == b"0":
            data = call.data
            if len(data) < 5 or wire.U32.unpack_from(data, 1)[0] != len(data) - 5:
                call.future.set_exception(GrpcCallError("INTERNAL", "a bad length prefix"))
            else:
                call.future.set_result(bytes(data[5:]))
            return
        if status is None:
            label = f"HTTP_{call.headers.get(b':status', b'?').decode()}"
        else:
            code = int(status) if status.isdigit() else -1
            label = STATUS_NAMES[code] if 0 <= code < len(STATUS_NAMES) else f"STATUS_{code}"
        message = unquote(call.headers.get(b"grpc-message", b"").decode("utf-8", "replace"))
        call.future.set_exception(GrpcCallError(label, message))
