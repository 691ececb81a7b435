"""A decoder forward pass in plain torch that reads and writes a paged KV cache.

Weights come from a transformers `*ForCausalLM` state dict of one of the families in
repository/families.py (Llama, Mistral, Qwen2, Phi-3, Gemma, Gemma-2): RMSNorm, rotary position
embeddings, grouped-query attention, a gated MLP; each family's differences (biases, norm
placement, activation, soft-capping, sliding windows) are fields of the shape and the layers,
read from the config at load. The q/k/v and the gate/up projections are fused into one matmul
each (fewer, larger matmuls on the CPU).

One `forward` serves prefill and decode alike: a padded batch of B rows of T new tokens each
(decode: T = 1), each row with its token positions, the flat KV slot each new token writes,
and the row's block table. Attention gathers the row's blocks from the pool and masks keys
past each query's position, so a row sees its cached prefix and its own earlier tokens only
(attention.py: the indices once per forward, one gather per layer, no per-row loops).

Activations: fp32 (exact against transformers), or bf16 with `weights="bf16"` where oneDNN
has avx512_bf16/AMX (matmuls, attention and KV cache in bf16, fp32 accumulation; residual
stream, norm statistics, softmax and logits in fp32). Measured on the issue's 2-core EPYC,
one thread, SmolLM2-135M, best of 3 in one process: a 32-row decode step at context 192,
91 -> 54 ms; a 16 x 128-token prefill, 2.3 -> 1.4 s; held-out perplexity 38.44 -> 38.22.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from slimserve.errors import InvalidArgument, ModelLoadError
from slimserve.repository.families import Family, family_of, layer_windows, rope_theta
from slimserve.runtimes.llm import attention, qgemv

Linear = Callable[[torch.Tensor], torch.Tensor]
# Builds a layer's matmul from its fp32 weight (out, in) and its role: qkv, o, gate_up, down,
# lm_head (a quantizer may treat roles differently).
MakeLinear = Callable[[torch.Tensor, str], Linear]


@dataclass(frozen=True, slots=True)
class LlamaShape:
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    eps: float
    rope_theta: float
    max_positions: int
    # Activations fed to the matmuls, attention and the KV cache: fp32, or bf16 (weights="bf16");
    # the residual stream and the norms' statistics stay fp32 either way.
    dtype: torch.dtype = torch.float32
    # Family differences (repository/families.py); the defaults are Llama's.
    family: str = "llama"
    activation: str = "silu"  # the MLP gate's: silu | gelu_tanh
    embed_scale: float = 1.0  # Gemma: sqrt(hidden)
    query_scale: float = 1.0  # q multiplied by this, so 1/sqrt(hd) scaling gives the model's
    attn_softcap: float | None = None  # scores -> c * tanh(scores / c) (Gemma-2)
    logit_softcap: float | None = None  # logits likewise (Gemma-2)
    local_rope_theta: float | None = None  # the sliding layers' own rotary base (Gemma-3)


@dataclass(slots=True)
class LayerWeights:
    attn_norm: torch.Tensor  # (D,)
    qkv: Linear  # D -> (H + 2 * Hkv) * hd
    o: Linear  # H * hd -> D
    mlp_norm: torch.Tensor  # (D,)
    gate_up: Linear  # D -> 2 * I
    down: Linear  # I -> D
    qkv_bias: torch.Tensor | None = None  # ((H + 2 * Hkv) * hd,) Qwen2
    post_attn_norm: torch.Tensor | None = None  # (D,) on the attention's output (Gemma-2)
    post_mlp_norm: torch.Tensor | None = None  # (D,) on the MLP's output (Gemma-2)
    window: int | None = None  # sliding window: a query sees the last `window` positions
    q_norm: torch.Tensor | None = None  # (hd,) RMSNorm of each query head (Gemma-3)
    k_norm: torch.Tensor | None = None  # (hd,) and of each key head


@dataclass(slots=True)
class LlamaModel:
    shape: LlamaShape
    embed: torch.Tensor  # (V, D)
    layers: list[LayerWeights]
    norm: torch.Tensor  # (D,)
    lm_head: Linear  # D -> V
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (max_positions, hd)
    local_rope: tuple[torch.Tensor, torch.Tensor] | None = None  # sliding layers' (Gemma-3)
    # decode steps' layers in C (fused.py), made on the first decode step; False: not possible
    fused: Any = None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(self))


@dataclass(frozen=True, slots=True)
class Batch:
    """One forward's inputs; B rows padded to T new tokens and M blocks."""

    tokens: torch.Tensor  # (B, T) int64
    positions: torch.Tensor  # (B, T) int64; padding: 0
    slots: torch.Tensor  # (B * T,) int64 flat KV slot per new token; padding: scratch block
    block_tables: torch.Tensor  # (B, M) int64; padding: scratch block
    last: torch.Tensor  # (B,) int64 index in T of each row's last real token


