"""Each model's own speed in-process: time per call at batch 1 and throughput at its best batch.

    python benchmarks/inprocess.py --repository /tmp/bench-ws/repo [--json out.json]

Measured through slimserve's runtime classes (what the server calls, tokenization included for
text models) and, for the MLP, through raw onnxruntime / torch as well. For each batch size the
call is repeated for `--seconds` and the median time per call is kept; throughput is
rows / median. The best batch is the one with the highest throughput, up to the model's
max_batch_size (the largest batch the server will form). Nothing else should run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from slimserve.bench.payload import SENTENCES

BATCHES = (1, 2, 4, 8, 16, 32, 64)
Infer = Callable[[int], Callable[[], object]]  # batch size -> a zero-argument call


def median_call_s(call: Callable[[], object], seconds: float, min_reps: int = 5) -> float:
    """Median wall time of `call` over at least `min_reps` runs and about `seconds`."""
    call()  # warm-up: first-call allocations and lazy initialisation
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < end:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def profile(make: Infer, max_batch: int, seconds: float) -> dict[str, float | int]:
    """Batch-1 time (ms) and best-batch throughput (rows/s) with the batch size that gave it."""
    per_batch = {}
    for b in (b for b in BATCHES if b <= max_batch):
        per_batch[b] = median_call_s(make(b), seconds)
    best = max(per_batch, key=lambda b: b / per_batch[b])
    return {
        "batch1_ms": per_batch[1] * 1e3,
        "batch1_rps": 1 / per_batch[1],
        "best_batch": best,
        "best_rps": best / per_batch[best],
    }


def _inputs(spec_name: str, datatype: str, width: int | None, b: int) -> dict[str, np.ndarray]:
    if datatype == "BYTES":
        return {
            spec_name: np.array([SENTENCES[i % len(SENTENCES)] for i in range(b)], dtype=object)
        }
    rng = np.random.default_rng(b)
    return {spec_name: rng.standard_normal((b, width or 1)).astype(np.float32)}


def runtime_maker(root: Path, name: str, threads: int = 0) -> tuple[Infer, int]:
    """slimserve's runtime for the model's version 1, loaded and warmed up."""
    from slimserve.repository.store import Repository
    from slimserve.runtimes import RuntimeOptions, create_runtime

    target = Repository(root).target(name, 1)
    runtime = create_runtime(target, RuntimeOptions(intra_op_threads=threads))
    runtime.load()
    runtime.warmup()
    spec = runtime.inputs[0]
    width = spec.shape[-1] if len(spec.shape) > 1 else None

    def make(b: int) -> Callable[[], object]:
        feeds = _inputs(spec.name, spec.datatype, width, b)
        return lambda: runtime.infer(feeds)

    return make, target.config.batching.max_batch_size


def raw_onnx_maker(path: Path, threads: int = 0) -> Infer:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def make(b: int) -> Callable[[], object]:
        x = np.random.default_rng(b).standard_normal((b, 784)).astype(np.float32)
        return lambda: session.run(None, {name: x})

    return make


def raw_torch_maker(threads: int = 0) -> Infer:
    import torch

    torch.set_num_threads(threads or os.cpu_count() or 1)  # this thread only
    sys.path.insert(0, str(Path(__file__).parent))
    from models import mlp_module

    model = mlp_module()

    def make(b: int) -> Callable[[], object]:
        x = torch.randn(b, 784)

        def call() -> object:
            with torch.inference_mode():
                return model(x)

        return call

    return make


def measure(
    root: Path, seconds: float, models: list[str], thread_counts: list[int]
) -> dict[str, dict[str, float | int]]:
    """{"mlp-onnx (slimserve runtime, 1 thread)": {...}, ...} for the models in `root`.

    Thread counts are intra-op threads per call; 0 means the framework's default (one per core).
    """
    out: dict[str, dict[str, float | int]] = {}
    for name in models:
        if not (root / name).is_dir():
            continue
        for threads in thread_counts:
            t = f"{threads or os.cpu_count()} thread{'s' if threads != 1 else ''}"
            make, max_batch = runtime_maker(root, name, threads)
            out[f"{name} (slimserve runtime, {t})"] = profile(make, max_batch, seconds)
            if name == "mlp-onnx":
                raw = raw_onnx_maker(root / name / "1" / "model.onnx", threads)
                out[f"mlp-onnx (raw onnxruntime, {t})"] = profile(raw, max_batch, seconds)
            if name == "mlp-torch":
                raw = raw_torch_maker(threads)
                out[f"mlp-torch (raw torch, {t})"] = profile(raw, max_batch, seconds)
    return out


def markdown(results: dict[str, dict[str, float | int]]) -> str:
    lines = [
        "| model (path) | batch 1: ms/call | batch 1: req/s | best batch | best: rows/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['batch1_ms']:.3f} | {r['batch1_rps']:.0f} | {r['best_batch']} "
            f"| {r['best_rps']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=0.5, help="per batch size")
    parser.add_argument("--models", default="mlp-onnx,mlp-torch,minilm")
    parser.add_argument(
        "--intra-op-threads", default="1,0", help="comma-separated counts (0: one per core)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args()
    # In a worker thread, as the server runs inference. On a busy 2-core machine, torch's
    # 2-thread intra-op pool driven from the main thread was measured 30x slower (36 ms vs
    # 1.0 ms for the MLP at batch 16) than the same calls from a worker thread.
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(
            measure,
            args.repository,
            args.seconds,
            args.models.split(","),
            [int(t) for t in args.intra_op_threads.split(",")],
        )
        results = job.result()
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
