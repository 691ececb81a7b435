"""`slimserve bench` against a real `slimserve serve` process, over all three protocols."""

from __future__ import annotations

import json

import pytest

from slimserve.cli import main

pytestmark = pytest.mark.timeout(120)


def _bench(server, *extra: str) -> list[str]:
    return [
        "bench",
        "--url",
        f"http://{server.http_url}",
        "--grpc-url",
        server.grpc_url,
        "--duration",
        "1",
        "--warmup",
        "0.2",
        *extra,
    ]


def test_bench_counts_add_up_without_errors(server, capsys):
    code = main(_bench(server, "--model", "mlp", "--concurrency", "1,4", "--json"))
    out = capsys.readouterr().out
    assert code == 0, out
    rows = json.loads(out)
    assert [(r["protocol"], r["concurrency"]) for r in rows] == [
        (p, n) for p in ("http-json", "http-binary", "grpc") for n in (1, 4)
    ]
    for r in rows:
        assert r["errors"] == {}
        assert r["requests"] > 0
        assert r["rps"] == pytest.approx(r["requests"] / r["duration_s"])
        assert 0 < r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]


def test_bench_table_and_a_variant_from_a_request_file(server, tmp_path, capsys):
    request = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 4], "data": [0.5] * 8}]
    }
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    args = _bench(
        server,
        "--model",
        "mlp:fast",
        "--concurrency",
        "2",
        "--protocol",
        "http-binary,grpc",
        "--input-file",
        str(path),
    )
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:3] == ["protocol", "clients", "req/s"]
    assert [line.split()[:2] for line in lines[2:]] == [["http-binary", "2"], ["grpc", "2"]]


def test_unknown_model_is_explained(server, capsys):
    assert main(_bench(server, "--model", "nope", "--concurrency", "1")) == 2
    assert "model 'nope' not found" in capsys.readouterr().err


def test_a_request_the_server_refuses_stops_before_the_run(server, tmp_path, capsys):
    request = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 5], "data": [0.5] * 5}]
    }  # the model takes 4 features
    path = tmp_path / "request.json"
    path.write_text(json.dumps(request))
    args = _bench(server, "--model", "mlp", "--protocol", "grpc", "--input-file", str(path))
    assert main(args) == 2
    assert "grpc: the server answered INVALID_ARGUMENT" in capsys.readouterr().err


def test_bench_with_grpcs_own_client(server, capsys):
    args = _bench(server, "--model", "mlp", "--protocol", "grpc", "--grpc-client", "grpcio")
    code = main([*args, "--concurrency", "3", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    (row,) = json.loads(out)
    assert row["protocol"] == "grpc" and row["errors"] == {} and row["requests"] > 0
