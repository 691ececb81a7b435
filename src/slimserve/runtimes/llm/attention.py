"""Attention over the paged KV cache: one gather per layer and K/V, no per-sequence loops.

The pool of one layer holds K and V head-major: (2, Hkv, num_blocks, block_size, hd). The
indices are computed once per forward (`KvIndex`): each layer does one `index_copy_` per K
and V to write the new tokens (rows of hd values in the (Hkv * num_slots, hd) view) and one
`index_select` per K and V to read each row's blocks (rows of block_size * hd values in the
(Hkv * num_blocks, block_size * hd) view) as a contiguous (B, Hkv, S, hd) tensor, S = M *
block_size, the row's block table in order. Whole blocks, not tokens: 100 against 236 us
per gather at 32 rows x 208 keys.

Why: measured on the issue's 2-core EPYC, one thread, SmolLM2-135M decoding 32 rows at
context 192, per forward: advanced indexing of (B, M) blocks out of a token-major pool and
`scaled_dot_product_attention` with grouped-query expansion took 35 + 35 ms of a 146 ms step.
Decode (one query per row) is two batched matmuls on views here; prefill (T > 1) keeps
`scaled_dot_product_attention` (flash attention on the CPU: no T x S score matrix per head).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from slimserve.runtimes.llm import qgemv


@dataclass(frozen=True, slots=True)
class KvIndex:
    """One forward's indices into a layer's K (or V) pool: `write` into its (Hkv * num_slots,
    hd) view, `read` from its (Hkv * num_blocks, block_size * hd) view."""

    write: torch.Tensor  # (B * T * Hkv,) int64: the new tokens' rows, token-major
    read: torch.Tensor  # (B * Hkv * M,) int64: each row's blocks, head by head, in table order
    mask: torch.Tensor  # decode: (B, 1, 1, S) additive fp32 (0 / -inf); prefill: (B, 1, T, S) bool
    rows: int  # B
    keys: int  # S
    # A prefill whose every row starts at position 0 (no cached prefix): each row's keys are
    # exactly its new tokens, so it can attend causally over them (`attend_new`), no gather.
    fresh: bool = False
    # A prefill's (T > 1) new tokens as rows of their own for the C attention (`attend_c`):
    # each one's slot (B * T,), its row's block table (B * T, M), its position (B * T,), int64.
    token_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


def kv_index(
    slots: torch.Tensor,
    block_tables: torch.Tensor,
    positions: torch.Tensor,
    pool_shape: torch.Size,
) -> KvIndex:
    """The per-forward indices for a pool of shape (layers, 2, Hkv, num_blocks, bs, hd)."""
    kv_heads, num_blocks, block_size = pool_shape[2], pool_shape[3], pool_shape[4]
    num_slots = num_blocks * block_size
    head_base = torch.arange(kv_heads) * num_slots  # (Hkv,) first row of each head
    write = (slots[:, None] + head_base[None, :]).view(-1)
    rows, count = block_tables.shape
    keys = count * block_size
    head_blocks = torch.arange(kv_heads) * num_blocks  # (Hkv,) first block row of each head
    read = (block_tables[:, None, :] + head_blocks[None, :, None]).view(-1)  # (B, Hkv, M)
    fresh = positions.shape[1] > 1 and not bool(positions[:, 0].any())
    token_rows = None
    if positions.shape[1] > 1:
        tables = block_tables.repeat_interleave(positions.shape[1], 0)
        token_rows = (slots.contiguous(), tables, positions.reshape(-1).contiguous())
    return KvIndex(write, read, _mask(positions, keys), rows, keys, fresh, token_rows)


def with_window(index: KvIndex, positions: torch.Tensor, window: int) -> KvIndex:
    """`index` for a sliding-window layer: a query at p sees keys in (p - window, p], as
    transformers' sliding-window mask (Mistral, Phi-3, Gemma-2's local layers)."""
    mask = _mask(positions, index.keys, window)
    return dataclasses.replace(index, mask=mask, fresh=False, token_rows=None)


def _mask(positions: torch.Tensor, keys: int, window: int | None = None) -> torch.Tensor:
    """Decode: (B, 1, 1, S) additive fp32 (0 / -inf); prefill: (B, 1, T, S) bool."""
    key_pos = torch.arange(keys)[None, None, None, :]
    query_pos = positions[:, None, :, None]
    allowed = key_pos <= query_pos  # (B, 1, T, S)
    if window is not None:
        allowed &= key_pos > query_pos - window
    if positions.shape[1] == 1:
        return torch.zeros(allowed.shape).masked_fill_(~allowed, -math.inf)
    return allowed


def new_kv_pool(
    layers: int,
    kv_heads: int,
    head_dim: int,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """K and V for every layer: (layers, 2, kv_heads, num_blocks, block_size, head_dim)."""
    dims = (layers, 2, kv_heads, num_blocks, block_size, head_dim)
    return torch.zeros(dims, dtype=dtype)


def write_kv(kv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: KvIndex) -> None:
    """Store the new tokens' K and V, (B, T, Hkv, hd) each, in one layer's pool (2, Hkv, ...)."""
    head_dim = kv.shape[-1]
    flat = kv.view(2, -1, head_dim)  # (2, Hkv * num_slots, hd)
    flat[0].index_copy_(0, index.write, k.reshape(-1, head_dim))
    flat[1].index_copy_(0, index.write, v.reshape(-1, head_dim))


def attend(
    q: torch.Tensor, kv: torch.Tensor, index: KvIndex, softcap: float | None = None
) -> torch.Tensor:
    """q (B, T, H, hd) with rotary applied -> attention output (B, T, H * hd).

    `softcap` (Gemma-2): scores -> c * tanh(scores / c) before the mask and softmax.

    Why no K/V cache kept gathered across decode steps (tried): a persistent copy of the
    running rows' K/V (236 MiB in bf16 for 32 rows of 256 tokens) made a 32-row SmolLM2
    decode step slower, 65 against 57 ms: probably because a fresh gather leaves each
    layer's keys in the L3 cache for the matmuls that follow, and the copy is read from DRAM."""
    rows, new, heads, head_dim = q.shape
    keys, values = _gather(kv, index.read, (index.rows, kv.shape[1], index.keys, head_dim))
    if new == 1 and rows == 1 and softcap is None:
        return _decode_one(q, keys, values, index.mask).view(1, 1, heads * head_dim)
    if new == 1:
        out = _decode(q, keys, values, index.mask, softcap)
        return out.view(rows, 1, heads * head_dim)
    if softcap is not None:  # scaled_dot_product_attention has no soft-capping
        return _capped(q, keys, values, index.mask, softcap).reshape(rows, new, heads * head_dim)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys, values, attn_mask=index.mask, enable_gqa=keys.shape[1] != heads
    )  # (B, H, T, hd)
    return out.transpose(1, 2).reshape(rows, new, heads * head_dim)


