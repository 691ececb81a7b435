"""The lean decode step (decode.py) against the general forward: same logits, both layouts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from slimserve.runtimes.llm import TextGenerationRuntime
from slimserve.runtimes.llm.decode import forward_step, supported
from slimserve.runtimes.llm.model import LlamaModel, forward, new_kv_pool
from slimserve.runtimes.llm.sequence import Row, make_batch

LAYOUTS = [
    [[3, 4, 5, 6]],  # one row, consecutive blocks: attends over a view of the pool
    [[5, 2, 8, 10]],  # one row, scattered blocks: the gather path
    [[1, 2, 3, 4], [9, 6, 11, 7]],  # two rows
]


@pytest.mark.parametrize("weights", ["fp32", "bf16"])
def test_decode_step_matches_the_general_forward(tiny_llama_dir: Path, weights: str) -> None:
    model = TextGenerationRuntime.load(tiny_llama_dir, weights=weights).model
    assert supported(model)
    for tables in LAYOUTS:
        check_layout(model, tables, 1e-4 if weights == "fp32" else 0.1)


def check_layout(model: LlamaModel, tables: list[list[int]], tolerance: float) -> None:
    block = 4
    prompts = [list(range(600 + 7 * i, 611 + 7 * i)) for i in range(len(tables))]  # 11 tokens
    pools = [new_kv_pool(model.shape, 12, block) for _ in range(2)]
    for pool in pools:  # the prompts' K/V, through the general forward (prefill)
        forward(
            model,
            pool,
            make_batch([Row(p, 0, t) for p, t in zip(prompts, tables, strict=True)], block),
        )
    for step in range(3):  # then decode steps, one path per pool
        rows = [
            Row(p + [700 + step] * (step + 1), 11 + step, t)
            for p, t in zip(prompts, tables, strict=True)
        ]
        batch = make_batch(rows, block)
        expected = forward(model, pools[0], batch)
        got = forward_step(model, pools[1], batch)
        torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(pools[1], pools[0], rtol=tolerance, atol=tolerance)
