"""The native gRPC server's HTTP/2 layer (transport/grpc_h2.py), driven frame by frame by the
python-hyper `h2` client: flow control both ways, PING, RST_STREAM cancelling a call, GOAWAY
on shutdown, compressed messages, the message and metadata limits, calls that are not gRPC,
and a connection that is not HTTP/2. The engine is a stand-in (what is under test is the
connection layer; the real engine is served end to end in tests/e2e/test_grpc.py, over both
implementations)."""

from __future__ import annotations

import asyncio
import gzip
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from slimserve.config import Settings
from slimserve.transport.grpc_h2 import NativeGrpcServer, _percent_encode, _timeout_s
from slimserve.transport.vendor import grpc_service_pb2 as pb
from slimserve.types import ModelMetadata, TensorSpec
from tests.grpc_standin import StandInEngine, free_port

pytestmark = pytest.mark.timeout(60)
SERVICE = "/inference.GRPCInferenceService/"


class LoadEngine(StandInEngine):
    """Answers health and metadata (`inputs` tensors, so answers can be made large); a
    repository load blocks until cancelled or released."""

    def __init__(self, inputs: int = 1) -> None:
        self.inputs = inputs
        self.load_started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = False

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        tensors = tuple(TensorSpec(f"input_{i:05d}", "FP32", (-1, 784)) for i in range(self.inputs))
        return ModelMetadata(name, ("1",), "onnxruntime_onnx", tensors, (), "READY")

    async def load_model(self, name: str, identity: Any) -> None:
        self.load_started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


def grpc_message(message: Any, compress: str | None = None) -> bytes:
    body = message.SerializeToString()
    if compress == "gzip":
        body = gzip.compress(body)
    return bytes((1 if compress else 0,)) + struct.pack(">I", len(body)) + body


