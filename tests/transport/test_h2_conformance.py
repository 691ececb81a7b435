"""HTTP/2 rules a gRPC server must keep (RFC 9113), checked on the native gRPC server
(transport/h2conn.py under transport/grpc_h2.py) with raw frames, each answer parsed by
hyperframe and hpack rather than by slimserve's own code.

Checklist (section of RFC 9113: the test that checks it):
- 3.4 connection preface: the server's first frame is SETTINGS; a client preface that is not
  HTTP/2 gets GOAWAY PROTOCOL_ERROR  -> test_preface_*
- 6.5 SETTINGS: every one acknowledged, unknown settings ignored; a lower HEADER_TABLE_SIZE
  answered by a table size update (RFC 7541 4.2, found by the fuzzer); ACK with a payload,
  a length not a multiple of 6 (FRAME_SIZE_ERROR), SETTINGS on a stream, ENABLE_PUSH > 1,
  MAX_FRAME_SIZE out of range (PROTOCOL_ERROR), INITIAL_WINDOW_SIZE over 2^31-1
  (FLOW_CONTROL_ERROR)  -> test_settings_*
- 6.7 PING: answered with ACK and the same 8 bytes; an ACK is not answered; on a stream
  (PROTOCOL_ERROR), not 8 bytes (FRAME_SIZE_ERROR)  -> test_ping_*
- 5.1 stream ids and states: client streams odd and increasing; HEADERS on an even or a
  closed id, DATA / RST_STREAM / WINDOW_UPDATE on an idle stream, DATA on stream 0
  (connection errors); DATA after the client's END_STREAM (RST_STREAM STREAM_CLOSED);
  frames on closed streams ignored; more than MAX_CONCURRENT_STREAMS (REFUSED_STREAM)
  -> test_stream_*
- 4.3, 6.10 header blocks: HEADERS + CONTINUATION joined; any other frame in between, a
  CONTINUATION without HEADERS or on another stream (PROTOCOL_ERROR); HPACK garbage
  (COMPRESSION_ERROR); a block over 16x max_header_bytes (ENHANCE_YOUR_CALM); padding and
  the priority field removed  -> test_header_block_*
- 8.2, 8.3 header validity: uppercase names, pseudo-header after a regular field, unknown or
  repeated pseudo-header, missing :path, connection-specific fields, te other than
  "trailers", CR/LF/NUL in a value, content-length not matching the body: the stream is
  reset (PROTOCOL_ERROR), the connection goes on  -> test_malformed_request_*
- 8.1 trailers: a request's trailers end it; trailers with a pseudo-header or without
  END_STREAM (PROTOCOL_ERROR); the answer is HEADERS (:status 200, application/grpc), DATA,
  and trailers with grpc-status and END_STREAM, or trailers-only for an error
  -> test_trailers_*, test_answer_shape
- 6.9 flow control: DATA beyond a stream's window (RST_STREAM FLOW_CONTROL_ERROR) or the
  connection's (GOAWAY FLOW_CONTROL_ERROR); credit given back so a client that respects the
  window sends any size; answers wait for the client's window, and a larger
  INITIAL_WINDOW_SIZE releases them (6.9.2); WINDOW_UPDATE of 0 (PROTOCOL_ERROR; a stream
  error on a stream), over 2^31-1 (FLOW_CONTROL_ERROR), not 4 bytes (FRAME_SIZE_ERROR)
  -> test_flow_*
- 6.8 GOAWAY: sent with NO_ERROR and the last stream id on shutdown, calls in flight
  finish (tests/transport/test_grpc_h2.py); GOAWAY from the client closes the connection
  once its calls are done; GOAWAY on a stream (PROTOCOL_ERROR)  -> test_goaway_*
- 6.4 RST_STREAM: cancels the call (test_grpc_h2.py); not 4 bytes (FRAME_SIZE_ERROR);
  resets beyond the budget, the rapid-reset attack (CVE-2023-44487): GOAWAY
  ENHANCE_YOUR_CALM  -> test_reset_*
- 4.2, 5.5, 6.3, 6.6 frames: over our SETTINGS_MAX_FRAME_SIZE (FRAME_SIZE_ERROR); unknown
  types ignored; PRIORITY of other than 5 bytes (FRAME_SIZE_ERROR); PUSH_PROMISE from a
  client (PROTOCOL_ERROR)  -> test_frame_*
- 10.5 denial of service: a client that floods requests and never reads does not grow the
  server's output buffer without bound; a request whose body does not come within the body
  deadline is reset (CANCEL)  -> test_flood_*, test_slow_body_*
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import hpack
import pytest
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from slimserve.config import Settings
from slimserve.transport.grpc_h2 import NativeGrpcServer
from slimserve.transport.h2conn import H2Limits
from slimserve.transport.vendor import grpc_service_pb2 as pb
from tests.grpc_standin import StandInEngine, free_port
from tests.h2_client import (
    CANCEL,
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    FRAME_SIZE_ERROR,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    STREAM_CLOSED,
    RawH2,
    ThreadServer,
    grpc_body,
    raw_frame,
    request_fields,
    serves,
    thread_server,
)

pytestmark = pytest.mark.timeout(60)
DATA, HEADERS, PRIORITY, RST, SETTINGS, PUSH, PING, GOAWAY, WINDOW, CONT = range(10)


class HoldEngine(StandInEngine):
    """Answers health; a repository load waits until cancelled (a call that stays open)."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def load_model(self, name: str, identity: Any) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def start(**limits: Any) -> Any:
    port = free_port()
    settings = Settings(host="127.0.0.1", grpc_port=port, http_port=0)
    h2 = dataclasses.replace(H2Limits.from_settings(settings), **limits)
    engine = HoldEngine()
    return thread_server(lambda: NativeGrpcServer(engine, settings, h2=h2), port), engine


