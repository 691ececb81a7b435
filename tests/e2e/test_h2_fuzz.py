"""Frame-level fuzzing of the native gRPC server: a real `slimserve serve` process (its
default gRPC server, transport/grpc_h2.py on transport/h2conn.py) gets frame sequences that
hypothesis generates three ways:

- a valid client (the python-hyper `h2` library) doing any sequence of calls, body pieces,
  trailers, resets, pings, settings and window updates; everything the server sends back is
  fed to h2, which raises on any protocol violation; every call the client finished gets an
  answer or a reset, and the connection still serves a call at the end;
- well-framed frames of any type, flags, stream id and payload (structured payloads built
  with `hyperframe` and `hpack`, or random bytes); the server must close the connection or
  still answer a PING on it;
- raw bytes, after the connection preface or instead of it.

After each example a new connection gets a call answered (no hang, no crash); at the end the
process is alive and its log holds no traceback. SLIMSERVE_FUZZ_EXAMPLES sets the examples
per test (benchmarks/fuzz.py-style long runs: raise it).
"""

from __future__ import annotations

import copy
import os
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import hpack
import pytest
from hyperframe.frame import SettingsFrame
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from slimserve.transport.vendor import grpc_service_pb2 as pb
from tests.e2e.conftest import Repo, ServerProcess, start_server, stop_server
from tests.h2_client import PREFACE, RawH2, grpc_body, raw_frame, request_fields, serves