class FloatLinear:
    """y = x @ W.T, W (out, in), through oneDNN with the weight packed once (blocked layout).

    Measured on the issue's 2-core EPYC, one thread, a 576 -> 3072 layer, microseconds at
    1 / 8 / 32 rows: F.linear (MKL) 121 / 407 / 1187; packed oneDNN 99 / 226 / 508. Falls
    back to F.linear where the oneDNN ops are missing.
    """

    def __init__(self, weight: torch.Tensor, role: str = "") -> None:
        packed = _pack(weight)
        self.packed = packed is not None
        self.weight = packed if packed is not None else weight.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return F.linear(x, self.weight)
        flat = x.reshape(-1, x.shape[-1])
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            flat, self.weight, None, "none", [], ""
        )
        return out.view(*x.shape[:-1], out.shape[-1])


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        probe = torch.ops.mkldnn._linear_pointwise(
            torch.ones(1, weight.shape[1]), packed, None, "none", [], ""
        )
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return packed if probe.shape == (1, weight.shape[0]) else None


def _has_bf16() -> bool:
    """True where oneDNN multiplies bf16 natively (avx512_bf16 or AMX): the bf16 path pays.

    oneDNN also runs bf16 on plain AVX-512 by emulation (`_is_mkldnn_bf16_supported` says
    yes there), which is slower than fp32, so the CPU's own instruction is required."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        available = torch.backends.mkldnn.is_available()
        return bool(native and available and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


HAS_BF16 = _has_bf16()


class BFloat16Linear:
    """y = x @ W.T in bf16 (inputs bf16 or cast to it, fp32 accumulation), W packed once.

    Measured on the issue's 2-core EPYC (avx512_bf16), one thread, a 576 -> 3072 layer,
    microseconds at 32 / 2048 rows: packed fp32 1479 / 71780, packed bf16 603 / 24988.
    """

    def __init__(self, weight: torch.Tensor, role: str = "") -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            flat, self.weight, None, "none", [], ""
        )
        return out.view(*x.shape[:-1], out.shape[-1])


def bf16_linear(weight: torch.Tensor, role: str = "") -> Linear:
    """The `bf16` weights' layer: bf16 where the CPU has it, the exact fp32 one elsewhere."""
    return BFloat16Linear(weight) if HAS_BF16 else FloatLinear(weight)


def auto_weights() -> str:
    """The default weights kind, from the CPU's features: bf16 arithmetic (avx512_bf16 or
    AMX) runs `bf16+int4` (bf16 matmuls, one- and two-row steps from int4 planes: int4mm.py);
    elsewhere `int8` (VNNI or AVX2 int8 matmuls). fp32 only when asked."""
    return "bf16+int4" if HAS_BF16 else "int8"


def compute_dtype(weights: str) -> torch.dtype:
    """The activation dtype of a weights kind: bf16 for `bf16`, `bf16+int4` and `int8` (its
    attention, KV cache and down projection; see quant.py) where the CPU has it, else fp32."""
    if weights == "auto":
        weights = auto_weights()
    lower = ("bf16", "bf16+int4", "int8")
    return torch.bfloat16 if weights in lower and HAS_BF16 else torch.float32


