"""`slimserve bench` without a slimserve server: arguments, request encoding, HTTP framing.

The framing tests run the real client against a real (tiny) asyncio HTTP server that answers
with Content-Length, chunked bodies, or a closed connection.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct

import numpy as np
import orjson
import pytest

from slimserve.bench import payload as pl
from slimserve.bench.drivers import HttpDriver
from slimserve.bench.http_client import build_request, connect
from slimserve.bench.runner import Recorder, closed_loop, summarize
from slimserve.cli import main
from slimserve.errors import InvalidArgument


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        ("--concurrency", "0", "positive integers"),
        ("--concurrency", "1,x", "positive integers"),
        ("--protocol", "http-json,smoke", "use one or more of"),
        ("--duration", "0", "seconds >= 0.1"),
        ("--warmup", "-1", "seconds >= 0"),
    ],
)
def test_bad_arguments_exit_2_with_a_fix(flag, value, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--model", "m", flag, value])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_model_is_required(capsys):
    with pytest.raises(SystemExit):
        main(["bench"])
    assert "--model" in capsys.readouterr().err


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:1", "http://127.0.0.1:8000/v2"])
def test_bad_url_is_explained(url, capsys):
    assert main(["bench", "--model", "m", "--url", url]) == 2
    assert "--url" in capsys.readouterr().err


def test_no_server_there_is_explained(capsys):
    url = f"http://127.0.0.1:{_free_port()}"
    assert main(["bench", "--model", "m", "--url", url, "--duration", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "is the server running" in err


def test_synthetic_inputs_follow_metadata():
    meta = {
        "name": "m",
        "inputs": [
            {"name": "x", "datatype": "FP16", "shape": [-1, 3, -1]},
            {"name": "t", "datatype": "BYTES", "shape": [-1]},
            {"name": "i", "datatype": "INT64", "shape": [2]},
        ],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}],
    }
    p = pl.from_metadata(meta, batch_size=4)
    x, t, i = p.inputs
    assert (x.array.shape, x.array.dtype) == ((4, 3, 1), np.float16)
    assert t.array.shape == (4,) and all(isinstance(e, bytes) for e in t.array)
    assert (i.array.shape, i.array.dtype) == ((2,), np.int64)
    assert p.outputs == ("y",)


def test_metadata_without_inputs_is_refused():
    with pytest.raises(InvalidArgument, match="--input-file"):
        pl.from_metadata({"name": "m", "inputs": []})


def test_binary_body_is_header_then_raw_tensors():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = np.array([b"ab", b"cde"], dtype=object)
    p = pl.Payload((pl.Tensor("x", "FP32", x), pl.Tensor("t", "BYTES", t)), ("y",))
    body, head_len = pl.binary_body(p)
    header = orjson.loads(body[:head_len])
    assert header["inputs"][0]["parameters"]["binary_data_size"] == 24
    assert header["inputs"][1]["shape"] == [2]
    assert header["outputs"] == [{"name": "y", "parameters": {"binary_data": True}}]
    raw_bytes = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 3) + b"cde"
    assert body[head_len:] == x.tobytes() + raw_bytes


def test_json_body_round_trips_through_a_request_file(tmp_path):
    x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
    p = pl.Payload(
        (pl.Tensor("x", "FP32", x), pl.Tensor("s", "BYTES", np.array([b"hi"], object))), ()
    )
    path = tmp_path / "request.json"
    path.write_bytes(pl.json_body(p))
    back = pl.from_request_file(path)
    np.testing.assert_array_equal(back.inputs[0].array, x)
    assert back.inputs[1].array.tolist() == [b"hi"]


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("{not json", "not valid JSON"),
        ('{"inputs": []}', "expected a v2 request body"),
        (
            '{"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3]}]}',
            "do not fit shape",
        ),
        (
            '{"inputs": [{"name": "x", "datatype": "F33", "shape": [1], "data": [1]}]}',
            "unknown datatype",
        ),
    ],
)
def test_bad_request_files_are_explained(tmp_path, content, words):
    path = tmp_path / "request.json"
    path.write_text(content)
    with pytest.raises(InvalidArgument, match=words):
        pl.from_request_file(path)


# ---- HTTP framing against a real asyncio server ------------------------------------------------

BODY = b'{"outputs": [{"name": "y"}]}'


def _answer(kind: str) -> bytes:
    if kind == "length":
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    if kind == "chunked":  # two chunks, a trailer, then the end
        half = len(BODY) // 2
        chunks = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\nX-T: 1\r\n\r\n" % (
            half,
            BODY[:half],
            len(BODY) - half,
            BODY[half:],
        )
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    return b"HTTP/1.1 503 Unavailable\r\ncontent-length: 2\r\n\r\n{}"


async def _answer_requests(kind, reader, writer, close_after) -> None:
    served = 0
    while close_after is None or served < close_after:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
        # Split the answer across writes to exercise partial reads.
        data = _answer(kind)
        writer.write(data[:7])
        await writer.drain()
        writer.write(data[7:])
        await writer.drain()
        served += 1


async def _stop(server: asyncio.Server) -> None:
    await asyncio.sleep(0.05)  # let handlers see their clients leave
    server.close()
    await server.wait_closed()


async def _serve(kind: str, close_after: int | None = None):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _answer_requests(kind, reader, writer, close_after)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


@pytest.mark.parametrize("kind", ["length", "chunked"])
def test_client_frames_answers_and_keeps_the_connection(kind):
    async def go():
        server = await _serve(kind)
        port = server.sockets[0].getsockname()[1]
        conn = await connect("127.0.0.1", port, keep_body=True)
        raw = build_request("POST", "127.0.0.1", port, "/v2/models/m/infer", b"{}")
        answers = [await conn.request(raw) for _ in range(3)]
        conn.close()
        await _stop(server)
        return answers

    assert asyncio.run(go()) == [(200, BODY)] * 3


def test_closed_loop_counts_statuses_and_reconnects():
    """A server that answers 503 and closes after each answer: every request is an error
    labelled by its status, and the client reconnects instead of failing."""

    async def go():
        server = await _serve("error", close_after=1)
        port = server.sockets[0].getsockname()[1]
        p = pl.Payload((pl.Tensor("x", "FP32", np.zeros((1, 2), np.float32)),), ())
        driver = HttpDriver("http-json", "127.0.0.1", port, "m", "", p)
        sends = await driver.senders(2)
        # Deterministic part: a fresh connection answers 503; the next send may race the
        # server's close ("connection"), after which the client must have reconnected, so
        # three sends in a row give at least two 503s whatever the machine's load.
        direct = [await sends[0]() for _ in range(3)]
        rec, cpu = await closed_loop(sends, duration_s=1.0, warmup_s=0.0)
        await driver.close()
        await _stop(server)
        return direct, rec, cpu

    direct, rec, cpu = asyncio.run(go())
    assert direct[0] == "503" and direct.count("503") >= 2, direct
    assert set(direct) <= {"503", "connection"}
    assert rec.latencies_ns == []
    assert sum(rec.errors.values()) > 0
    assert set(rec.errors) <= {"503", "connection"}
    result = summarize("http-json", 2, 1.0, rec, cpu)
    assert result.requests == 0 and result.rps == 0
    assert json.loads(json.dumps(result.to_dict()))["p50_ms"] is None


def test_summary_percentiles_are_ordered():
    rec = Recorder()
    for ms in range(1, 101):
        rec.add("ok", ms * 1_000_000)
    rec.add("429", 1)
    r = summarize("grpc", 4, 2.0, rec, 0.01)
    assert r.requests == 100 and r.rps == 50 and r.errors == {"429": 1}
    assert r.p50_ms <= r.p90_ms <= r.p99_ms <= r.max_ms == 100