@pytest.fixture(scope="module")
def srv() -> Iterator[ThreadServer]:
    server, _ = start()
    with server as ts:
        yield ts
        assert not ts.errors, ts.errors  # nothing the server's loop did not expect


@pytest.fixture
def conn(srv: ThreadServer) -> Iterator[RawH2]:
    c = RawH2(srv.port)
    c.handshake()
    yield c
    c.close()


def connection_error(srv: ThreadServer, data: bytes, code: int) -> None:
    """`data` after a good handshake closes the connection with GOAWAY `code`; the server
    keeps serving others."""
    c = RawH2(srv.port)
    c.handshake()
    c.send(data)
    assert c.goaway_code() == code
    assert c.closed
    c.close()
    assert serves(srv.port)


def stream_error(c: RawH2, data: bytes, sid: int, code: int) -> None:
    """`data` resets stream `sid` with `code`; the same connection still answers a call."""
    c.send(data)
    assert c.reset_code(sid) == code
    sid2, req = c.request(sid=sid + 2)
    c.send(req)
    assert c.answer(sid2).get("grpc-status") == "0"


def open_call(c: RawH2, sid: int) -> None:
    """A call that stays open on the server (a repository load that never finishes)."""
    message = pb.RepositoryModelLoadRequest(model_name="m")
    _, data = c.request(message, method="RepositoryModelLoad", sid=sid)
    c.send(data)


# -- 3.4 preface ------------------------------------------------------------------------


def test_preface_server_sends_settings_first(srv: ThreadServer) -> None:
    c = RawH2(srv.port)
    c.send(PREFACE)
    c.read_until(lambda f: True)
    assert isinstance(c.frames[0], SettingsFrame) and "ACK" not in c.frames[0].flags
    c.close()


def test_preface_that_is_not_http2(srv: ThreadServer) -> None:
    c = RawH2(srv.port)
    c.send(b"PRI * HTTP/1.1\r\n\r\n" + b"x" * 20)
    assert c.goaway_code() == PROTOCOL_ERROR
    c.close()


# -- 6.5 SETTINGS -----------------------------------------------------------------------


def test_settings_acknowledged_and_unknown_ignored(conn: RawH2) -> None:
    conn.send(SettingsFrame(0, {0x4242: 7, 0x1: 0}).serialize())
    ack = conn.read_until(lambda f: isinstance(f, SettingsFrame) and "ACK" in f.flags)
    assert ack is not None and not ack.settings


