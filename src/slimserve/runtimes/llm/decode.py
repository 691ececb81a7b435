"""The decode step (one new token per row) with few torch operations per layer.

A one-row SmolLM2-135M step multiplies ~100 MB of int4 weights, a few milliseconds of memory
traffic, and runs ~60 small torch operations in each of its 30 layers (norm statistics,
rotary halves, dtype casts, views, K/V writes and gathers); each costs microseconds of Python
and dispatch, so the small operations, not the weights, set the step's time at one row and
weigh heavily at eight (benchmarks/RESULTS.md, "issue 14, session 3": the profile). This
path does the same arithmetic as model.forward in about half the operations:

- the norms through torch's fused `rms_norm` (statistics in fp32 as before);
- rotary embedding as one batched matmul per layer: each row's rotation (cos on the diagonal,
  +-sin on the half-swapped positions) is a (hd, hd) matrix built once per step, applied to
  the query and key heads together;
- a single row whose block table is a run of consecutive blocks (the usual case: the
  allocator hands blocks out in order) reads its keys and values as a view of the pool,
  exactly the positions written so far: no gather, no mask;
- no (B, T) padding: the residual stream is (B, D).

Families with per-head norms, soft-capping, sliding windows or sandwich norms take
model.forward (`supported`); both paths give the same logits up to rounding (tests compare
engine output with transformers' generate() in fp32).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from slimserve.runtimes.llm import attention, fused, qgemv
from slimserve.runtimes.llm.model import (
    _ACTIVATIONS,
    Batch,
    LayerWeights,
    LlamaModel,
    LlamaShape,
    forward,
)


def supported(model: LlamaModel) -> bool:
    """Whether this path computes the model exactly as model.forward does."""
    shape = model.shape
    plain = shape.attn_softcap is None and shape.logit_softcap is None
    plain = plain and model.local_rope is None
    return plain and all(_plain_layer(layer) for layer in model.layers)


def _plain_layer(layer: LayerWeights) -> bool:
    extras = (layer.post_attn_norm, layer.post_mlp_norm, layer.q_norm, layer.k_norm)
    return layer.window is None and all(t is None for t in extras)


@torch.inference_mode()
def forward_step(
    model: LlamaModel, pool: torch.Tensor, batch: Batch, fast: bool | None = None
) -> torch.Tensor:
    """Logits (B, V) of each row's last token: this path for decode steps of supported
    models (`fast`: whether the model is, cached by the caller), model.forward otherwise."""
    if fast is None:
        fast = supported(model)
    if not fast or batch.tokens.shape[1] != 1:
        return forward(model, pool, batch)
    with qgemv.decoding():
        if qgemv.serves(batch.tokens.shape[0]):  # the few-row kernel takes the cores
            with qgemv.owning_cores():
                return _decode(model, pool, batch)
        return _decode(model, pool, batch)


def forward_rows(model: LlamaModel, pool: torch.Tensor, batch: Batch) -> torch.Tensor | None:
    """Every new token's logits (B, T, V), each token a decode row of its own through the C
    layers (fused.py), or None where they do not serve both B and B * T rows.

    A verification of drafted tokens (speculate.py) this way gives, bit for bit, the logits
    plain decoding would: each row of a C step is computed independently of the rows beside
    it (per-row int8 activations, integer dot products, per-row attention; tested), and a
    sequence's rows write their K/V before any of them attends, so the row at position p sees
    the keys plain decoding would have written by then. model.forward (bf16 matmuls over the
    whole block) can differ from decoding at near ties."""
    rows, new = batch.tokens.shape
    count = rows * new
    # plain decoding of these rows must take the C layers too, or the logits could differ
    if not supported(model) or any(_c_layers(model, pool, n) is None for n in (rows, count)):
        return None
    tokens = Batch(
        batch.tokens.reshape(count, 1),
        batch.positions.reshape(count, 1),
        batch.slots,
        batch.block_tables.repeat_interleave(new, 0),
        torch.zeros(count, dtype=torch.int64),
    )
    return forward_step(model, pool, tokens, True).view(rows, new, -1)


def rotations(tables: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor) -> torch.Tensor:
    """(B, hd, hd): x @ R[b] == x * cos + rotate_half(x) * sin at row b's position."""
    cos, sin = tables[0][positions], tables[1][positions]  # (B, hd)
    half = cos.shape[-1] // 2
    eye = torch.eye(cos.shape[-1])
    # rotate_half(x)[k] = -x[k + half] (k < half), x[k - half] (k >= half): x @ swap
    swap = torch.roll(eye, half, dims=1)
    swap[half:] *= -1
    return eye * cos[:, None, :] + swap * sin[:, None, :]


def _c_layers(model: LlamaModel, pool: torch.Tensor, rows: int) -> fused.FusedLayers | None:
    """The model's C layers where they serve a decode step of `rows` rows over `pool`."""
    if not (qgemv.serves(rows) and qgemv.attends(pool, model.shape.head_dim)):
        return None
    return fused.plan(model)


def _decode(model: LlamaModel, pool: torch.Tensor, batch: Batch) -> torch.Tensor:
    shape = model.shape
    x = model.embed[batch.tokens.view(-1)]  # (B, D) fp32
    if shape.embed_scale != 1.0:
        x = x * shape.embed_scale
    c_layers = _c_layers(model, pool, x.shape[0])
    if c_layers is not None:  # every layer in one C call each (fused.py)
        x = fused.run_layers(c_layers, model, pool, batch, x.float().contiguous())
    else:
        x = _torch_layers(model, pool, batch, x)
    norm = F.rms_norm(x, (shape.hidden,), model.norm, shape.eps)
    return model.lm_head(norm.to(shape.dtype)).float()


