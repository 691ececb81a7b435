"""A prefill without cached prefix attends over its own new keys (attention.attend_new): the
same output as the general path, which gathers the rows' blocks from the pool under a mask."""

from __future__ import annotations

import pytest
import torch

from slimserve.runtimes.llm import attention, qgemv
from slimserve.runtimes.llm.sequence import Row, make_batch

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 6, 2, 16, 4


def _fresh_and_gathered(lengths: list[int], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Both paths' outputs for right-padded rows of `lengths` tokens, all from position 0,
    and which positions are real."""
    torch.manual_seed(0)
    width, blocks = max(lengths), -(-max(lengths) // BLOCK)
    rows = [
        Row(list(range(n)), 0, list(range(1 + i * blocks, 1 + (i + 1) * blocks)))
        for i, n in enumerate(lengths)
    ]
    batch = make_batch(rows, BLOCK)
    kv = attention.new_kv_pool(1, KV_HEADS, HEAD_DIM, 1 + blocks * len(rows), BLOCK, dtype)[0]
    index = attention.kv_index(batch.slots, batch.block_tables, batch.positions, kv[None].shape)
    q = torch.randn(len(rows), width, HEADS, HEAD_DIM).to(dtype)
    k = torch.randn(len(rows), width, KV_HEADS, HEAD_DIM).to(dtype)
    v = torch.randn(len(rows), width, KV_HEADS, HEAD_DIM).to(dtype)
    attention.write_kv(kv, k, v, index)
    real = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    fresh = attention.attend_new(q, k, v)
    gathered = attention.attend(q, kv, index)
    in_c = attention.attend_c(q, k, v, kv, index) if qgemv.attends(kv, HEAD_DIM) else fresh
    return fresh, gathered, real, torch.tensor(index.fresh), in_c


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_prefill_equals_the_gathered_path(dtype: torch.dtype) -> None:
    fresh, gathered, real, is_fresh, _ = _fresh_and_gathered([7, 3, 12, 1], dtype)
    assert bool(is_fresh)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        fresh[real].float(), gathered[real].float(), atol=tolerance, rtol=tolerance
    )


@pytest.mark.skipif(not qgemv.available(), reason="no AVX-512 VNNI or compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_prefill_in_c_equals_the_gathered_path(dtype: torch.dtype) -> None:
    """Each new token a row of the C attention over its row's blocks up to itself."""
    _, gathered, real, _, in_c = _fresh_and_gathered([7, 3, 12, 1, 30], dtype)
    assert in_c.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        in_c[real].float(), gathered[real].float(), atol=tolerance, rtol=tolerance
    )


def test_a_row_with_a_cached_prefix_or_a_decode_step_is_not_fresh() -> None:
    positions = torch.tensor([[0, 1, 2], [4, 5, 6]])  # the second row starts at 4
    tables = torch.tensor([[1, 2], [3, 4]])
    slots = torch.arange(6)
    shape = torch.Size((1, 2, KV_HEADS, 8, BLOCK, HEAD_DIM))
    assert not attention.kv_index(slots, tables, positions, shape).fresh
    one = torch.tensor([[0], [0]])  # one new token per row: a decode step, never fresh
    assert not attention.kv_index(slots[:2], tables, one, shape).fresh
    index = attention.kv_index(slots, tables, torch.tensor([[0, 1, 2], [0, 1, 0]]), shape)
    assert index.fresh
    assert not attention.with_window(index, torch.tensor([[0, 1, 2], [0, 1, 0]]), 2).fresh
