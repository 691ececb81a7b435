"""Language-model weights quantized ahead of time (by `slimserve optimize`), and their loading.

A quantized variant is a transformers folder (config.json, tokenizer files) whose
model.safetensors holds, under the transformers weight names:
  NAME.q (int8, N x K) + NAME.scale (fp32, N)       int8, symmetric, one scale per row
  NAME.q4 (uint8, N x K/2) + NAME.scale, NAME.low   int4, two per byte, fp16 per group (qmath)
and the norms as fp32. The embedding table is always int8 per row (it is also the tied head's
weight, and int8 per output channel of the head is int8 per row of the table); in the int4
scheme the head stays int8 too (the logits are the most sensitive matmul). The header's
metadata `slimserve_quant` (JSON) says which scheme: the loader needs nothing else, and never
re-rounds int8 weights, so the served model is exactly the one optimize measured.

int4 compute (metadata `int4_compute`), measured on the issue's 2-core EPYC, one thread,
SmolLM2-135M, group 32 (benchmarks/RESULTS.md, "Quantized LM variants"; a shared, noisy machine):
  int8    dequantize once at load, requantize per channel to int8 for the int8 matmul
          (Int8Linear), the down projection in bf16 as int8's: int8's speed and resident
          memory (275 MB; 45-52 tok/s at 1 stream, 156-163 at 8 in two runs, fp32 22-37 and
          86-158), int4's size on disk (default);
  unpack  keep the packed bytes resident and rebuild each weight per call (quant4.Int4Linear):
          208 MB resident (the fp32 embedding table is 113 MB of it), but 5-6 tok/s at 1
          stream and 23-26 at 8: unpacking a weight costs ~15x the matmul it feeds (1.6 ms
          against 0.1 ms for a 576 -> 3072 layer at one row).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slimserve.errors import InvalidArgument, ModelLoadError
from slimserve.runtimes.llm.model import (
    LayerWeights,
    Linear,
    LlamaModel,
    bf16_linear,
    compute_dtype,
    rope_tables,
    shape_of,
)
from slimserve.runtimes.llm.quant import Int8Linear, prequantized_int8, quantize_per_channel
from slimserve.runtimes.llm.quant4 import Int4Linear
from slimserve.runtimes.qmath import dequantize_int4_affine, quantize_int4_affine

METADATA_KEY = "slimserve_quant"
SCHEMES = ("int8", "int8-weight-only", "int4")
INT4_COMPUTE = ("int8", "unpack")
EMBED = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
# The matmul weights of one decoder layer, by the role of their fused matmul (model.py).
_ATTN, _MLP = "self_attn.", "mlp."
ROLES = {
    "qkv": [_ATTN + "q_proj", _ATTN + "k_proj", _ATTN + "v_proj"],
    "o": [_ATTN + "o_proj"],
    "gate_up": [_MLP + "gate_proj", _MLP + "up_proj"],
    "down": [_MLP + "down_proj"],
}


def is_layer_linear(name: str) -> bool:
    return name.endswith(".weight") and any(
        name.endswith(f".{p}.weight") for parts in ROLES.values() for p in parts
    )


# --- writing (optimize) ---------------------------------------------------------------------


def check_group(state: dict[str, torch.Tensor], group: int) -> None:
    """Refuse a group size that does not divide every layer's input width, naming ones that do."""
    widths = sorted({int(t.shape[1]) for n, t in state.items() if is_layer_linear(n)})
    bad = [w for w in widths if w % group]
    if bad:
        fits = [g for g in (32, 64, 128) if all(w % g == 0 for w in widths)]
        fix = f"use group={' or '.join(map(str, fits))}" if fits else "use the int8 recipe"
        raise InvalidArgument(
            f"int4 group size {group} does not divide the input width {bad[0]} of this "
            f"model's layers (widths {widths}); {fix}"
        )