def shape_of(config: Any) -> LlamaShape:
    """The shape of a transformers config of a supported family; others are refused."""
    values = config.to_dict()
    try:
        family = family_of(values)
    except InvalidArgument as exc:
        raise ModelLoadError(exc.message) from None
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scalar = getattr(config, "query_pre_attn_scalar", None)  # Gemma-2: scores * scalar^-0.5
    return LlamaShape(
        layers=config.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        hidden=config.hidden_size,
        vocab=config.vocab_size,
        eps=config.rms_norm_eps,
        rope_theta=rope_theta(values),
        max_positions=config.max_position_embeddings,
        family=family.model_type,
        activation=family.activation,
        embed_scale=float(config.hidden_size) ** 0.5 if family.scale_embedding else 1.0,
        query_scale=(head_dim / scalar) ** 0.5 if scalar else 1.0,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        logit_softcap=getattr(config, "final_logit_softcapping", None),
        local_rope_theta=_local_theta(values),
    )


def _local_theta(values: dict[str, Any]) -> float | None:
    local = rope_theta(values, "sliding_attention")
    return local if local != rope_theta(values) else None


def build_model(
    config: Any,
    state: dict[str, torch.Tensor],
    make_linear: MakeLinear,
    dtype: torch.dtype = torch.float32,
) -> LlamaModel:
    """Our model from a `*ForCausalLM` state dict (names as transformers writes them);
    `dtype`: the activations' (see LlamaShape.dtype; bf16 goes with `bf16_linear`)."""
    shape = dataclasses.replace(shape_of(config), dtype=dtype)
    family = family_of(config.to_dict())
    get = _getter(state, config)
    embed = get("model.embed_tokens.weight")
    head = state.get("lm_head.weight", embed)  # tied embeddings: no separate head
    windows = layer_windows(config.to_dict())
    layers = [
        build_layer(get, f"model.layers.{i}.", make_linear, family, windows[i])
        for i in range(shape.layers)
    ]
    rope = rope_tables(shape)
    local = shape.local_rope_theta
    local_rope = (
        None if local is None else rope_tables(dataclasses.replace(shape, rope_theta=local))
    )
    head_linear = make_linear(head.float(), "lm_head")
    norm = get("model.norm.weight") + family.norm_offset
    return LlamaModel(shape, embed, layers, norm, head_linear, rope, local_rope)