class Client:
    """One HTTP/2 connection; `call` sends a request and collects its answer."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, window: int
    ) -> None:
        self.reader, self.writer = reader, writer
        config = h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.conn.initiate_connection()
        self.events: list[Any] = []
        self.largest_data = 0

    async def flush(self) -> None:
        self.writer.write(self.conn.data_to_send())
        await self.writer.drain()

    async def read_events(self) -> list[Any]:
        data = await asyncio.wait_for(self.reader.read(1 << 20), 10)
        if not data:
            return [None]
        events = self.conn.receive_data(data)
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self.largest_data = max(self.largest_data, event.flow_controlled_length)
                # Give the window back only after reading, as a slow client would.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        await self.flush()
        return events

    def start(self, method: str, body: bytes, **headers: str) -> int:
        sid = self.conn.get_next_available_stream_id()
        head = [
            (":method", headers.pop("method", "POST")),
            (":scheme", "http"),
            (":path", SERVICE + method),
            (":authority", "localhost"),
            ("content-type", headers.pop("content_type", "application/grpc")),
            ("te", "trailers"),
        ] + [(k.replace("_", "-"), v) for k, v in headers.items()]
        self.conn.send_headers(sid, head)
        self.conn.send_data(sid, body, end_stream=True)
        return sid

    async def answer(self, sid: int) -> tuple[dict[str, str], bytes]:
        """Headers and trailers merged, and the DATA, of stream `sid`."""
        headers: dict[str, str] = {}
        data = bytearray()
        backlog = [e for e in self.events if getattr(e, "stream_id", None) == sid]
        self.events = [e for e in self.events if getattr(e, "stream_id", None) != sid]
        while True:
            batch = backlog or await self.read_events()
            for i, event in enumerate(batch):
                if event is None:
                    raise ConnectionError("the server closed the connection")
                if getattr(event, "stream_id", None) != sid:
                    self.events.append(event)
                    continue
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    headers.update(dict(event.headers))
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                elif isinstance(event, h2.events.StreamReset):
                    headers.setdefault("reset", str(event.error_code))
                if isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    self.events += batch[i + 1 :]
                    return headers, bytes(data)
            backlog = []

    async def call(self, method: str, body: bytes, **headers: str) -> tuple[dict[str, str], bytes]:
        sid = self.start(method, body, **headers)
        await self.flush()
        return await self.answer(sid)


@asynccontextmanager
async def served(
    engine: Any, window: int = 65_535, **settings: Any
) -> AsyncIterator[tuple[NativeGrpcServer, Client]]:
    config = Settings(host="127.0.0.1", grpc_port=free_port(), http_port=0, **settings)
    server = NativeGrpcServer(engine, config)
    await server.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", config.grpc_port)
    client = Client(reader, writer, window)
    await client.flush()
    try:
        yield server, client
    finally:
        writer.close()
        await server.stop(grace=0)


def message_of(data: bytes, kind: Any) -> Any:
    assert data[0] == 0 and struct.unpack(">I", data[1:5])[0] == len(data) - 5
    return kind.FromString(data[5:])


def test_answers_wait_for_the_clients_window() -> None:
    """A ~70 KB answer to a client whose stream window is 1,000 bytes arrives whole, in DATA
    frames that never exceed the window (h2 would raise on one that did)."""

    async def main() -> None:
        async with served(LoadEngine(inputs=2000), window=1000) as (_, client):
            request = grpc_message(pb.ModelMetadataRequest(name="m"))
            headers, data = await client.call("ModelMetadata", request)
            assert headers["grpc-status"] == "0", headers
            reply = message_of(data, pb.ModelMetadataResponse)
            assert len(reply.inputs) == 2000 and reply.inputs[-1].name == "input_01999"
            assert len(data) > 60_000 and client.largest_data <= 1000

    asyncio.run(main())


def test_ping_settings_and_many_calls_on_one_connection() -> None:
    async def main() -> None:
        async with served(LoadEngine()) as (_, client):
            client.conn.ping(b"12345678")
            sids = [
                client.start("ServerLive", grpc_message(pb.ServerLiveRequest())) for _ in range(50)
            ]
            await client.flush()
            for sid in sids:
                headers, data = await client.answer(sid)
                assert headers["grpc-status"] == "0"
                assert message_of(data, pb.ServerLiveResponse).live
            acks = [e for e in client.events if isinstance(e, h2.events.PingAckReceived)]
            assert acks and acks[0].ping_data == b"12345678"

    asyncio.run(main())


def test_reset_stream_cancels_the_call_and_the_connection_goes_on() -> None:
    async def main() -> None:
        engine = LoadEngine()
        async with served(engine) as (_, client):
            sid = client.start(
                "RepositoryModelLoad", grpc_message(pb.RepositoryModelLoadRequest(model_name="m"))
            )
            await client.flush()
            await asyncio.wait_for(engine.load_started.wait(), 5)
            client.conn.reset_stream(sid)
            await client.flush()
            for _ in range(100):
                if engine.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert engine.cancelled
            headers, _ = await client.call("ServerLive", grpc_message(pb.ServerLiveRequest()))
            assert headers["grpc-status"] == "0"

    asyncio.run(main())


def test_stop_lets_calls_in_progress_finish() -> None:
    """Stopping sends GOAWAY; a call already running still gets its answer (a grpcio client:
    h2's own client drops streams once it sees GOAWAY)."""
    import grpc

    from slimserve.transport.vendor import grpc_service_pb2_grpc as pb_grpc

    async def main() -> None:
        engine = LoadEngine()
        config = Settings(host="127.0.0.1", grpc_port=free_port(), http_port=0)
        server = NativeGrpcServer(engine, config)
        await server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{config.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"))
            await asyncio.wait_for(engine.load_started.wait(), 5)
            stopping = asyncio.create_task(server.stop(grace=5))
            await asyncio.sleep(0.1)
            assert not stopping.done()  # waiting for the call
            engine.release.set()
            assert await call == pb.RepositoryModelLoadResponse()
            await asyncio.wait_for(stopping, 5)
        assert not server.connections

    asyncio.run(main())


def test_gzip_messages_and_unknown_encodings() -> None:
    async def main() -> None:
        async with served(LoadEngine()) as (_, client):
            body = grpc_message(pb.ServerLiveRequest(), compress="gzip")
            headers, data = await client.call("ServerLive", body, grpc_encoding="gzip")
            assert headers["grpc-status"] == "0" and message_of(data, pb.ServerLiveResponse).live
            headers, _ = await client.call(
                "ServerLive", b"\x01\x00\x00\x00\x03abc", grpc_encoding="gzip"
            )
            assert headers["grpc-status"] == "13" and "decompress" in headers["grpc-message"]
            headers, _ = await client.call("ServerLive", body, grpc_encoding="snappy")
            assert headers["grpc-status"] == "12" and "snappy" in headers["grpc-message"]

    asyncio.run(main())


def test_message_and_metadata_limits_fail_the_call_not_the_connection() -> None:
    async def main() -> None:
        async with served(LoadEngine(), max_body_bytes=1000, max_header_bytes=1024) as (
            _,
            client,
        ):
            big = grpc_message(pb.ModelMetadataRequest(name="m" * 5000))
            headers, _ = await client.call("ModelMetadata", big)
            assert headers["grpc-status"] == "8" and "max_body_bytes" in headers["grpc-message"]
            headers, _ = await client.call(
                "ServerLive", grpc_message(pb.ServerLiveRequest()), x_pad="a" * 3000
            )
            assert headers["grpc-status"] == "8" and "max_header_bytes" in headers["grpc-message"]
            headers, _ = await client.call("ServerLive", grpc_message(pb.ServerLiveRequest()))
            assert headers["grpc-status"] == "0"

    asyncio.run(main())


def test_calls_that_are_not_grpc_are_refused_clearly() -> None:
    async def main() -> None:
        async with served(LoadEngine()) as (_, client):
            live = grpc_message(pb.ServerLiveRequest())
            headers, _ = await client.call("NoSuchMethod", live)
            assert headers["grpc-status"] == "12" and "NoSuchMethod" in headers["grpc-message"]
            headers, _ = await client.call("ServerLive", live, content_type="application/json")
            assert headers["grpc-status"] == "12" and "application/grpc" in headers["grpc-message"]
            headers, _ = await client.call("ServerLive", b"\x00\x00\x00\x00\x09abc")
            assert headers["grpc-status"] == "13" and "9 bytes" in headers["grpc-message"]
            headers, _ = await client.call("ServerLive", b"\x00\x00\x00\x00\x03\xff\xff\xff")
            assert headers["grpc-status"] == "3"  # not a valid message: INVALID_ARGUMENT
            headers, _ = await client.call("ServerLive", live)
            assert headers["grpc-status"] == "0"

    asyncio.run(main())


def test_a_connection_that_is_not_http2_is_closed() -> None:
    async def main() -> None:
        config = Settings(host="127.0.0.1", grpc_port=free_port(), http_port=0)
        server = NativeGrpcServer(LoadEngine(), config)
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", config.grpc_port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            received = await asyncio.wait_for(reader.read(), 5)  # up to EOF: the server closed
            assert b"not an HTTP/2 connection preface" in received  # GOAWAY's debug data
            writer.close()
        finally:
            await server.stop(grace=0)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"5S", 5.0), (b"250m", 0.25), (b"3M", 180.0), (b"1H", 3600.0), (b"100u", 1e-4),
     (b"", None), (b"5", None), (b"123456789S", None), (b"-1S", None), (b"5X", None)],
)  # fmt: skip
def test_grpc_timeout_header(value: bytes, seconds: float | None) -> None:
    assert _timeout_s(value) == (pytest.approx(seconds) if seconds is not None else None)