def test_settings_header_table_size_is_honoured(conn: RawH2) -> None:
    """RFC 7541 4.2: after the client lowers SETTINGS_HEADER_TABLE_SIZE, the server's next
    header block starts with a dynamic table size update (hpack's decoder insists)."""
    conn.send(SettingsFrame(0, {SettingsFrame.HEADER_TABLE_SIZE: 0}).serialize())
    conn.read_until(lambda f: isinstance(f, SettingsFrame) and "ACK" in f.flags)
    conn.decoder.max_allowed_table_size = 0
    sid, data = conn.request()
    conn.send(data)
    assert conn.answer(sid)["grpc-status"] == "0"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(raw_frame(SETTINGS, 1, 0, b"\0" * 6), FRAME_SIZE_ERROR, id="ACK with payload"),
        pytest.param(raw_frame(SETTINGS, 0, 0, b"\0" * 5), FRAME_SIZE_ERROR, id="length 5"),
        pytest.param(raw_frame(SETTINGS, 0, 1, b""), PROTOCOL_ERROR, id="on a stream"),
        pytest.param(SettingsFrame(0, {2: 2}).serialize(), PROTOCOL_ERROR, id="ENABLE_PUSH 2"),
        pytest.param(SettingsFrame(0, {5: 100}).serialize(), PROTOCOL_ERROR, id="MAX_FRAME 100"),
        pytest.param(
            SettingsFrame(0, {4: 2**31}).serialize(), FLOW_CONTROL_ERROR, id="window 2^31"
        ),
    ],
)
def test_settings_errors(srv: ThreadServer, data: bytes, code: int) -> None:
    connection_error(srv, data, code)


# -- 6.7 PING ---------------------------------------------------------------------------


def test_ping_answered_with_the_same_bytes_and_acks_ignored(conn: RawH2) -> None:
    conn.send(PingFrame(0, b"ACKme!!!", flags=["ACK"]).serialize())
    conn.send(PingFrame(0, b"12345678").serialize())
    got = conn.read_until(lambda f: isinstance(f, PingFrame))
    assert got is not None and "ACK" in got.flags and got.opaque_data == b"12345678"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(raw_frame(PING, 0, 1, b"8 bytes!"), PROTOCOL_ERROR, id="on a stream"),
        pytest.param(raw_frame(PING, 0, 0, b"9 bytes!!"), FRAME_SIZE_ERROR, id="9 bytes"),
    ],
)
def test_ping_errors(srv: ThreadServer, data: bytes, code: int) -> None:
    connection_error(srv, data, code)


# -- 5.1 streams ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "code"),
    [
        pytest.param(lambda c: c.request(sid=2)[1], PROTOCOL_ERROR, id="HEADERS on even id"),
        pytest.param(
            lambda c: c.request(sid=5)[1] + c.request(sid=3)[1], STREAM_CLOSED, id="id going down"
        ),
        pytest.param(
            lambda c: DataFrame(1, b"x").serialize(), PROTOCOL_ERROR, id="DATA on idle stream"
        ),
        pytest.param(lambda c: raw_frame(DATA, 0, 0, b"x"), PROTOCOL_ERROR, id="DATA on stream 0"),
        pytest.param(
            lambda c: RstStreamFrame(7).serialize(), PROTOCOL_ERROR, id="RST_STREAM on idle"
        ),
        pytest.param(
            lambda c: WindowUpdateFrame(9, 10).serialize(), PROTOCOL_ERROR, id="WINDOW on idle"
        ),
    ],
)
def test_stream_id_and_state_errors(srv: ThreadServer, make: Any, code: int) -> None:
    c = RawH2(srv.port)
    c.handshake()
    c.send(make(c))
    assert c.goaway_code() == code
    c.close()
    assert serves(srv.port)


def test_stream_data_after_end_stream_is_stream_closed(conn: RawH2) -> None:
    open_call(conn, 1)  # the server holds the call: the stream is half-closed (remote)
    stream_error(conn, DataFrame(1, b"late").serialize(), 1, STREAM_CLOSED)