pytestmark = pytest.mark.timeout(240)
EXAMPLES = int(os.environ.get("SLIMSERVE_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
METHODS = ["ServerLive", "ServerReady", "ModelMetadata", "ModelInfer", "RepositoryIndex", "Nope"]


@pytest.fixture(scope="module")
def served(model_repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("h2fuzz") / "models"
    shutil.copytree(model_repo.root, root)
    server = start_server(root, root.parent / "server.log")
    yield server
    alive = server.alive()
    stop_server(server)
    log = server.log()
    assert alive, f"the server died under fuzzing:\n{log}"
    for bad in ("Traceback", "Fatal error", "Exception in callback", "never retrieved"):
        assert bad not in log, log


# -- a valid client doing anything ------------------------------------------------------

SETTING_CODES = [
    SettingsFrame.INITIAL_WINDOW_SIZE,
    SettingsFrame.MAX_FRAME_SIZE,
    SettingsFrame.HEADER_TABLE_SIZE,
    SettingsFrame.ENABLE_PUSH,
]
SETTINGS = st.dictionaries(st.sampled_from(SETTING_CODES), st.integers(1, 2**24 - 1), max_size=2)
actions = st.lists(
    st.one_of(
        st.tuples(st.just("call"), st.sampled_from(METHODS), st.booleans()),
        st.tuples(st.just("data"), st.binary(max_size=300), st.booleans()),
        st.tuples(st.just("trailers"), st.just(None), st.just(None)),
        st.tuples(st.just("reset"), st.integers(0, 13), st.just(None)),
        st.tuples(st.just("ping"), st.binary(min_size=8, max_size=8), st.just(None)),
        st.tuples(st.just("settings"), SETTINGS, st.just(None)),
        st.tuples(st.just("window"), st.integers(1, 2**20), st.booleans()),
    ),
    max_size=12,
)


def _valid_settings(chosen: dict[int, int]) -> dict[int, int]:
    out = dict(chosen)
    if SettingsFrame.MAX_FRAME_SIZE in out:
        out[SettingsFrame.MAX_FRAME_SIZE] = max(16_384, out[SettingsFrame.MAX_FRAME_SIZE])
    if SettingsFrame.ENABLE_PUSH in out:
        out[SettingsFrame.ENABLE_PUSH] = out[SettingsFrame.ENABLE_PUSH] % 2
    return out


def _apply(conn: h2.connection.H2Connection, action: tuple[str, Any, Any], sid: int) -> int:
    """One action on the h2 client; returns the stream it opened (or `sid`)."""
    kind, a, b = action
    if kind == "call":
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, request_fields(a), end_stream=False)
        if b:
            conn.send_data(sid, grpc_body(pb.ServerLiveRequest()), end_stream=True)
    elif kind == "data" and sid:
        conn.send_data(sid, a[: conn.local_flow_control_window(sid)], end_stream=b)
    elif kind == "trailers" and sid:
        conn.send_headers(sid, [("x-trailer", "1")], end_stream=True)
    elif kind == "reset" and sid:
        conn.reset_stream(sid, error_code=a)
    elif kind == "ping":
        conn.ping(a)
    elif kind == "settings":
        conn.update_settings(_valid_settings(a))
    elif kind == "window":
        conn.increment_flow_control_window(a, stream_id=sid if b and sid else None)
    return sid


def _exchange(
    conn: h2.connection.H2Connection, raw: RawH2, done: Callable[[list[Any]], bool]
) -> list[Any]:
    """Send what h2 has queued and feed h2 what comes back (h2 raises on any protocol
    violation), until `done(events)`, the server closes, or 5 s."""
    raw.send(conn.data_to_send())
    events: list[Any] = []
    deadline = time.monotonic() + 5
    raw.sock.settimeout(0.05)
    while not done(events) and not raw.closed and time.monotonic() < deadline:
        try:
            data = raw.sock.recv(1 << 16)
        except TimeoutError:
            continue
        except ConnectionError:
            data = b""
        if not data:
            raw.closed = True
        for event in conn.receive_data(data):
            events.append(event)
            if isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        raw.send(conn.data_to_send())
    return events


def _finished(events: list[Any]) -> set[int]:
    ends = (h2.events.StreamEnded, h2.events.StreamReset)
    return {e.stream_id for e in events if isinstance(e, ends)}


def _terminated(events: list[Any]) -> bool:
    return any(isinstance(e, h2.events.ConnectionTerminated) for e in events)


@FUZZ
@given(steps=actions)
def test_a_valid_client_doing_anything(served: ServerProcess, steps: list[Any]) -> None:
    note(f"steps: {steps!r}")
    raw = RawH2(served.grpc_port)
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    conn.initiate_connection()
    reset: set[int] = set()
    sid = 0
    try:
        for step in steps:
            # h2 may change a stream's state before it refuses a move: undo it whole.
            before = copy.deepcopy(conn)
            try:
                sid = _apply(conn, step, sid)
            except (h2.exceptions.ProtocolError, h2.exceptions.FlowControlError, ValueError):
                conn = before  # h2 itself refuses to send that: not a valid client's move
                continue
            if step[0] == "reset" and sid:
                reset.add(sid)
        # Streams the client finished (not reset): each must get an answer or a reset.
        ended = {
            i
            for i, stream in conn.streams.items()
            if stream.state_machine.state.name in ("HALF_CLOSED_LOCAL", "CLOSED") and i not in reset
        }
        events = _exchange(conn, raw, lambda ev: ended <= _finished(ev) or _terminated(ev))
        assert _terminated(events) or raw.closed or ended <= _finished(events), (ended, events)
        if not _terminated(events) and not raw.closed:  # the same connection still serves
            last = conn.get_next_available_stream_id()
            conn.send_headers(last, request_fields("ServerLive"), end_stream=False)
            conn.send_data(last, grpc_body(pb.ServerLiveRequest()), end_stream=True)
            answered = _exchange(conn, raw, lambda ev: last in _finished(ev))
            trailers = [e for e in answered if isinstance(e, h2.events.TrailersReceived)]
            assert trailers and dict(trailers[0].headers)["grpc-status"] == "0", answered
    finally:
        raw.close()
    assert serves(served.grpc_port)


# -- any well-framed frames -------------------------------------------------------------

_ENCODER_FIELDS = st.lists(
    st.one_of(
        st.sampled_from(request_fields()),
        st.tuples(st.text(max_size=12), st.text(max_size=20)),
    ),
    max_size=8,
)


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x0A, 0x42]))
    flags = draw(st.sampled_from([0, 1, 4, 5, 8, 0x20, 0x25, 0xFF]))
    sid = draw(st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]))
    shape = draw(st.sampled_from(["structured", "random"]))
    if shape == "random":
        payload = draw(st.binary(max_size=64))
    elif kind in (1, 9):  # a header block
        payload = hpack.Encoder().encode(draw(_ENCODER_FIELDS))
    elif kind == 0:
        payload = grpc_body(pb.ServerLiveRequest())
    elif kind == 4:
        pairs = draw(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 2**32 - 1)), max_size=3))
        payload = b"".join(struct.pack(">HI", k, v) for k, v in pairs)
    elif kind in (3, 8):
        payload = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    elif kind == 6:
        payload = draw(st.binary(min_size=8, max_size=8))
    elif kind == 7:
        payload = struct.pack(">II", draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 13)))
    else:
        payload = draw(st.binary(max_size=8))
    return raw_frame(kind, flags, sid, payload)


@FUZZ
@given(sequence=st.lists(frames(), min_size=1, max_size=8))
def test_any_frames(served: ServerProcess, sequence: list[bytes]) -> None:
    note(f"frames: {sequence!r}")
    c = RawH2(served.grpc_port, timeout=5)
    try:
        c.handshake()
        c.send(b"".join(sequence))
        # No hang: the connection is closed, or it still answers a PING.
        assert c.ping_answered() or c.closed or c.goaway_code() is not None
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server closed while we were still writing
    finally:
        c.close()
    assert serves(served.grpc_port)


# -- raw bytes --------------------------------------------------------------------------


@FUZZ
@given(after_preface=st.booleans(), data=st.binary(min_size=1, max_size=512))
def test_raw_bytes(served: ServerProcess, after_preface: bool, data: bytes) -> None:
    c = RawH2(served.grpc_port, timeout=1)
    try:
        c.send((PREFACE if after_preface else b"") + data)
        c.read_until(lambda f: False, timeout=0.05)
    except OSError:
        pass  # closed on us while writing or reading
    finally:
        c.close()
    assert serves(served.grpc_port)