def test_grpc_message_is_percent_encoded() -> None:
    assert _percent_encode("ok: 100% ünï") == b"ok: 100%25 %C3%BCn%C3%AF"


def _raw_frame(kind: int, flags: int, sid: int, payload: bytes, length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes((kind, flags)) + struct.pack(">I", sid) + payload


@pytest.mark.parametrize(
    ("frames", "error_code"),
    [
        pytest.param(_raw_frame(0, 0, 0, b"", length=2 << 20), 6, id="frame over 1 MiB"),
        pytest.param(_raw_frame(1, 4, 1, b"\xff\xff\xff\xff"), 9, id="HPACK garbage"),
        pytest.param(_raw_frame(1, 4, 2, b"\x82"), 1, id="HEADERS on an even stream"),
        pytest.param(_raw_frame(8, 0, 0, b"\x00\x00\x00\x00"), 1, id="WINDOW_UPDATE of 0"),
        pytest.param(_raw_frame(9, 4, 1, b"\x82"), 1, id="CONTINUATION alone"),
        pytest.param(_raw_frame(6, 0, 0, b"short"), 6, id="PING of 5 bytes"),
    ],
)
def test_protocol_violations_close_the_connection_with_goaway(
    frames: bytes, error_code: int
) -> None:
    """A connection error answers GOAWAY with RFC 9113's code, then closes; the server goes
    on serving other connections."""

    async def main() -> None:
        async with served(LoadEngine()) as (server, client):
            port = server.settings.grpc_port
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _raw_frame(4, 0, 0, b"") + frames)
            received = await asyncio.wait_for(reader.read(), 5)  # up to EOF
            writer.close()
            goaway = received.find(b"\x07\x00\x00\x00\x00\x00")  # type GOAWAY, flags, stream 0
            assert goaway >= 3, received
            code = struct.unpack(">I", received[goaway + 10 : goaway + 14])[0]
            assert code == error_code
            headers, _ = await client.call("ServerLive", grpc_message(pb.ServerLiveRequest()))
            assert headers["grpc-status"] == "0"

    asyncio.run(main())


def test_frame_reader_joins_frames_split_anywhere():
    """Frames cut at every possible point between reads come out whole and in order."""
    from slimserve.transport.h2wire import FrameReader, FrameTooLarge, frame

    wire = (
        frame(1, 4, 1, b"\x82\x84")
        + frame(0, 1, 1, bytes(range(200)))
        + frame(6, 0, 0, b"8bytes!!")
    )
    expected = [(1, 4, 1, b"\x82\x84"), (0, 1, 1, bytes(range(200))), (6, 0, 0, b"8bytes!!")]
    for cut in range(len(wire) + 1):
        for cut2 in (cut, min(len(wire), cut + 7)):
            reader = FrameReader()
            got = [
                (kind, flags, sid, bytes(payload))
                for part in (wire[:cut], wire[cut:cut2], wire[cut2:])
                for kind, flags, sid, payload in reader.feed(part)
            ]
            assert got == expected, (cut, cut2)
    with pytest.raises(FrameTooLarge):
        list(FrameReader(max_frame=100).feed(frame(0, 0, 1, bytes(101))))