def test_stream_frames_on_closed_streams_are_ignored(conn: RawH2) -> None:
    sid, data = conn.request()
    conn.send(data)
    assert conn.answer(sid)["grpc-status"] == "0"
    conn.send(WindowUpdateFrame(sid, 100).serialize() + RstStreamFrame(sid).serialize())
    assert conn.ping_answered() and not conn.closed


def test_stream_over_max_concurrent_streams_is_refused() -> None:
    server, _ = start(max_streams=2)
    with server as ts:
        c = RawH2(ts.port)
        c.handshake()
        settings = next(f for f in c.frames if isinstance(f, SettingsFrame))
        assert settings.settings[SettingsFrame.MAX_CONCURRENT_STREAMS] == 2
        open_call(c, 1)
        open_call(c, 3)
        open_call(c, 5)
        assert c.reset_code(5) == REFUSED_STREAM
        c.send(RstStreamFrame(1, error_code=8).serialize())  # one slot free again
        sid, data = c.request(sid=7)
        c.send(data)
        assert c.answer(sid)["grpc-status"] == "0"
        c.close()
        assert not ts.errors


# -- 4.3, 6.10 header blocks ------------------------------------------------------------


def test_header_block_split_over_continuation_frames(conn: RawH2) -> None:
    block = conn.encoder.encode(request_fields(x_pad="p" * 300))
    a, b = block[:100], block[100:200]
    rest = block[200:]
    conn.send(
        HeadersFrame(1, a).serialize()
        + ContinuationFrame(1, b).serialize()
        + ContinuationFrame(1, rest, flags=["END_HEADERS"]).serialize()
        + DataFrame(1, grpc_body(pb.ServerLiveRequest()), flags=["END_STREAM"]).serialize()
    )
    assert conn.answer(1)["grpc-status"] == "0"


def test_header_block_with_padding_and_priority(conn: RawH2) -> None:
    block = conn.encoder.encode(request_fields())
    frame = HeadersFrame(1, block, flags=["END_HEADERS", "PADDED", "PRIORITY"], pad_length=9)
    frame.depends_on, frame.stream_weight = 0, 15
    body = DataFrame(1, grpc_body(pb.ServerLiveRequest()), flags=["END_STREAM", "PADDED"])
    body.pad_length = 4
    conn.send(frame.serialize() + body.serialize())
    assert conn.answer(1)["grpc-status"] == "0"


@pytest.mark.parametrize(
    ("make", "code"),
    [
        pytest.param(
            lambda enc: (
                HeadersFrame(1, enc.encode(request_fields())).serialize()
                + PingFrame(0, b"12345678").serialize()
            ),
            PROTOCOL_ERROR,
            id="PING inside a header block",
        ),
        pytest.param(
            lambda enc: ContinuationFrame(1, b"\x82", flags=["END_HEADERS"]).serialize(),
            PROTOCOL_ERROR,
            id="CONTINUATION alone",
        ),
        pytest.param(
            lambda enc: (
                HeadersFrame(1, enc.encode(request_fields())).serialize()
                + ContinuationFrame(3, b"", flags=["END_HEADERS"]).serialize()
            ),
            PROTOCOL_ERROR,
            id="CONTINUATION on another stream",
        ),
        pytest.param(
            lambda enc: raw_frame(HEADERS, 4, 1, b"\xff\xff\xff\xff"),
            COMPRESSION_ERROR,
            id="HPACK garbage",
        ),
        pytest.param(
            lambda enc: (
                HeadersFrame(1, b"\x00" * 4000).serialize()
                + b"".join(ContinuationFrame(1, b"\x00" * 16000).serialize() for _ in range(40))
            ),
            ENHANCE_YOUR_CALM,
            id="endless CONTINUATION",
        ),
    ],
)
def test_header_block_errors(srv: ThreadServer, make: Any, code: int) -> None:
    connection_error(srv, make(hpack.Encoder()), code)


# -- 8.2, 8.3 header validity -----------------------------------------------------------

