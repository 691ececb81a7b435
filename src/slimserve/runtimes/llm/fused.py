"""A decode step's layers in C: one call a layer (csrc/layer.c) instead of ~20 torch operations.

With the few-row kernel (qgemv.py), a one-row SmolLM2-135M step spent ~8 ms in matmuls and
attention and ~3 ms in what surrounds them: norms, casts, rotary, residual adds, silu and the
kernel's own Python wrappers, a few microseconds of dispatch each, 30 layers a step. Here each
layer is one ctypes call doing the same arithmetic as decode.py's torch path (the norms'
outputs rounded to bf16 where that path casts, the same int8 quantization of activations, the
same matmul and attention code); what differs is the order of a few fp32 sums (norm
statistics, rotary) and silu's exp (a polynomial: relative error < 2e-7).

Used by decode.forward_step for steps the kernel serves (`qgemv.serves`) of models whose every
layer is plain (decode.supported), with silu gates, all four matmuls held by the kernel and
attention the kernel's (`qgemv.attends`); built once per model, on its first decode step.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from slimserve.runtimes.llm import qgemv
from slimserve.runtimes.llm.model import Batch, LayerWeights, LlamaModel

_P, _I, _L, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_float


class _Layer(ctypes.Structure):
    """csrc/layer.c's `DecodeLayer`."""

    _fields_ = [(name, _P) for name in ("qkv", "o", "gate_up", "down", "qkv_bias")] + [
        ("attn_norm", _P),
        ("mlp_norm", _P),
    ]


class _Step(ctypes.Structure):
    """csrc/layer.c's `DecodeStep`."""

    _fields_ = [
        *[(name, _I) for name in ("rows", "hidden", "inter", "heads", "kv_heads", "hd")],
        ("eps", _F),
        ("scale", _F),
        ("round_bf16", _I),
        ("cache_bf16", _I),
        *[(name, _P) for name in ("cos", "sin", "positions", "slots", "tables")],
        ("width", _I),
        ("bs", _I),
        ("blocks", _L),
        ("scratch", _P),
        ("threads", _I),
    ]


@dataclass(slots=True)
class FusedLayers:
    """The ctypes descriptions of a model's layers, and the fp32 tensors they point into."""

    layers: list[_Layer]
    keep: list[torch.Tensor]  # what the pointers point into
    inter: int


def _kernel_weights(layer: LayerWeights) -> list[qgemv.QLinear] | None:
    found = [getattr(m, "small", None) for m in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    kernels = [m for m in found if isinstance(m, qgemv.QLinear)]
    return kernels if len(kernels) == 4 else None


def build(model: LlamaModel) -> FusedLayers | None:
    """The model's layers for csrc/layer.c, or None where it cannot take them."""
    shape = model.shape
    if shape.activation != "silu" or shape.head_dim % 16 or qgemv.library() is None:
        return None
    layers, keep = [], []
    inter = 0
    for layer in model.layers:
        kernels = _kernel_weights(layer)
        if kernels is None:
            return None
        qkv, o, gate_up, down = kernels
        inter = down.in_features
        tensors = [layer.attn_norm, layer.mlp_norm, layer.qkv_bias]
        attn_norm, mlp_norm, bias = (
            None if t is None else t.detach().float().contiguous() for t in tensors
        )
        assert attn_norm is not None and mlp_norm is not None
        keep += [t for t in (attn_norm, mlp_norm, bias) if t is not None]
        layers.append(
            _Layer(
                *(ctypes.addressof(k.weight_struct) for k in (qkv, o, gate_up, down)),
                None if bias is None else bias.data_ptr(),
                attn_norm.data_ptr(),
                mlp_norm.data_ptr(),
            )
        )
    cos, sin = model.rope
    if cos.dtype != torch.float32 or not (cos.is_contiguous() and sin.is_contiguous()):
        return None
    return FusedLayers(layers, keep, inter)


def plan(model: LlamaModel) -> FusedLayers | None:
    """`build`'s result, made on the model's first decode step and kept on it."""
    if model.fused is None:
        model.fused = build(model) or False
    return model.fused or None


def run_layers(
    fused: FusedLayers, model: LlamaModel, pool: torch.Tensor, batch: Batch, x: torch.Tensor
) -> torch.Tensor:
    """The residual stream x (B, D) fp32 through every layer; returns it (updated in place)."""
    lib = qgemv.library()
    assert lib is not None
    shape = model.shape
    rows = x.shape[0]
    _, _, _, blocks, block_size, _ = pool.shape
    positions = batch.positions.reshape(rows).contiguous()
    slots, tables = batch.slots.contiguous(), batch.block_tables.contiguous()
    cos, sin = model.rope
    step = _Step(
        rows,
        shape.hidden,
        fused.inter,
        shape.heads,
        shape.kv_heads,
        shape.head_dim,
        shape.eps,
        shape.query_scale / shape.head_dim**0.5,
        int(shape.dtype == torch.bfloat16),
        int(pool.dtype == torch.bfloat16),
        cos.data_ptr(),
        sin.data_ptr(),
        positions.data_ptr(),
        slots.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        block_size,
        blocks,
        None,
        qgemv.threads(),
    )
    scratch = qgemv.scratch(lib.qgemv_decode_scratch_bytes(ctypes.byref(step)))
    step.scratch = scratch.data_ptr()
    ref, out = ctypes.byref(step), x.data_ptr()
    for layer, kv in zip(fused.layers, pool, strict=True):
        lib.qgemv_decode_layer(ctypes.byref(layer), ref, kv.data_ptr(), out)
    return x
