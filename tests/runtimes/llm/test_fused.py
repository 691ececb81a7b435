"""A decode step's layers in C (fused.py, csrc/layer.c): the same step as decode.py's torch
path within rounding, each row's result independent of the rows beside it, and the torch path
wherever the C layers cannot take the model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from slimserve.runtimes.llm import TextGenerationRuntime, fused, qgemv  # noqa: E402
from slimserve.runtimes.llm.decode import forward_step  # noqa: E402
from slimserve.runtimes.llm.model import LlamaModel, forward, new_kv_pool  # noqa: E402
from slimserve.runtimes.llm.sequence import Row, make_batch  # noqa: E402

needs_kernel = pytest.mark.skipif(not qgemv.available(), reason="no AVX-512 VNNI or compiler")
BLOCK = 4
LAYOUTS = [
    [[3, 4, 5, 6]],  # one row, consecutive blocks
    [[5, 2, 8, 10]],  # one row, scattered blocks
    [[1, 2, 3, 4], [9, 6, 11, 7], [12, 13, 14, 15]],  # three rows
]


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path) -> LlamaModel:
    return TextGenerationRuntime.load(tiny_llama_dir, weights="bf16+int4").model


def prompts(count: int) -> list[list[int]]:
    return [list(range(600 + 7 * i, 611 + 7 * i)) for i in range(count)]


def prefilled(model: LlamaModel, texts: list[list[int]], tables: list[list[int]]) -> torch.Tensor:
    """A pool holding the prompts' K/V (through the general forward)."""
    pool = new_kv_pool(model.shape, 16, BLOCK)
    rows = [Row(p, 0, t) for p, t in zip(texts, tables, strict=True)]
    forward(model, pool, make_batch(rows, BLOCK))
    return pool


def decode(
    model: LlamaModel,
    pool: torch.Tensor,
    texts: list[list[int]],
    tables: list[list[int]],
    step: int,
    c: bool,
) -> torch.Tensor:
    """One decode step (each prompt plus `step` + 1 new tokens), through C or torch."""
    rows = [
        Row(p + [700 + step] * (step + 1), len(p) + step, t)
        for p, t in zip(texts, tables, strict=True)
    ]
    model.fused = None if c else False
    try:
        logits: torch.Tensor = forward_step(model, pool, make_batch(rows, BLOCK))
        return logits
    finally:
        if not c:
            model.fused = None


@needs_kernel
@pytest.mark.parametrize("tables", LAYOUTS)
def test_c_layers_match_the_torch_decode_step(model: LlamaModel, tables: list[list[int]]) -> None:
    assert fused.plan(model) is not None
    texts = prompts(len(tables))
    pools = [prefilled(model, texts, tables) for _ in range(2)]
    for step in range(3):
        expected = decode(model, pools[0], texts, tables, step, c=False)
        got = decode(model, pools[1], texts, tables, step, c=True)
        assert isinstance(model.fused, fused.FusedLayers)  # the C layers ran
        # int8 activations and bf16 casts on both sides: rounding may land a step apart
        torch.testing.assert_close(got, expected, rtol=0.05, atol=0.05)
        assert torch.equal(got.argmax(-1), expected.argmax(-1))
        torch.testing.assert_close(pools[1], pools[0], rtol=0.05, atol=0.05)


@needs_kernel
def test_each_rows_result_is_independent_of_the_rows_beside_it(model: LlamaModel) -> None:
    """Three rows in one C step give, bit for bit, what each gives alone (per-row int8
    activations, integer dot products, the same attention code): what lets a verification
    of several draft tokens reproduce plain decoding."""
    texts, tables = prompts(3), LAYOUTS[2]
    together = prefilled(model, texts, tables)
    alone = [prefilled(model, [p], [t]) for p, t in zip(texts, tables, strict=True)]
    for step in range(3):
        rows = decode(model, together, texts, tables, step, c=True)
        for i, pool in enumerate(alone):
            one = decode(model, pool, [texts[i]], [tables[i]], step, c=True)
            assert torch.equal(one[0], rows[i]), (step, i)


@needs_kernel
def test_models_the_c_layers_do_not_take_use_torch(model: LlamaModel) -> None:
    gelu = dataclasses.replace(model, shape=dataclasses.replace(model.shape, activation="gelu"))
    gelu.fused = None
    assert fused.build(gelu) is None
    with qgemv.switched_off():
        assert fused.build(model) is None


@pytest.mark.parametrize("lengths", [(4, 3), (4, 4), (7, 3), (2, 9)])
def test_a_prompt_prefills_the_same_alone_or_beside_another(
    model: LlamaModel, lengths: tuple[int, int]
) -> None:
    """Its first token's logits and its K/V, bit for bit, whatever else is in the batch
    (the matmuls of every prefill take one path whatever its rows)."""
    a, b = (list(range(start, start + n)) for start, n in zip((100, 200), lengths, strict=True))
    together, alone = new_kv_pool(model.shape, 16, BLOCK), new_kv_pool(model.shape, 16, BLOCK)
    both = forward(model, together, make_batch([Row(a, 0, [1, 2, 5]), Row(b, 0, [3, 4, 6])], BLOCK))
    one = forward(model, alone, make_batch([Row(a, 0, [1, 2, 5])], BLOCK))
    assert torch.equal(both[0], one[0])
    assert torch.equal(together[:, :, :, [1, 2, 5]], alone[:, :, :, [1, 2, 5]])