_GOOD = request_fields()


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param([*_GOOD, ("X-Upper", "1")], id="uppercase name"),
        pytest.param([*_GOOD, (":method", "POST")], id="pseudo after regular"),
        pytest.param([(":status", "200"), *_GOOD], id="response pseudo in a request"),
        pytest.param([(":path", "/x"), *_GOOD], id="repeated :path"),
        pytest.param([f for f in _GOOD if f[0] != ":path"], id="no :path"),
        pytest.param([*_GOOD, ("connection", "keep-alive")], id="connection field"),
        pytest.param([*_GOOD, ("transfer-encoding", "chunked")], id="transfer-encoding"),
        pytest.param([*[f for f in _GOOD if f[0] != "te"], ("te", "gzip")], id="te gzip"),
        pytest.param([*_GOOD, ("x-evil", "a\r\nb: c")], id="CRLF in a value"),
        pytest.param([*_GOOD, ("x-nul", "a\x00b")], id="NUL in a value"),
        pytest.param([*_GOOD, ("x-space", " padded")], id="leading space"),
        pytest.param([*_GOOD, ("content-length", "1000")], id="content-length mismatch"),
    ],
)
def test_malformed_request_resets_the_stream(conn: RawH2, fields: list[tuple[str, str]]) -> None:
    body = DataFrame(1, grpc_body(pb.ServerLiveRequest()), flags=["END_STREAM"]).serialize()
    head = HeadersFrame(1, conn.encoder.encode(fields), flags=["END_HEADERS"]).serialize()
    stream_error(conn, head + body, 1, PROTOCOL_ERROR)


# -- 8.1 trailers and the answer --------------------------------------------------------


def test_trailers_end_the_request(conn: RawH2) -> None:
    head = conn.headers(1, request_fields(), end_stream=False)
    data = DataFrame(1, grpc_body(pb.ServerLiveRequest())).serialize()
    trailers = conn.headers(1, [("x-checksum", "abc")], end_stream=True)
    conn.send(head + data + trailers)
    assert conn.answer(1)["grpc-status"] == "0"


@pytest.mark.parametrize(
    ("fields", "end"),
    [
        pytest.param([(":path", "/x")], True, id="pseudo-header in trailers"),
        pytest.param([("x-checksum", "abc")], False, id="trailers without END_STREAM"),
    ],
)
def test_trailers_errors(conn: RawH2, fields: list[tuple[str, str]], end: bool) -> None:
    head = conn.headers(1, request_fields(), end_stream=False)
    data = DataFrame(1, grpc_body(pb.ServerLiveRequest())).serialize()
    stream_error(conn, head + data + conn.headers(1, fields, end_stream=end), 1, PROTOCOL_ERROR)


def test_answer_shape(conn: RawH2) -> None:
    sid, data = conn.request()
    conn.send(data)
    conn.answer(sid)
    frames = [f for f in conn.frames if f.stream_id == sid]
    assert [type(f) for f in frames] == [HeadersFrame, DataFrame, HeadersFrame]
    head, body, trailers = frames
    assert head.fields == {b":status": b"200", b"content-type": b"application/grpc"}
    assert "END_STREAM" not in head.flags and "END_STREAM" not in body.flags
    assert body.data[5:] == pb.ServerLiveResponse(live=True).SerializeToString()
    assert trailers.fields[b"grpc-status"] == b"0" and "END_STREAM" in trailers.flags
    sid, data = conn.request(method="NoSuchMethod")
    conn.send(data)
    assert conn.answer(sid)["grpc-status"] == "12"
    only = [f for f in conn.frames if f.stream_id == sid]
    assert len(only) == 1 and "END_STREAM" in only[0].flags  # trailers-only
    assert only[0].fields[b":status"] == b"200"


# -- 6.9 flow control -------------------------------------------------------------------


def test_flow_stream_window_enforced() -> None:
    server, _ = start(stream_window=1000)
    with server as ts:
        c = RawH2(ts.port)
        c.handshake()  # our SETTINGS acknowledged: the client counts with a 1,000-byte window
        head = c.headers(1, request_fields(), end_stream=False)
        stream_error(c, head + DataFrame(1, b"\0" * 1500).serialize(), 1, FLOW_CONTROL_ERROR)
        c.close()
        assert not ts.errors


def test_flow_connection_window_enforced() -> None:
    server, _ = start(conn_window=65_535)
    with server as ts:
        block = hpack.Encoder().encode(request_fields())  # the connection's first block
        head = HeadersFrame(1, block, flags=["END_HEADERS"]).serialize()
        connection_error(ts, head + DataFrame(1, b"\0" * 70_000).serialize(), FLOW_CONTROL_ERROR)