def attend_new(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A prefill without cached prefix (`KvIndex.fresh`): q (B, T, H, hd), the rows' own new
    k and v (B, T, Hkv, hd) -> (B, T, H * hd), causal. Rows are right-padded, so a real query
    sees only its row's real tokens; the padding's outputs are never read. The same result as
    `attend` (the gathered blocks hold these keys, masked the same way) without the K/V gather
    and the (B, 1, T, S) mask. Where the block tables hold just the prompts (S = T rounded up
    to a block: the engine's prefill) the time is the same (SmolLM2-135M, 17 x 120 tokens, one
    thread: 2.8 s either way); where they are longer it is less (S = 272: 6.4 against 12.7 ms
    a layer at two threads), since the masked keys still cost."""
    rows, new, heads, head_dim = q.shape
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        is_causal=True,
        enable_gqa=k.shape[2] != heads,
    )  # (B, H, T, hd)
    return out.transpose(1, 2).reshape(rows, new, heads * head_dim)


def attend_c(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, index: KvIndex
) -> torch.Tensor:
    """A prefill's attention through the C kernel (qgemv.attend_rows): each new token a row
    over its row's block table up to its own position (a cached prefix included), softmax in
    fp32; the new tokens' K/V are written to the pool first (in C: no write_kv). The decode
    steps' attention is the same code, so a prompt computed whole, or in part after a cached
    prefix, gives the same K/V and first token (tests/runtimes/test_generation.py). A fresh
    prefill of 16 SmolLM2 prompts of 120 tokens, two threads, 30 layers: 223 ms against 272
    for torch's flash attention (small tiles: ~10 GFLOP/s), the whole prefill 1394 against
    1468 ms (benchmarks/RESULTS.md, issue 14, session 6). Returns (B, T, H * hd) in q's
    dtype."""
    assert index.token_rows is not None
    slots, tables, positions = index.token_rows
    rows, new, heads, head_dim = q.shape
    flat = rows * new
    out = qgemv.attend_rows(
        q.reshape(flat, heads, head_dim),
        k.reshape(flat, -1, head_dim),
        v.reshape(flat, -1, head_dim),
        kv,
        slots,
        tables,
        positions,
        1.0 / math.sqrt(head_dim),
    )
    return out.view(rows, new, heads * head_dim).to(q.dtype)


def _gather(
    kv: torch.Tensor, read: torch.Tensor, shape: tuple[int, int, int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's blocks as contiguous keys and values, `shape` (B, Hkv, S, hd) each."""
    flat = kv.view(2, kv.shape[1] * kv.shape[2], -1)  # (2, Hkv * num_blocks, bs * hd)
    return flat[0].index_select(0, read).view(shape), flat[1].index_select(0, read).view(shape)


def _decode_one(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """One row, one query: torch's fused CPU attention over the G query heads of each K/V
    head. Measured (2-core EPYC, one thread, bf16, 208 keys, SmolLM2's heads): 41 us against
    79 for the two batched matmuls; at 8 rows and more it is the slower one (260 against 155)."""
    rows, _, heads, head_dim = q.shape
    grouped = q.view(rows, keys.shape[1], heads // keys.shape[1], head_dim)  # (1, Hkv, G, hd)
    return F.scaled_dot_product_attention(grouped, keys, values, attn_mask=bias.to(q.dtype))


def _decode(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """One query per row: q (B, 1, H, hd); keys, values (B, Hkv, S, hd) -> (B, Hkv, G, hd).

    Query head h reads K/V head h // G (G = H / Hkv), as transformers' repeat_kv does, so the
    queries of one K/V head are G consecutive heads: a view, not an expanded copy of K/V.
    """
    rows, _, heads, head_dim = q.shape
    grouped = q.view(rows, keys.shape[1], heads // keys.shape[1], head_dim)  # (B, Hkv, G, hd)
    scores = torch.matmul(grouped, keys.transpose(2, 3)).float()  # (B, Hkv, G, S)
    scores.mul_(1.0 / math.sqrt(head_dim))  # softmax in fp32 whatever the KV dtype
    if softcap is not None:
        scores = torch.tanh(scores / softcap).mul_(softcap)
    scores.add_(bias)
    return torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)


def _capped(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: torch.Tensor, cap: float
) -> torch.Tensor:
    """Prefill with soft-capped scores, spelled out: q (B, T, H, hd), keys and values
    (B, Hkv, S, hd), allowed (B, 1, T, S) bool -> (B, T, H, hd). Materializes the (B, H, T, S)
    scores, which only the soft-capped families (Gemma-2) pay for."""
    group = q.shape[2] // keys.shape[1]
    keys, values = keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1)
    scores = torch.matmul(q.transpose(1, 2), keys.transpose(2, 3)).float()  # (B, H, T, S)
    scores = torch.tanh(scores / (cap * math.sqrt(q.shape[-1]))).mul_(cap)
    scores.masked_fill_(~allowed, -math.inf)
    out = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)  # (B, H, T, hd)
    return out.transpose(1, 2)
