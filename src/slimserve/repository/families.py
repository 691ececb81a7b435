"""The decoder architectures the generation engine runs, one spec each (no torch here).

`repo add` refuses a `*ForCausalLM` folder whose `model_type` is not listed, and so does the
load (runtimes/llm/model.py builds its forward from the spec). What differs between these
families is small and named here; what a config sets per model (head_dim, sliding windows,
soft-capping values, tied embeddings) is read from the config at load:

- llama: RMSNorm before attention and MLP, SwiGLU MLP, rotary, grouped-query attention.
- mistral: as llama, with a sliding attention window.
- qwen2: as llama, with q/k/v biases.
- phi3: as llama, with q/k/v fused in one `qkv_proj` and gate/up in one `gate_up_proj`.
- gemma: RMSNorm scaling by (1 + w), embeddings times sqrt(hidden), GeGLU (tanh gelu) MLP.
- gemma2: gemma's, plus norms after attention and MLP, soft-capped attention scores and
  logits, query scaling by query_pre_attn_scalar, a sliding window on alternate layers.
- gemma3_text: gemma2's without soft-capping, plus RMSNorm on each query and key head, and
  another rotary base on the sliding-window layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from slimserve.errors import InvalidArgument


@dataclass(frozen=True, slots=True)
class Family:
    """What one architecture does differently from Llama (every default is Llama's)."""

    model_type: str  # config.json's model_type
    examples: str  # models of this architecture, for messages and the README
    qkv_bias: bool = False  # q, k and v projections carry a bias (Qwen2)
    fused_qkv: bool = False  # one self_attn.qkv_proj weight instead of q/k/v (Phi-3)
    fused_gate_up: bool = False  # one mlp.gate_up_proj weight instead of gate/up (Phi-3)
    norm_offset: float = 0.0  # RMSNorm scales by (offset + weight): Gemma stores weight - 1
    sandwich_norms: bool = False  # norms on the attention's and MLP's outputs too (Gemma-2)
    activation: str = "silu"  # of the gate: silu (SwiGLU) | gelu_tanh (GeGLU)
    scale_embedding: bool = False  # embeddings multiplied by sqrt(hidden) (Gemma)
    qk_norm: bool = False  # RMSNorm on each query and key head before rotary (Gemma-3)


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama 2/3, SmolLM2, TinyLlama"),
        Family("mistral", "Mistral 7B"),
        Family("qwen2", "Qwen2, Qwen2.5", qkv_bias=True),
        Family("phi3", "Phi-3 mini/medium (4k context)", fused_qkv=True, fused_gate_up=True),
        Family("gemma", "Gemma", norm_offset=1.0, activation="gelu_tanh", scale_embedding=True),
        Family(
            "gemma2",
            "Gemma-2",
            norm_offset=1.0,
            sandwich_norms=True,
            activation="gelu_tanh",
            scale_embedding=True,
        ),
        Family(
            "gemma3_text",
            "Gemma-3 (text: 270M, 1B)",
            norm_offset=1.0,
            sandwich_norms=True,
            activation="gelu_tanh",
            scale_embedding=True,
            qk_norm=True,
        ),
    )
}


def supported() -> str:
    """'llama (Llama 2/3, ...), mistral (...), ...': for error messages."""
    return ", ".join(f"{f.model_type} ({f.examples})" for f in FAMILIES.values())


def family_of(config: Mapping[str, Any], where: str = "config.json") -> Family:
    """The family of a config (its to_dict() or the raw config.json); anything the engine
    cannot run exactly is refused here, naming what and the architectures it runs."""
    model_type = config.get("model_type")
    family = FAMILIES.get(str(model_type))
    if family is None:
        raise InvalidArgument(
            f"{where}: model_type {model_type!r} is not an architecture the generation engine "
            f"runs; supported: {supported()}. Choose a model of one of these architectures"
        )
    _refuse_variations(config, where)
    return family


def _refuse_variations(config: Mapping[str, Any], where: str) -> None:
    """Options of a listed family that the forward does not implement."""
    params = rope_parameters(config)
    for part in _rope_parts(params):
        kind = part.get("rope_type", part.get("type", "default"))
        if kind not in ("default", None):
            raise InvalidArgument(
                f"{where}: rope scaling {kind!r} is not supported; only default rotary embeddings"
            )
    partial = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise InvalidArgument(f"{where}: partial_rotary_factor {partial} is not supported")
    for bias in ("attention_bias", "mlp_bias"):
        if config.get(bias):
            raise InvalidArgument(f"{where}: {bias} is not supported for {config['model_type']}")


def rope_parameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5's `rope_parameters`, or the older `rope_scaling` (with `rope_theta`)."""
    params = config.get("rope_parameters") or config.get("rope_scaling")
    return dict(params or {})


def _rope_parts(params: dict[str, Any]) -> list[dict[str, Any]]:
    """Gemma-3 keeps one set of rotary parameters per layer type; others one set."""
    nested = [v for k, v in params.items() if k in _LAYER_TYPES and isinstance(v, dict)]
    return nested or [params]


_LAYER_TYPES = ("full_attention", "sliding_attention")


def rope_theta(config: Mapping[str, Any], layer_type: str = "full_attention") -> float:
    """The rotary base of a layer type (the same for all layers but Gemma-3's)."""
    params = rope_parameters(config)
    params = params.get(layer_type, params) if isinstance(params.get(layer_type), dict) else params
    return float(params.get("rope_theta", config.get("rope_theta") or 1e4))


def layer_windows(config: Mapping[str, Any]) -> tuple[int | None, ...]:
    """Each layer's sliding window (a query sees the last `w` positions), None for full
    attention: from `layer_types` where the config has them (Gemma-2, Qwen2), else the
    config's `sliding_window` for every layer (Mistral, Phi-3)."""
    layers = int(config["num_hidden_layers"])
    window = config.get("sliding_window")
    types = config.get("layer_types")
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types[:layers])
    return (window if isinstance(window, int) else None,) * layers