def test_flow_credit_given_back_to_a_client_that_waits() -> None:
    """A 20,000-byte message through a 1,000-byte stream window: the client sends what the
    window allows, waits for WINDOW_UPDATE, and the call completes."""
    server, _ = start(stream_window=1000)
    with server as ts:
        c = RawH2(ts.port)
        c.handshake()
        message = pb.ModelMetadataRequest(name="m" * 20_000)
        body, window, sent = grpc_body(message), 1000, 0
        c.send(c.headers(1, request_fields("ModelMetadata"), end_stream=False))
        while sent < len(body):
            n = min(window, len(body) - sent)
            flags = ["END_STREAM"] if sent + n == len(body) else []
            c.send(DataFrame(1, body[sent : sent + n], flags=flags).serialize())
            sent, window = sent + n, window - n
            if window == 0 and sent < len(body):
                got = c.read_until(lambda f: isinstance(f, WindowUpdateFrame) and f.stream_id == 1)
                assert got is not None
                window += got.window_increment
        # The stand-in has no model metadata: an error answer, but a whole one.
        assert "grpc-status" in c.answer(1)
        c.close()


def test_flow_answer_waits_for_the_clients_window(srv: ThreadServer) -> None:
    c = RawH2(srv.port)
    c.handshake({SettingsFrame.INITIAL_WINDOW_SIZE: 0})
    sid, data = c.request()
    c.send(data)
    c.read_until(lambda f: isinstance(f, HeadersFrame) and f.stream_id == sid)
    c.read_until(lambda f: False, timeout=0.3)
    assert not [f for f in c.frames if isinstance(f, DataFrame)]  # nothing beyond a 0 window
    c.send(SettingsFrame(0, {SettingsFrame.INITIAL_WINDOW_SIZE: 65_535}).serialize())
    assert c.answer(sid)["grpc-status"] == "0"
    c.close()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(raw_frame(WINDOW, 0, 0, b"\0\0\0\0"), PROTOCOL_ERROR, id="0 on connection"),
        pytest.param(
            WindowUpdateFrame(0, 2**31 - 1).serialize(), FLOW_CONTROL_ERROR, id="overflow"
        ),
        pytest.param(raw_frame(WINDOW, 0, 0, b"\0\0\1"), FRAME_SIZE_ERROR, id="3 bytes"),
    ],
)
def test_flow_window_update_errors(srv: ThreadServer, data: bytes, code: int) -> None:
    connection_error(srv, data, code)


def test_flow_window_update_stream_errors(conn: RawH2) -> None:
    open_call(conn, 1)
    stream_error(conn, raw_frame(WINDOW, 0, 1, b"\0\0\0\0"), 1, PROTOCOL_ERROR)
    open_call(conn, 5)
    stream_error(conn, WindowUpdateFrame(5, 2**31 - 1).serialize(), 5, FLOW_CONTROL_ERROR)


# -- 6.8 GOAWAY, 6.4 RST_STREAM ---------------------------------------------------------


def test_goaway_from_the_client_closes_once_calls_are_done(conn: RawH2) -> None:
    sid, data = conn.request()
    conn.send(data + raw_frame(GOAWAY, 0, 0, struct.pack(">II", sid, NO_ERROR)))
    assert conn.answer(sid)["grpc-status"] == "0"
    conn.read_until(lambda f: False)
    assert conn.closed


def test_goaway_on_a_stream(srv: ThreadServer) -> None:
    connection_error(srv, raw_frame(GOAWAY, 0, 1, b"\0" * 8), PROTOCOL_ERROR)


def test_reset_of_other_than_4_bytes(srv: ThreadServer) -> None:
    c = RawH2(srv.port)
    c.handshake()
    open_call(c, 1)
    c.send(raw_frame(RST, 0, 1, b"\0\0\0\0\0"))
    assert c.goaway_code() == FRAME_SIZE_ERROR
    c.close()


