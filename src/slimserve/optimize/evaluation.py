"""`evaluate`: the same profile for every variant, torch module or ONNX file.

Profile keys (VariantProfile's, plus extras): size_bytes (artifact on disk), memory_bytes
(weights and buffers held in memory), parameters, nonzeros, latency_ms_batch1 (p50),
latency_ms_batch1_p99, latency_ms_best (p50 at the batch with the highest throughput),
best_batch, throughput_rps, accuracy (labelled data), agreement (top-1 with the reference),
max_abs_error, mean_abs_error, cosine_mean / cosine_min (embeddings), rss_bytes (process), and
`machine` (CPU model and flags, threads, library versions).
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from slimserve.errors import InvalidArgument
from slimserve.runtimes.quantized.cpu import cpu_flags

Inputs = np.ndarray | dict[str, np.ndarray]
Predict = Callable[[Inputs], np.ndarray]

_FLAGS_OF_INTEREST = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_bf16",
    "amx_int8",
    "fma",
    "f16c",
)


# --- predictors -------------------------------------------------------------------------------


def _torch_predictor(model: Any, threads: int | None) -> Predict:
    import torch

    model.eval()
    if threads:
        torch.set_num_threads(threads)

    def predict(x: Inputs) -> np.ndarray:
        with torch.inference_mode():
            if isinstance(x, dict):
                out = model(**{k: torch.from_numpy(v) for k, v in x.items()})
            else:
                out = model(torch.from_numpy(x))
        out = out[0] if isinstance(out, tuple | list) else out
        result: np.ndarray = out.float().numpy()
        return result

    return predict


def _onnx_predictor(path: Path, threads: int | None) -> Predict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(x: Inputs) -> np.ndarray:
        feeds = x if isinstance(x, dict) else {name: x}
        return np.asarray(session.run(None, feeds)[0], dtype=np.float32)

    return predict


def as_predictor(candidate: Any, threads: int | None = None) -> Predict:
    """A numpy -> numpy function for a torch module, an .onnx path, or a callable."""
    if isinstance(candidate, str | Path):
        path = Path(candidate)
        if path.suffix != ".onnx":
            raise InvalidArgument(f"evaluate: {path} is not an .onnx file; pass a module or .onnx")
        return _onnx_predictor(path, threads)
    if hasattr(candidate, "state_dict"):
        return _torch_predictor(candidate, threads)
    if callable(candidate):
        return candidate  # type: ignore[no-any-return]
    raise InvalidArgument(f"evaluate: cannot run a {type(candidate).__name__}")


# --- measurements -----------------------------------------------------------------------------


def _rows(x: Inputs) -> int:
    return len(next(iter(x.values()))) if isinstance(x, dict) else len(x)


def _take(x: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(x, dict):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


def predict_all(predict: Predict, x: Inputs, batch_size: int = 256) -> np.ndarray:
    n = _rows(x)
    return np.concatenate([predict(_take(x, i, i + batch_size)) for i in range(0, n, batch_size)])


def batch_of(x: Inputs, size: int) -> Inputs:
    """`size` rows, repeating the data when it holds fewer."""
    n = _rows(x)
    idx = np.arange(size) % n
    if isinstance(x, dict):
        return {k: np.ascontiguousarray(v[idx]) for k, v in x.items()}
    return np.ascontiguousarray(x[idx])


def time_batch(
    predict: Predict, batch: Inputs, min_time_s: float = 0.2, min_runs: int = 5, max_runs: int = 200
) -> np.ndarray:
    """Wall-clock milliseconds of repeated calls, after two warm-up calls."""
    for _ in range(2):
        predict(batch)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (
        len(times) < min_runs or time.perf_counter() - start < min_time_s
    ):
        t0 = time.perf_counter()
        predict(batch)
        times.append((time.perf_counter() - t0) * 1e3)
    return np.asarray(times)


def latency_profile(
    predict: Predict,
    x: Inputs,
    batch_sizes: Sequence[int] = (1, 8, 32, 128),
    min_time_s: float = 0.2,
) -> dict[str, Any]:
    """p50/p99 at batch 1; the batch size with the best throughput and its p50."""
    per_batch = {}
    for size in batch_sizes:
        t = time_batch(predict, batch_of(x, size), min_time_s)
        per_batch[size] = (float(np.percentile(t, 50)), float(np.percentile(t, 99)))
    return latency_summary(per_batch)


def latency_summary(per_batch: dict[int, tuple[float, float]]) -> dict[str, Any]:
    """The latency keys of a profile from (p50, p99) milliseconds per batch size, in order."""
    rps = {s: s / (p50 / 1e3) for s, (p50, _) in per_batch.items()}
    best = max(rps, key=rps.__getitem__)
    first = next(iter(per_batch))
    return {
        "latency_ms_batch1": per_batch[first][0],
        "latency_ms_batch1_p99": per_batch[first][1],
        "latency_ms_best": per_batch[best][0],
        "best_batch": best,
        "throughput_rps": rps[best],
        "latency_ms_by_batch": {str(s): round(v[0], 4) for s, v in per_batch.items()},
    }


def fidelity(out: np.ndarray, ref: np.ndarray, embedding: bool) -> dict[str, float]:
    """Agreement with the reference outputs: top-1 (classifiers) or cosine (embeddings)."""
    if out.shape != ref.shape:
        raise InvalidArgument(
            f"evaluate: output shape {out.shape} differs from the reference's "
            f"{ref.shape}; a variant must keep the model's outputs"
        )
    diff = np.abs(out.astype(np.float64) - ref)
    result = {"max_abs_error": float(diff.max()), "mean_abs_error": float(diff.mean())}
    if embedding:
        a, b = out.reshape(len(out), -1), ref.reshape(len(ref), -1)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)
        result.update(
            cosine_mean=float(cos.mean()), cosine_min=float(cos.min()), agreement=float(cos.mean())
        )
    else:
        result["agreement"] = float((out.argmax(-1) == ref.argmax(-1)).mean())
    return result


def weight_stats(candidate: Any) -> dict[str, int]:
    """Parameter count, non-zeros and bytes of weights (torch tensors or ONNX initializers)."""
    arrays: list[Any]
    if isinstance(candidate, str | Path):
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(candidate)).graph
        arrays = [numpy_helper.to_array(t) for t in graph.initializer]
        sizes = [(a.size, int(np.count_nonzero(a)), a.nbytes) for a in arrays]
    elif hasattr(candidate, "state_dict"):
        tensors = list(candidate.state_dict().values())
        sizes = [(t.numel(), int(t.count_nonzero()), t.numel() * t.element_size()) for t in tensors]
    else:
        return {}
    return {
        "parameters": sum(s[0] for s in sizes),
        "nonzeros": sum(s[1] for s in sizes),
        "memory_bytes": sum(s[2] for s in sizes),
    }


def size_on_disk(path: str | Path | None) -> int | None:
    """Bytes of a file, or of every file under a folder."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine_facts(threads: int | None = None) -> dict[str, Any]:
    """CPU model and flags, threads, library versions, load average: how to read the figures."""
    flags = cpu_flags()
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads or _torch_threads(),
        "cpu_flags": [f for f in _FLAGS_OF_INTEREST if f in flags],
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "python": platform.python_version(),
        "versions": library_versions(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("slimserve", "torch", "onnx", "onnxruntime", "numpy", "transformers"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def evaluate(
    candidate: Any,
    inputs: Inputs,
    labels: np.ndarray | None = None,
    *,
    reference: np.ndarray | Any | None = None,
    artifact: str | Path | None = None,
    embedding: bool = False,
    batch_sizes: Sequence[int] = (1, 8, 32, 128),
    threads: int | None = None,
    min_time_s: float = 0.2,
    max_eval_rows: int | None = None,
) -> dict[str, Any]:
    """Profile `candidate` on `inputs` (numpy, batch first; a dict for several inputs).

    reference: the original's outputs on `inputs`, or the original model itself;
    artifact: the file or folder whose size is reported (default: candidate if a path).
    """
    if max_eval_rows is not None:
        inputs = _take(inputs, 0, max_eval_rows)
        labels = None if labels is None else labels[:max_eval_rows]
    predict = as_predictor(candidate, threads)
    out = _run_checked(predict, inputs)
    profile: dict[str, Any] = {
        "size_bytes": size_on_disk(
            artifact or (candidate if isinstance(candidate, str | Path) else None)
        )
    }
    profile.update(weight_stats(candidate))
    profile.update(latency_profile(predict, inputs, batch_sizes, min_time_s))
    if labels is not None and not embedding:
        profile["accuracy"] = float((out.argmax(-1) == labels).mean())
    if reference is not None:
        ref = (
            reference
            if isinstance(reference, np.ndarray)
            else predict_all(as_predictor(reference, threads), inputs)
        )
        profile.update(fidelity(out, ref, embedding))
    profile["rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    profile["machine"] = machine_facts(threads)
    return profile


def _run_checked(predict: Predict, inputs: Inputs) -> np.ndarray:
    try:
        return predict_all(predict, inputs)
    except Exception as exc:  # noqa: BLE001 - torch and onnxruntime raise unrelated types for bad shapes
        shape = (
            {k: v.shape for k, v in inputs.items()} if isinstance(inputs, dict) else inputs.shape
        )
        raise InvalidArgument(
            f"evaluate: the model cannot run on data of shape {shape}: {str(exc)[:300]}; "
            "give data shaped like the model's input (batch first)"
        ) from None
