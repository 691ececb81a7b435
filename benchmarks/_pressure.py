"""Shared by the issue-4 proofs (residency, overload, degradation, failure): ONNX MLPs built
with onnx.helper, a real `slimserve serve` process on free loopback ports (stopped by PID),
Prometheus scraping, and an open-loop load generator on pooled keep-alive connections.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from slimserve.bench.http_client import Connection, build_request, connect

PY = sys.executable


# -- models ----------------------------------------------------------------------------------


def write_mlp(path: Path, sizes: list[int], seed: int = 0, out_name: str = "output") -> int:
    """An MLP (MatMul+Add, ReLU between layers) 'input' FP32 [N, sizes[0]] -> `out_name`
    [N, sizes[-1]], random weights; returns the file size in bytes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, prev = [], [], "input"
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        w = (rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32)
        inits += [
            numpy_helper.from_array(w, f"w{i}"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"b{i}"),
        ]
        last = i == len(sizes) - 2
        nodes += [
            helper.make_node("MatMul", [prev, f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"b{i}"], [out_name if last else f"a{i}"]),
        ]
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
            prev = f"r{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["N", sizes[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path.stat().st_size


def write_yaml(path: Path, doc: dict[str, Any]) -> None:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def io_spec(width_in: int, width_out: int, out_name: str = "output") -> dict[str, Any]:
    return {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, width_in]}],
        "outputs": [{"name": out_name, "datatype": "FP32", "shape": [-1, width_out]}],
    }


def write_toy_with_variant(
    root: Path,
    name: str,
    model_class: str,
    model_args: dict[str, Any],
    width: int,
    variant: str,
    profile: dict[str, Any],
    **sections: Any,
) -> None:
    """A python-backend model (a slimserve.testing runtime, `input` -> `output` [-1, width])
    whose version 1 has an ONNX variant `variant` (an MLP width -> width) with `profile`."""
    version = root / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "README").write_text("served by model_class; no artifact\n")
    doc: dict[str, Any] = {
        "backend": "python",
        "model_class": model_class,
        "model_args": model_args,
        **io_spec(width, width),
        **sections,
    }
    write_yaml(root / name / "model.yaml", doc)
    folder = version / "variants" / variant
    write_mlp(folder / "model.onnx", [width, width], seed=1)
    write_yaml(folder / "variant.yaml", {"backend": "onnx", "profile": profile})


def served(body: bytes) -> tuple[str, bool]:
    """(model_name, degraded) of a v2 JSON response."""
    doc = orjson.loads(body)
    return doc.get("model_name", ""), bool((doc.get("parameters") or {}).get("degraded"))


# -- requests --------------------------------------------------------------------------------


def json_infer(
    width: int, rows: int = 1, seed: int = 0, parameters: dict[str, Any] | None = None
) -> bytes:
    x = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    doc: dict[str, Any] = {
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, width], "data": x.ravel()}]
    }
    if parameters:
        doc["parameters"] = parameters
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def binary_infer(width: int, rows: int = 1, seed: int = 0) -> tuple[bytes, dict[str, str]]:
    """A v2 binary-extension body (cheap to parse, so refusals cost the server little)."""
    x = np.random.default_rng(seed).standard_normal((rows, width)).astype(np.float32)
    raw = x.tobytes()
    head = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [rows, width],
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    )
    headers = {
        "Inference-Header-Content-Length": str(len(head)),
        "Content-Type": "application/octet-stream",
    }
    return head + raw, headers


def infer_request(
    port: int, model: str, body: bytes, headers: dict[str, str] | None = None
) -> bytes:
    return build_request(
        "POST",
        "127.0.0.1",
        port,
        f"/v2/models/{model}/infer",
        body,
        headers or {"Content-Type": "application/json"},
    )


# -- the server ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_bytes(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.get("/metrics")[1].decode())


@contextmanager
def serve(
    repo: Path, log: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """`slimserve serve` on a free port (HTTP only); stopped by its PID on exit."""
    port = free_port()
    cmd = [
        PY,
        "-m",
        "slimserve",
        "serve",
        "--repository",
        str(repo),
        "--http-port",
        str(port),
        "--grpc-port",
        "0",
        "--log-level",
        "warning",
        *extra,
    ]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        )
    server = Server(proc, port, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in 90 s: {log.read_text()[-2000:]}")
            try:
                if server.get("/v2/health/ready")[0] == 200:
                    break
            except OSError:
                pass
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (samples only)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def metric(m: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    total = 0.0
    for key, value in m.items():
        base, _, rest = key.partition("{")
        if base != name:
            continue
        if all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


# -- load ------------------------------------------------------------------------------------


@dataclass(slots=True)
class Sample:
    sent: float  # seconds since the run started, when it was written to the socket
    late: float  # seconds the client sent it after its scheduled time (client lag)
    status: int  # 0: connection error
    latency: float  # seconds from write to complete answer
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased; with keep_body


@dataclass
class OpenLoopResult:
    samples: list[Sample] = field(default_factory=list)
    skipped: int = 0  # arrivals dropped because the connection pool was exhausted
    connections: int = 0


async def open_loop(
    port: int,
    request: bytes | Any,
    rate: float,
    duration_s: float,
    keep_body: bool = False,
    max_connections: int = 2000,
) -> OpenLoopResult:
    """Send at a fixed `rate` (req/s) for `duration_s`, whatever the answers do: each arrival
    takes an idle keep-alive connection from the pool (or opens one) and never waits for an
    earlier request. `request` is raw bytes, or a callable (i -> bytes)."""
    result = OpenLoopResult()
    idle: list[Connection] = []
    tasks: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()
    clock = time.perf_counter  # uvloop's loop.time() has 1 ms resolution
    t0 = clock()

    async def one(i: int, due: float) -> None:
        conn = idle.pop() if idle else None
        if conn is None or not conn.open:
            if result.connections >= max_connections:
                result.skipped += 1
                return
            result.connections += 1
            conn = await connect("127.0.0.1", port, keep_body)
        raw = request(i) if callable(request) else request
        start = clock()
        try:
            status, body = await conn.request(raw)
        except (ConnectionError, OSError):
            result.samples.append(Sample(start - t0, start - due, 0, clock() - start))
            conn.close()
            return
        took = clock() - start
        headers = conn.last_headers if keep_body else {}
        result.samples.append(Sample(start - t0, start - due, status, took, body, headers))
        idle.append(conn)

    n = int(rate * duration_s)
    i = 0
    while i < n:
        now = clock()
        due_count = min(n, int((now - t0) * rate) + 1)
        while i < due_count:
            task = loop.create_task(one(i, t0 + i / rate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        await asyncio.sleep(max(0.0, t0 + i / rate - clock()))
    if tasks:
        await asyncio.wait(tasks, timeout=30)
    for conn in idle:
        conn.close()
    return result


def pct(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if len(values) else float("nan")


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


def run(coro: Any) -> Any:
    loop = new_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


# -- facts -----------------------------------------------------------------------------------


def machine_facts() -> dict[str, str]:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    import onnxruntime

    return {
        "cpu": model or platform.processor(),
        "flags": " ".join(keep),
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def dump(path: Path, doc: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))
