"""A blocking HTTP/2 client that sends any bytes, valid or not, and reads the server's frames
back with `hyperframe` and `hpack` (the python-hyper parsers, not slimserve's own), for the
HTTP/2 conformance tests and the frame fuzzer. Also: the native gRPC server run in a thread
of its own, recording any exception its event loop did not expect."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from slimserve.transport.vendor import grpc_service_pb2 as pb

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SERVICE = "/inference.GRPCInferenceService/"
# Error codes (RFC 9113 section 7), named for the assertions.
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED = 0, 1, 3, 5
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 6, 7, 8, 9, 11


def raw_frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    """Any frame, as bytes: no check of what the payload or the stream should be."""
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes((kind, flags))
        + struct.pack(">I", sid)
        + payload
    )


def grpc_body(message: Any) -> bytes:
    data = message.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


def request_fields(method: str = "ServerLive", **extra: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", SERVICE + method),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *((k.replace("_", "-"), v) for k, v in extra.items()),
    ]


class RawH2:
    """One connection. `send` writes bytes as they are; `read_until` parses what comes back."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.timeout = timeout
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.buffer = bytearray()
        self.frames: list[Frame] = []  # every frame received, in order
        self.closed = False  # the server closed (EOF or reset)
        self.next_sid = 1

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def handshake(self, settings: dict[int, int] | None = None) -> None:
        """Preface and SETTINGS; waits for the server's SETTINGS and acknowledges them."""
        self.send(PREFACE + SettingsFrame(0, settings or {}).serialize())
        self.read_until(lambda f: isinstance(f, SettingsFrame) and "ACK" not in f.flags)
        self.send(SettingsFrame(0, flags=["ACK"]).serialize())

    def headers(self, sid: int, fields: list[tuple[str, str]], end_stream: bool = True) -> bytes:
        flags = ["END_HEADERS"] + (["END_STREAM"] if end_stream else [])
        return HeadersFrame(sid, self.encoder.encode(fields), flags=flags).serialize()

    def request(
        self, message: Any = None, method: str = "ServerLive", sid: int | None = None, **extra: str
    ) -> tuple[int, bytes]:
        """A whole gRPC request (HEADERS, DATA with END_STREAM) as bytes, and its stream id."""
        if sid is None:
            sid, self.next_sid = self.next_sid, self.next_sid + 2
        body = grpc_body(message if message is not None else pb.ServerLiveRequest())
        data = DataFrame(sid, body, flags=["END_STREAM"]).serialize()
        return sid, self.headers(sid, request_fields(method, **extra), end_stream=False) + data

    def read_until(
        self, done: Callable[[Frame], bool], timeout: float | None = None
    ) -> Frame | None:
        """Frames until one satisfies `done` (returned), or EOF or the timeout (None)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            for f in self._parse():
                if done(f):
                    return f
            if self.closed or time.monotonic() > deadline:
                return None
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return None
            except ConnectionError:
                data = b""
            if not data:
                self.closed = True
            self.buffer += data

    def _parse(self) -> Iterator[Frame]:
        while len(self.buffer) >= 9:
            f, length = Frame.parse_frame_header(memoryview(bytes(self.buffer[:9])))
            if len(self.buffer) < 9 + length:
                return
            f.parse_body(memoryview(bytes(self.buffer[9 : 9 + length])))
            del self.buffer[: 9 + length]
            if isinstance(f, (HeadersFrame, ContinuationFrame)):
                f.fields = dict(self.decoder.decode(f.data, raw=True))  # type: ignore[attr-defined]
            self.frames.append(f)
            yield f

    def goaway_code(self, timeout: float | None = None) -> int | None:
        """The error code of the server's GOAWAY, reading on until it closes; None if none."""
        self.read_until(lambda f: False, timeout)
        codes = [f.error_code for f in self.frames if isinstance(f, GoAwayFrame)]
        return codes[-1] if codes else None

    def reset_code(self, sid: int, timeout: float | None = None) -> int | None:
        found = self.read_until(
            lambda f: isinstance(f, RstStreamFrame) and f.stream_id == sid, timeout
        )
        return found.error_code if isinstance(found, RstStreamFrame) else None

    def answer(self, sid: int, timeout: float | None = None) -> dict[str, str]:
        """Headers and trailers of stream `sid`'s answer, merged (empty if none came); a
        reset adds "reset": its error code."""

        def ended(f: Frame) -> bool:
            return f.stream_id == sid and ("END_STREAM" in f.flags or isinstance(f, RstStreamFrame))

        self.read_until(ended, timeout)
        out: dict[str, str] = {}
        for f in self.frames:
            if f.stream_id != sid:
                continue
            if isinstance(f, HeadersFrame):
                out.update({k.decode(): v.decode() for k, v in f.fields.items()})  # type: ignore[attr-defined]
            elif isinstance(f, RstStreamFrame):
                out["reset"] = str(f.error_code)
        return out

    def ping_answered(self, timeout: float | None = None) -> bool:
        """Whether the server still answers a PING on this connection."""
        try:
            self.send(PingFrame(0, b"stillok?").serialize())
        except OSError:
            return False
        got = self.read_until(lambda f: isinstance(f, PingFrame) and "ACK" in f.flags, timeout)
        return got is not None


def serves(port: int) -> bool:
    """A new connection gets a normal call (ServerLive) answered with grpc-status 0."""
    c = RawH2(port)
    try:
        c.handshake()
        sid, data = c.request()
        c.send(data)
        return c.answer(sid).get("grpc-status") == "0"
    finally:
        c.close()


@dataclass
class ThreadServer:
    """The native gRPC server on its own event loop thread; `errors` collects what its loop
    reported as unhandled (a crash in a protocol callback lands there)."""

    server: Any
    port: int
    loop: asyncio.AbstractEventLoop
    errors: list[dict[str, Any]] = field(default_factory=list)

    def run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call_soon(self, fn: Callable[[], Any]) -> Any:
        async def inner() -> Any:
            return fn()

        return self.run(inner())


@contextmanager
def thread_server(make: Callable[[], Any], port: int) -> Iterator[ThreadServer]:
    """`make()` builds a NativeGrpcServer listening on `port`; it is started on a new event
    loop in a thread, and stopped (grace 0) and its loop closed at the end."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Any] = {}

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.set_exception_handler(lambda _loop, context: holder["ts"].errors.append(context))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=main, name="h2-server", daemon=True)
    server = make()
    ts = ThreadServer(server, port, loop)
    holder["ts"] = ts
    thread.start()
    ready.wait(5)
    ts.run(server.start())
    try:
        yield ts
    finally:
        ts.run(server.stop(grace=0))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