def _getter(state: dict[str, torch.Tensor], config: Any) -> Callable[[str], torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        if name not in state:
            kind = config.model_type
            raise ModelLoadError(f"weight {name} missing: not a {kind} *ForCausalLM checkpoint")
        return state[name].float()

    return get


def build_layer(
    get: Callable[[str], torch.Tensor],
    prefix: str,
    make_linear: MakeLinear,
    family: Family,
    window: int | None,
) -> LayerWeights:
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    if family.fused_qkv:
        qkv = get(attn + "qkv_proj.weight")
    else:
        qkv = torch.cat([get(attn + f"{p}_proj.weight") for p in "qkv"])
    if family.fused_gate_up:
        gate_up = get(mlp + "gate_up_proj.weight")
    else:
        gate_up = torch.cat([get(mlp + "gate_proj.weight"), get(mlp + "up_proj.weight")])
    bias = torch.cat([get(attn + f"{p}_proj.bias") for p in "qkv"]) if family.qkv_bias else None

    def norm(name: str) -> torch.Tensor:
        return get(prefix + name + ".weight") + family.norm_offset

    sandwich = family.sandwich_norms  # Gemma-2 names its pre-MLP norm pre_feedforward
    return LayerWeights(
        attn_norm=norm("input_layernorm"),
        qkv=make_linear(qkv, "qkv"),
        o=make_linear(get(attn + "o_proj.weight"), "o"),
        mlp_norm=norm("pre_feedforward_layernorm" if sandwich else "post_attention_layernorm"),
        gate_up=make_linear(gate_up, "gate_up"),
        down=make_linear(get(mlp + "down_proj.weight"), "down"),
        qkv_bias=bias,
        post_attn_norm=norm("post_attention_layernorm") if sandwich else None,
        post_mlp_norm=norm("post_feedforward_layernorm") if sandwich else None,
        window=window,
        q_norm=norm("self_attn.q_norm") if family.qk_norm else None,
        k_norm=norm("self_attn.k_norm") if family.qk_norm else None,
    )


def rope_tables(shape: LlamaShape) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (max_positions, hd), computed as transformers does (fp32, halves repeated)."""
    exponents = torch.arange(0, shape.head_dim, 2, dtype=torch.int64).float() / shape.head_dim
    inv_freq = 1.0 / (shape.rope_theta**exponents)
    positions = torch.arange(shape.max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos(), angles.sin()


def new_kv_pool(shape: LlamaShape, num_blocks: int, block_size: int) -> torch.Tensor:
    """K and V for every layer: (layers, 2, kv_heads, num_blocks, block_size, head_dim) fp32.

    Head-major, so one layer's keys of a batch are one `index_select` (see attention.py)."""
    dims = (shape.layers, shape.kv_heads, shape.head_dim)
    return attention.new_kv_pool(*dims, num_blocks, block_size, shape.dtype)


def kv_bytes_per_token(shape: LlamaShape) -> int:
    itemsize = torch.empty((), dtype=shape.dtype).element_size()
    return shape.layers * 2 * shape.kv_heads * shape.head_dim * itemsize


@torch.inference_mode()
def forward(
    model: LlamaModel,
    pool: torch.Tensor,
    batch: Batch,
    all_logits: bool = False,
) -> torch.Tensor:
    """Logits (B, V) of each row's last token, or (B, T, V) with `all_logits`."""
    x = run_layers(model, pool, batch, embed(model, batch))
    return head(model, x, batch, all_logits)


def embed(model: LlamaModel, batch: Batch) -> torch.Tensor:
    """The residual stream (B, T, D) fp32 entering the first layer."""
    x = model.embed[batch.tokens]  # (B, T, D)
    if model.shape.embed_scale != 1.0:
        x = x * model.shape.embed_scale
    return x


@torch.inference_mode()
def run_layers(
    model: LlamaModel, pool: torch.Tensor, batch: Batch, x: torch.Tensor
) -> torch.Tensor:
    """`model.layers` over the residual stream x (B, T, D); `pool` holds their K/V, in order
    (a pipeline stage's model holds its own layers and pool only: parallel/)."""
    shape = model.shape
    dtype = shape.dtype
    rope = _rope_at(model.rope, batch.positions, dtype)  # cos, sin (B, T, 1, hd)
    local = None if model.local_rope is None else _rope_at(model.local_rope, batch.positions, dtype)
    index = attention.kv_index(batch.slots, batch.block_tables, batch.positions, pool.shape)
    indexes = _window_indexes(model, index, batch.positions)
    activation = _ACTIVATIONS[shape.activation]
    for kv, layer in zip(pool, model.layers, strict=True):
        h = rms_norm(x, layer.attn_norm, shape.eps, dtype)
        layer_rope = local if local is not None and layer.window is not None else rope
        h = _attention(shape, layer, kv, h, layer_rope, indexes[layer.window])
        x = x + _post_norm(h, layer.post_attn_norm, shape.eps)
        h = rms_norm(x, layer.mlp_norm, shape.eps, dtype)
        gate, up = layer.gate_up(h).chunk(2, dim=-1)
        h = layer.down(activation(gate).mul_(up))
        x = x + _post_norm(h, layer.post_mlp_norm, shape.eps)
    return x


def head(model: LlamaModel, x: torch.Tensor, batch: Batch, all_logits: bool) -> torch.Tensor:
    """Logits from the last layer's residual stream (see `forward`)."""
    shape = model.shape
    if not all_logits:
        x = x[torch.arange(x.shape[0]), batch.last]  # (B, D): only the logits we sample from
    logits = model.lm_head(rms_norm(x, model.norm, shape.eps, shape.dtype)).float()
    if shape.logit_softcap is not None:  # Gemma-2: c * tanh(logits / c)
        logits = torch.tanh(logits / shape.logit_softcap).mul_(shape.logit_softcap)
    return logits


def _rope_at(
    tables: tuple[torch.Tensor, torch.Tensor], positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = (t[positions].unsqueeze(2).to(dtype) for t in tables)
    return cos, sin


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_tanh": _gelu_tanh,
}


def _window_indexes(
    model: LlamaModel, index: attention.KvIndex, positions: torch.Tensor
) -> dict[int | None, attention.KvIndex]:
    """The forward's index per distinct sliding window of its layers (None: full attention):
    each mask is built once per forward, not once per layer."""
    found: dict[int | None, attention.KvIndex] = {None: index}
    for window in {layer.window for layer in model.layers}:
        if window is not None:
            found[window] = attention.with_window(index, positions, window)
    return found


def _post_norm(h: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Gemma-2 normalizes the attention's and MLP's outputs before adding them (fp32)."""
    return h if weight is None else rms_norm(h.float(), weight, eps)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Normalized in fp32 (x: the fp32 residual stream), handed on in the activations' dtype."""
    variance = x.pow(2).mean(-1, keepdim=True)
    return (weight * (x * torch.rsqrt(variance + eps))).to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def _attention(
    shape: LlamaShape,
    layer: LayerWeights,
    kv: torch.Tensor,
    h: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    index: attention.KvIndex,
) -> torch.Tensor:
    """Write this layer's new K/V into its pool (2, Hkv, blocks, bs, hd), then attend."""
    rows, new = h.shape[:2]
    hd, kvh = shape.head_dim, shape.kv_heads
    qkv = layer.qkv(h)
    if layer.qkv_bias is not None:
        qkv = qkv + layer.qkv_bias
    qkv = qkv.to(kv.dtype).view(rows, new, shape.heads + 2 * kvh, hd)
    qk = qkv[:, :, : shape.heads + kvh]  # (B, T, H + Hkv, hd)
    if layer.q_norm is not None and layer.k_norm is not None:  # Gemma-3: per head, fp32
        q, k = qk.float().split([shape.heads, kvh], dim=2)
        q, k = (
            rms_norm(q, layer.q_norm, shape.eps, kv.dtype),
            rms_norm(k, layer.k_norm, shape.eps, kv.dtype),
        )
        qk = torch.cat([q, k], dim=2)
    # Rotary on the query and key heads together: one pass instead of two.
    qk = _rotate(qk, *rope)  # (B, T, H + Hkv, hd)
    q, k = qk.split([shape.heads, kvh], dim=2)
    if shape.query_scale != 1.0:
        q = q * shape.query_scale
    v = qkv[:, :, shape.heads + kvh :]
    if index.token_rows is not None and shape.attn_softcap is None and qgemv.attends(kv, hd):
        return layer.o(attention.attend_c(q, k, v, kv, index))  # writes the K/V itself
    attention.write_kv(kv, k, v, index)
    if index.fresh and shape.attn_softcap is None:  # no prefix: its own keys, causally
        return layer.o(attention.attend_new(q, k, v))
    return layer.o(attention.attend(q, kv, index, shape.attn_softcap))


def _tensors(model: LlamaModel) -> list[torch.Tensor]:
    found = [model.embed, model.norm]
    linears: list[Any] = [model.lm_head]
    for layer in model.layers:
        found += [layer.attn_norm, layer.mlp_norm]
        optional = [layer.qkv_bias, layer.post_attn_norm, layer.post_mlp_norm]
        optional += [layer.q_norm, layer.k_norm]
        found += [t for t in optional if t is not None]
        linears += [layer.qkv, layer.o, layer.gate_up, layer.down]
    for linear in linears:
        found += [t for t in vars(linear).values() if isinstance(t, torch.Tensor)]
    # The tied head shares the embedding's storage: count it once. (Packed oneDNN weights
    # have no storage pointer; each is its own.)
    unique = {t.data_ptr() if t.layout == torch.strided else id(t): t for t in found}
    return list(unique.values())
