"""End-to-end fixtures: a small model repository and a real `slimserve serve` process.

The server runs as its own process on free loopback ports, exactly as a user starts it, and
is stopped by its PID at the end of the session.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from slimserve.bench.local_server import free_ports, serve_command, spawn, stop, wait_ready
from slimserve.errors import Unavailable
from slimserve.repository import write_manifest

IN_FEATURES, HIDDEN, OUT_FEATURES = 4, 8, 3


def mlp_weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.standard_normal((IN_FEATURES, HIDDEN)).astype(np.float32),
        "b1": rng.standard_normal(HIDDEN).astype(np.float32),
        "w2": rng.standard_normal((HIDDEN, OUT_FEATURES)).astype(np.float32),
        "b2": rng.standard_normal(OUT_FEATURES).astype(np.float32),
    }


def mlp_reference(weights: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """What the ONNX model computes: relu(x @ w1 + b1) @ w2 + b2."""
    h = np.maximum(x @ weights["w1"] + weights["b1"], 0.0)
    return h @ weights["w2"] + weights["b2"]


def write_mlp_onnx(path: Path, weights: dict[str, np.ndarray]) -> None:
    """A two-layer MLP, input 'input' FP32 [N, 4] -> output 'logits' FP32 [N, 3]."""
    nodes = [
        helper.make_node("MatMul", ["input", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w2"], ["h3"]),
        helper.make_node("Add", ["h3", "b2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", IN_FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", OUT_FEATURES])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


MLP_YAML = f"""\
backend: onnx
inputs:  [{{name: input, datatype: FP32, shape: [-1, {IN_FEATURES}]}}]
outputs: [{{name: logits, datatype: FP32, shape: [-1, {OUT_FEATURES}]}}]
batching: {{max_batch_size: 8, max_queue_delay_ms: 2}}
"""


@dataclass(frozen=True)
class Repo:
    root: Path
    weights: dict[str, dict[str, np.ndarray]]  # "mlp/1", "mlp/2", "mlp/2:fast" -> weights


def build_repo(root: Path) -> Repo:
    """mlp: versions 1 and 2 (2 is the default), variant 'fast' of version 2 (other weights);
    broken: a model whose artifact is corrupt (it must fail alone)."""
    weights = {"mlp/1": mlp_weights(1), "mlp/2": mlp_weights(2), "mlp/2:fast": mlp_weights(3)}
    (root / "mlp").mkdir(parents=True)
    (root / "mlp" / "model.yaml").write_text(MLP_YAML)
    for key, folder in (("mlp/1", "1"), ("mlp/2", "2"), ("mlp/2:fast", "2/variants/fast")):
        write_mlp_onnx(root / "mlp" / folder / "model.onnx", weights[key])
        write_manifest(root / "mlp" / folder)
    broken = root / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "model.yaml").write_text(MLP_YAML)
    (broken / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    return Repo(root, weights)


@pytest.fixture(scope="session")
def model_repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    return build_repo(tmp_path_factory.mktemp("repo") / "models")


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    http_port: int
    grpc_port: int
    log_path: Path

    @property
    def http_url(self) -> str:  # host:port, as tritonclient wants it
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.process.poll() is None


def start_server(
    repository: Path,
    log_path: Path,
    *extra: str,
    timeout: float = 90,
    ssl_context: ssl.SSLContext | None = None,
) -> ServerProcess:
    """Start `slimserve serve` on free ports and poll its readiness for up to `timeout` s;
    with `ssl_context`, over HTTPS with it (a context holding the test CA, and a client
    certificate for mTLS)."""
    http_port, grpc_port = free_ports(2)
    cmd = serve_command(repository, http_port, grpc_port, *extra)
    proc = spawn(cmd, log_path, env={"OMP_NUM_THREADS": "1"})
    scheme = "https" if ssl_context is not None else "http"
    url = f"{scheme}://127.0.0.1:{http_port}/v2/health/ready"
    try:
        wait_ready(proc, url, log_path, timeout, ssl_context=ssl_context)
    except Unavailable:
        stop(proc)
        raise
    return ServerProcess(proc, http_port, grpc_port, log_path)


def stop_server(server: ServerProcess) -> None:
    stop(server.process)


@pytest.fixture(scope="session")
def server(model_repo: Repo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`slimserve serve --model-control` on the test repository (a copy, so tests may edit)."""
    root = tmp_path_factory.mktemp("served") / "models"
    shutil.copytree(model_repo.root, root)
    proc = start_server(root, root.parent / "server.log", "--model-control")
    yield proc
    stop_server(proc)
    assert proc.process.returncode == 0, f"server did not stop cleanly:\n{proc.log()}"


@pytest.fixture(scope="module")
def openai_client(server: ServerProcess) -> Iterator[Any]:
    """The `openai` client for the module's `server` (no retries: a refusal shows)."""
    openai = pytest.importorskip("openai")
    url = f"http://127.0.0.1:{server.http_port}/v1"
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0) as client:
        yield client