def _torch_layers(
    model: LlamaModel, pool: torch.Tensor, batch: Batch, x: torch.Tensor
) -> torch.Tensor:
    """The residual stream x (B, D) through every layer, torch around the matmuls."""
    shape = model.shape
    rows = x.shape[0]
    heads, kvh, hd, eps = shape.heads, shape.kv_heads, shape.head_dim, shape.eps
    norm_shape = (shape.hidden,)
    dtype = shape.dtype
    rotate = rotations(model.rope, batch.positions.view(-1))
    run = _consecutive(batch)
    # One row over consecutive blocks, or any number of rows over their block tables: the C
    # kernel's attention where it is built (no gathers); torch's otherwise. Past the kernel's
    # matmul rows too: a 32-row SmolLM2 step, one thread, 165.6 -> 139.8 ms CPU (RESULTS.md,
    # issue 14, session 5, many streams).
    in_c = qgemv.attends(pool, hd)
    direct = run is not None and in_c
    index = None if run is not None or in_c else _index(batch, pool)
    scale = shape.query_scale / math.sqrt(hd)
    activation = _ACTIVATIONS[shape.activation]
    for kv, layer in zip(pool, model.layers, strict=True):
        h = F.rms_norm(x, norm_shape, layer.attn_norm, eps).to(dtype)
        qkv = layer.qkv(h)
        if layer.qkv_bias is not None:
            qkv = qkv + layer.qkv_bias
        qkv = qkv.view(rows, heads + 2 * kvh, hd)
        # rotary in fp32 (a small bf16 bmm takes 6x as long on the CPU)
        rotated = torch.bmm(qkv[:, : heads + kvh].float(), rotate)  # (B, H + Hkv, hd) fp32
        if direct:
            assert run is not None
            first, keys = run[0] * kv.shape[3], run[1]
            q1, k1, v1 = rotated[0, :heads], rotated[0, heads:], qkv[0, heads + kvh :]
            out = qgemv.attend_one(q1, k1, v1, kv, first, keys, scale)
        elif in_c:
            q, k, v = rotated[:, :heads], rotated[:, heads:], qkv[:, heads + kvh :]
            tables, positions = batch.block_tables, batch.positions
            out = qgemv.attend_rows(q, k, v, kv, batch.slots, tables, positions, scale)
        else:
            out = _attend_torch(shape, rotated, qkv, kv, run, index)
        x = x + layer.o(out.reshape(rows, heads * hd))
        h = F.rms_norm(x, norm_shape, layer.mlp_norm, eps).to(dtype)
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
        x = x + layer.down(activation(gate).mul_(up))
    return x


def _attend_torch(
    shape: LlamaShape,
    rotated: torch.Tensor,
    qkv: torch.Tensor,
    kv: torch.Tensor,
    run: tuple[int, int] | None,
    index: attention.KvIndex | None,
) -> torch.Tensor:
    """Write K/V and attend with torch: rotated (B, H + Hkv, hd) fp32, qkv (B, H + 2 Hkv,
    hd) -> (B, H, hd) or (B, 1, H * hd) in the pool's dtype."""
    heads, kvh, hd = shape.heads, shape.kv_heads, shape.head_dim
    qk, qkv = rotated.to(kv.dtype), qkv.to(kv.dtype)
    q = qk[:, :heads]
    if shape.query_scale != 1.0:
        q = q * shape.query_scale
    k, v = qk[:, heads:], qkv[:, heads + kvh :]
    if run is not None:
        return _attend_run(q, k, v, kv, run)
    assert index is not None
    attention.write_kv(kv, k, v, index)
    return attention.attend(q.view(q.shape[0], 1, heads, hd), kv, index)


def _consecutive(batch: Batch) -> tuple[int, int] | None:
    """(first slot, keys) when the batch is one row whose blocks are consecutive."""
    if batch.tokens.shape[0] != 1:
        return None
    table = batch.block_tables[0]
    count = table.shape[0]
    first = int(table[0])
    if count > 1 and not bool((table[1:] - table[:-1] == 1).all()):
        return None
    return first, int(batch.positions[0, 0]) + 1


def _index(batch: Batch, pool: torch.Tensor) -> attention.KvIndex:
    return attention.kv_index(batch.slots, batch.block_tables, batch.positions, pool.shape)


def _attend_run(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: torch.Tensor, run: tuple[int, int]
) -> torch.Tensor:
    """One row, consecutive blocks: write the new K/V at its slot, attend over a view of the
    pool holding exactly the row's positions so far. q (1, H, hd) -> (1, H, hd)."""
    first_block, keys = run
    _, kv_heads, blocks, block_size, hd = kv.shape
    flat = kv.view(2, kv_heads, blocks * block_size, hd)
    start = first_block * block_size
    cache = flat[:, :, start : start + keys]  # (2, Hkv, S, hd)
    cache[:, :, keys - 1] = torch.stack([k[0], v[0]])
    grouped = q.view(1, kv_heads, -1, hd)  # (1, Hkv, G, hd): query heads of each K/V head
    out = F.scaled_dot_product_attention(grouped, cache[0][None], cache[1][None])
    return out.view(1, -1, hd)
