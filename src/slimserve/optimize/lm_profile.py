"""Measure a language model as the server loads it: perplexity, agreement, sizes, decode speed.

Quality: perplexity of a held-out text (teacher forced, one forward over the whole text) and
`agreement`, the share of the text's positions where the variant's most likely next token is
the original's. Speed: milliseconds of one decode step (one new token per stream, a context
of `context` tokens in the paged KV cache) at 1 and 8 streams, the median of repeated steps.

The model is our generation forward (slimserve.runtimes.llm), so the figures describe
exactly what the server runs; this is the one place optimize reaches into serving.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from slimserve.runtimes.llm.model import Batch, LlamaModel, forward, new_kv_pool
from slimserve.runtimes.llm.quality import text_logits


def perplexity_of(logits: torch.Tensor, tokens: list[int]) -> float:
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(tokens[1:]))
    return math.exp(float(nll))


def agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of positions whose argmax token equals the reference's."""
    return float((logits.argmax(-1) == reference.argmax(-1)).float().mean())


@torch.inference_mode()
def decode_step_ms(
    model: LlamaModel, streams: int, context: int = 64, min_time_s: float = 0.2
) -> float:
    """Median ms of one decode step of `streams` rows, each at position `context`."""
    block = 16
    per_row = context // block + 1
    pool = new_kv_pool(model.shape, streams * per_row + 1, block)
    tables = torch.arange(1, streams * per_row + 1).view(streams, per_row)  # (B, M)
    batch = Batch(
        tokens=torch.ones(streams, 1, dtype=torch.long),
        positions=torch.full((streams, 1), context),
        slots=tables[:, -1] * block + context % block,
        block_tables=tables,
        last=torch.zeros(streams, dtype=torch.long),
    )
    forward(model, pool, batch)  # warm-up: lazy kernels and caches
    times: list[float] = []
    deadline = time.perf_counter() + min_time_s
    while len(times) < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        forward(model, pool, batch)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile(
    runtime: Any,
    tokens: list[int],
    folder: Path,
    reference: torch.Tensor | None,
    min_time_s: float,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The profile of a loaded TextGenerationRuntime, and its logits on `tokens`."""
    logits = text_logits(runtime.model, tokens)
    b1 = decode_step_ms(runtime.model, 1, min_time_s=min_time_s)
    b8 = decode_step_ms(runtime.model, 8, min_time_s=min_time_s)
    out: dict[str, Any] = {
        "size_bytes": _folder_bytes(folder),
        "weight_bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors")),
        "memory_bytes": int(runtime.model.nbytes()),
        "latency_ms_batch1": b1,
        "latency_ms_best": b8,
        "decode_tokens_per_s_1_stream": 1e3 / b1,
        "decode_tokens_per_s_8_streams": 8e3 / b8,
        "perplexity": perplexity_of(logits, tokens),
        "eval_tokens": len(tokens),
    }
    if reference is not None:
        out["agreement"] = agreement(logits, reference)
    return out, logits


def _folder_bytes(folder: Path) -> int:
    """Bytes of the unit's own files (its top level: variants/ holds other units)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