def test_reset_flood_closes_the_connection_with_enhance_your_calm() -> None:
    """Rapid reset: streams opened and reset at once. Within the budget the connection
    serves on; past it, GOAWAY ENHANCE_YOUR_CALM, and other connections are served."""
    server, _ = start(reset_burst=50, reset_rate=1.0)
    with server as ts:
        c = RawH2(ts.port)
        c.handshake()
        wave = b""
        for sid in range(1, 80, 2):  # 40 resets: within the budget
            wave += c.request(
                pb.RepositoryModelLoadRequest(model_name="m"), "RepositoryModelLoad", sid=sid
            )[1]
            wave += RstStreamFrame(sid, error_code=8).serialize()
        c.send(wave)
        assert c.ping_answered() and not c.closed
        wave = b""
        for sid in range(81, 400, 2):
            wave += c.request(sid=sid)[1] + RstStreamFrame(sid, error_code=8).serialize()
        c.send(wave)
        assert c.goaway_code() == ENHANCE_YOUR_CALM
        c.close()
        assert serves(ts.port)
        assert not ts.errors


# -- frames -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(
            struct.pack(">I", (1 << 20) + 1)[1:] + b"\0\0\0\0\0\1", FRAME_SIZE_ERROR, id="too big"
        ),
        pytest.param(raw_frame(PUSH, 4, 1, b"\0\0\0\2\x82"), PROTOCOL_ERROR, id="PUSH_PROMISE"),
        pytest.param(raw_frame(PRIORITY, 0, 0, b"\0" * 5), PROTOCOL_ERROR, id="PRIORITY on 0"),
    ],
)
def test_frame_errors(srv: ThreadServer, data: bytes, code: int) -> None:
    connection_error(srv, data, code)


def test_frame_unknown_types_and_priority_are_ignored(conn: RawH2) -> None:
    conn.send(raw_frame(0x42, 0xFF, 0, b"whatever") + raw_frame(PRIORITY, 0, 11, b"\0\0\0\0\7"))
    sid, data = conn.request(sid=13)
    conn.send(data)
    assert conn.answer(sid)["grpc-status"] == "0"


def test_frame_priority_of_other_than_5_bytes(conn: RawH2) -> None:
    open_call(conn, 1)
    stream_error(conn, raw_frame(PRIORITY, 0, 1, b"\0" * 4), 1, FRAME_SIZE_ERROR)


# -- 10.5 floods ------------------------------------------------------------------------


def test_flood_from_a_client_that_never_reads(srv: ThreadServer) -> None:
    """Requests of ~40 bytes, each answered with ~3 KiB (an unknown method's name, echoed in
    grpc-message; HPACK lets the client repeat the name in one byte), from a client that
    never reads: the server stops reading once its output is past the transport's high-water
    mark, with the rest of what it received kept unread, instead of buffering answers
    without end."""
    c = RawH2(srv.port)
    c.handshake()
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    name = "x" * 3000
    wave = b"".join(c.request(method=name, sid=sid)[1] for sid in range(1, 8001, 2))
    c.sock.setblocking(False)
    sent, deadline = 0, time.monotonic() + 2
    while time.monotonic() < deadline and sent < len(wave):
        try:
            sent += c.sock.send(wave[sent:])
        except BlockingIOError:
            time.sleep(0.01)

    def state() -> tuple[bool, int]:
        connection = max(
            (x for x in srv.server.connections if x.transport is not None),
            key=lambda x: x.transport.get_write_buffer_size(),
        )
        return connection.transport.is_reading(), connection.transport.get_write_buffer_size()

    reading, buffered = srv.call_soon(state)
    assert not reading and buffered < 1 << 20, (reading, buffered, sent)
    c.close()
    assert serves(srv.port)


def test_slow_body_is_reset_after_the_body_deadline() -> None:
    server, _ = start(body_s=0.5)
    with server as ts:
        c = RawH2(ts.port)
        c.handshake()
        c.send(c.headers(1, request_fields(), end_stream=False) + DataFrame(1, b"\0\0").serialize())
        assert c.reset_code(1, timeout=5) == CANCEL
        sid, data = c.request(sid=3)
        c.send(data)
        assert c.answer(sid)["grpc-status"] == "0"
        c.close()
        assert not ts.errors