def quantize_state(
    state: dict[str, torch.Tensor], scheme: str, group: int | None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and safetensors metadata of the quantized artifact."""
    if scheme not in SCHEMES:
        raise InvalidArgument(f"scheme {scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "int4":
        if group is None:
            raise InvalidArgument("int4 needs a group size, e.g. int4:group=32")
        check_group(state, group)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if scheme == "int4" and is_layer_linear(name):
            packed, scale, low = quantize_int4_affine(tensor.float(), int(group or 0))
            out |= {f"{name}.q4": packed, f"{name}.scale": scale, f"{name}.low": low}
        elif is_layer_linear(name) or name in (EMBED, HEAD):
            q, scale = quantize_per_channel(tensor.float())
            out |= {f"{name}.q": q, f"{name}.scale": scale}
        else:
            out[name] = tensor.float().contiguous()
    meta = {"scheme": scheme, "group_size": group, "int4_compute": "int8", "format": 1}
    return out, {METADATA_KEY: json.dumps(meta)}


# --- reading (the generation runtime) ---------------------------------------------------------


def read_format(folder: Path) -> dict[str, Any] | None:
    """The quantization metadata of a folder's weights, or None for plain float weights."""
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            text = (handle.metadata() or {}).get(METADATA_KEY)
        if text:
            return _check_meta(file, json.loads(text))
    return None


def _check_meta(file: Path, meta: dict[str, Any]) -> dict[str, Any]:
    if meta.get("scheme") not in SCHEMES or meta.get("int4_compute", "int8") not in INT4_COMPUTE:
        raise ModelLoadError(
            f"{file}: quantization {meta} is not one this slimserve reads ({', '.join(SCHEMES)}); "
            "make the variant again with `slimserve optimize`"
        )
    return meta


def build_quantized(
    config: Any, state: dict[str, torch.Tensor], meta: dict[str, Any], int4_compute: str | None
) -> LlamaModel:
    """Our Llama forward from a quantized state dict (see the module docstring)."""
    get = _getter(state)
    scheme = str(meta["scheme"])
    compute = int4_compute or str(meta.get("int4_compute", "int8"))
    if compute not in INT4_COMPUTE:
        raise InvalidArgument(f"int4_compute={compute!r} is not one of {', '.join(INT4_COMPUTE)}")
    # Dynamic int8 (and int4 computed as int8) runs attention and the KV cache in bf16 where
    # the CPU has it, as `weights: int8` does; weight-only and unpacked int4 stay fp32.
    fast = scheme == "int8" or (scheme == "int4" and compute == "int8")
    dtype = compute_dtype("int8") if fast else torch.float32
    shape = dataclasses.replace(shape_of(config), dtype=dtype)
    if shape.family != "llama":  # the layers below are Llama's, nothing more
        raise ModelLoadError(
            f"quantized {shape.family} variants are not supported yet (llama ones are); "
            "serve the original with `weights: int8` in model.yaml instead"
        )
    make = _layer_maker(get, scheme, compute)
    layers = [_layer(get, make, f"model.layers.{i}.") for i in range(shape.layers)]
    embed_q, embed_scale = get(EMBED + ".q"), get(EMBED + ".scale")
    head = HEAD if HEAD + ".q" in state else EMBED  # tied embeddings: the table is the head
    mode = "weight-only" if scheme == "int8-weight-only" else "dynamic"
    lm_head = prequantized_int8(get(head + ".q"), get(head + ".scale"), "lm_head", mode)
    embed = embed_q.float() * embed_scale[:, None]  # (V, D) fp32: a gather, not a matmul
    norm = get("model.norm.weight").float()
    return LlamaModel(shape, embed, layers, norm, lm_head, rope_tables(shape))


def _getter(state: dict[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ModelLoadError(f"weight {name} missing: not a quantized LlamaForCausalLM")
        return state[name]

    return get


MakeRole = Callable[[list[str], str], Linear]


def _layer(get: Callable[[str], torch.Tensor], make: MakeRole, prefix: str) -> LayerWeights:
    linears = {
        role: make([prefix + p + ".weight" for p in parts], role) for role, parts in ROLES.items()
    }
    return LayerWeights(
        attn_norm=get(prefix + "input_layernorm.weight").float(),
        mlp_norm=get(prefix + "post_attention_layernorm.weight").float(),
        qkv=linears["qkv"],
        o=linears["o"],
        gate_up=linears["gate_up"],
        down=linears["down"],
    )


def _layer_maker(get: Callable[[str], torch.Tensor], scheme: str, compute: str) -> MakeRole:
    """Each fused matmul from its parts, concatenated along the output rows (N): per-row and
    per-group quantization make that exact."""

    def cat(names: list[str], suffix: str) -> torch.Tensor:
        return torch.cat([get(n + suffix) for n in names])

    def make(names: list[str], role: str) -> Linear:
        if scheme != "int4":
            mode = "weight-only" if scheme == "int8-weight-only" else "dynamic"
            return prequantized_int8(cat(names, ".q"), cat(names, ".scale"), role, mode)
        packed, scale, low = cat(names, ".q4"), cat(names, ".scale"), cat(names, ".low")
        if compute == "unpack":
            return Int4Linear(packed, scale, low)
        weight = dequantize_int4_affine(packed, scale, low, torch.float32)  # (N, K)
        # The MLP's down projection keeps float activations (see quant.py int8_linear): its
        # int4 values in a float matmul; the others go to the int8 matmul.
        return bf16_linear(weight) if role == "down" else Int8Linear(weight, mode="dynamic")

    return make
