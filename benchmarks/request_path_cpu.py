"""CPU time per request on slimserve's request path, in process: a measure that a busy, shared
machine disturbs far less than wall-clock throughput (other processes take turns on the cores,
but do not add CPU seconds to ours).

    python benchmarks/request_path_cpu.py [--requests 3000] [--repeats 5]

One toy model (slimserve.testing.EchoRuntime: the model itself costs next to nothing), input
(1, 784) FP32, max_batch_size 8. Three paths, each request awaited before the next:
  engine   Engine.infer with an InferRequest (validation, admission, batcher, thread hop)
  http     the ASGI app called directly with a v2 JSON request (decode, engine, encode)
  grpc     the gRPC servicer's ModelInfer with a serialized ModelInferRequest (raw tensors)
Prints microseconds of process CPU time (all threads) per request, the median of the repeats.
Written to compare two checkouts of slimserve run one after the other (PYTHONPATH).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from slimserve.config import Settings
from slimserve.testing import EchoRuntime, toy_config, write_model
from slimserve.transport.grpc import InferenceServicer
from slimserve.transport.vendor import grpc_service_pb2 as pb
from slimserve.types import InferRequest

WIDTH = 784


def _engine(root: Path) -> Any:
    settings = Settings(repository=root, inference_threads=1)
    try:  # this checkout's composition root
        from slimserve.app import build_engine

        return build_engine(settings, runtime_factory=lambda t, o: EchoRuntime(t, o))
    except ImportError:  # before it existed: the engine built its own parts
        from slimserve.repository.store import Repository
        from slimserve.serving.engine import Engine

        return Engine(Repository(root), settings, lambda t, o: EchoRuntime(t, o))


def _http_app(engine: Any, settings: Settings) -> Any:
    try:
        from slimserve.transport.asgi import create_app
    except ImportError:
        from slimserve.transport.http import create_app  # type: ignore[no-redef]
    return create_app(engine, settings)


class _Context:
    """What the servicer reads of a grpc.aio context."""

    def time_remaining(self) -> float | None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    def invocation_metadata(self) -> tuple[()]:
        return ()


async def _measure(name: str, call: Any, requests: int) -> float:
    for _ in range(100):  # warm-up
        await call()
    started = time.process_time()
    for _ in range(requests):
        await call()
    return (time.process_time() - started) / requests * 1e6


async def main(requests: int, repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_model(root, "echo", toy_config(width=WIDTH, max_batch_size=8))
        settings = Settings(repository=root, inference_threads=1)
        engine = _engine(root)
        await engine.start(wait=True)
        x = np.random.default_rng(0).standard_normal((1, WIDTH)).astype(np.float32)
        app = _http_app(engine, settings)
        body = orjson.dumps(
            {
                "inputs": [
                    {
                        "name": "input",
                        "datatype": "FP32",
                        "shape": [1, WIDTH],
                        "data": x.ravel().tolist(),
                    }
                ]
            }
        )
        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v2/models/echo/infer",
            "raw_path": b"/v2/models/echo/infer",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
        }
        sent: list[Any] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        async def http() -> None:
            sent.clear()
            await app(dict(scope), receive, send)
            assert sent[0]["status"] == 200, sent

        message = pb.ModelInferRequest(model_name="echo")
        message.inputs.add(name="input", datatype="FP32", shape=[1, WIDTH])
        message.raw_input_contents.append(x.tobytes())
        data = message.SerializeToString()
        servicer, context = InferenceServicer(engine), _Context()

        async def grpc() -> None:
            await servicer.ModelInfer(data, context)

        async def direct() -> None:
            await engine.infer(InferRequest("echo", {"input": x}))

        paths = {"engine": direct, "http": http, "grpc": grpc}
        results: dict[str, list[float]] = {k: [] for k in paths}
        try:
            for _ in range(repeats):
                for name, call in paths.items():
                    results[name].append(await _measure(name, call, requests))
        finally:
            await engine.stop()
    for name, values in results.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name:7s} {statistics.median(values):7.1f} us CPU/request (runs: {shown})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.repeats))
