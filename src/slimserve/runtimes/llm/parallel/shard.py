"""One process's shard of a checkpoint, read lazily from its safetensors files.

Each tensor the shard needs is read as a slice (`safe_open(...).get_slice(name)[rows]`): the
file is memory-mapped and only the slice's bytes are copied, so no process ever holds the
whole model. The shard is then built with the single-process loader's own pieces
(model.build_layer and the weights kind's Linear), so int8 and bf16 weights work per shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimserve.errors import ModelLoadError
from slimserve.repository.families import Family, family_of, layer_windows
from slimserve.runtimes.llm.model import (
    Linear,
    LlamaModel,
    LlamaShape,
    MakeLinear,
    build_layer,
    rope_tables,
    shape_of,
)
from slimserve.runtimes.llm.parallel.plan import Dims, Plan, row_ranges

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a partial result over the tensor ranks


def dims_of(config: Any) -> Dims:
    shape = shape_of(config)
    return Dims(shape.layers, shape.heads, shape.kv_heads, int(config.intermediate_size))


@dataclass(slots=True)
class Shard:
    model: LlamaModel  # this stage's layers (heads and MLP columns of this rank), shape local
    first: bool  # holds the embedding
    last: bool  # holds the final norm and the head


class _Reader:
    """Names to slices across a folder's safetensors files (each opened once, lazily read)."""

    def __init__(self, folder: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        self._files: dict[str, Any] = {}
        for file in sorted(folder.glob("*.safetensors")):
            handle = stack.enter_context(safe_open(str(file), framework="pt"))
            self._files.update(dict.fromkeys(handle.keys(), handle))

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def full(self, name: str) -> torch.Tensor:
        full: torch.Tensor = self._slice(name)[:]
        return full.float()

    def rows(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        part = self._slice(name)
        return torch.cat([part[a:b] for a, b in ranges]).float()

    def cols(self, name: str, start: int, end: int) -> torch.Tensor:
        part: torch.Tensor = self._slice(name)[:, start:end]
        return part.float().contiguous()

    def _slice(self, name: str) -> Any:
        if name not in self._files:
            raise ModelLoadError(f"weight {name} missing: not a *ForCausalLM checkpoint")
        return self._files[name].get_slice(name)


class _Slicer:
    """Reads a layer weight as this rank's share (the getter model.build_layer calls)."""

    def __init__(self, reader: _Reader, plan: Plan, tp: int, shape: LlamaShape, mlp: int):
        self.reader, self.tp, self.t = reader, tp, plan.tensor
        hd = shape.head_dim
        self.heads = plan.split_heads and plan.tensor > 1
        self.mlp = plan.split_mlp and plan.tensor > 1
        self.q, self.kv, self.inter = shape.heads * hd, shape.kv_heads * hd, mlp

    def __call__(self, name: str) -> torch.Tensor:
        kind = name.rsplit(".", 2)[-2]  # q_proj, o_proj, gate_up_proj, ...
        ranges = self._row_parts(kind)
        if ranges is not None:
            return self.reader.rows(name, row_ranges(ranges, self.t, self.tp))
        width = {"o_proj": self.q if self.heads else 0, "down_proj": self.inter if self.mlp else 0}
        size = width.get(kind, 0)
        if size and name.endswith(".weight"):
            share = size // self.t
            return self.reader.cols(name, self.tp * share, (self.tp + 1) * share)
        return self.reader.full(name)

    def _row_parts(self, kind: str) -> list[int] | None:
        """The fused parts of an output dimension split by rows here (None: not split)."""
        parts = (
            {
                "q_proj": [self.q],
                "k_proj": [self.kv],
                "v_proj": [self.kv],
                "qkv_proj": [self.q, self.kv, self.kv],
            }
            if self.heads
            else {}
        )
        if self.mlp:
            parts |= {
                "gate_proj": [self.inter],
                "up_proj": [self.inter],
                "gate_up_proj": [self.inter, self.inter],
            }
        return parts.get(kind)


def load_shard(
    folder: Path,
    config: Any,
    make_linear: MakeLinear,
    dtype: torch.dtype,
    plan: Plan,
    rank: int,
    reduce: Reduce,
) -> Shard:
    """Rank `rank`'s layers, and the embedding / norm and head where its stage holds them;
    the attention output and MLP down projections sum over the tensor ranks via `reduce`."""
    stage, tp = plan.place(rank)
    start, end = plan.stages[stage]
    first, last = stage == 0, stage == plan.pipeline - 1
    full = shape_of(config)
    split = plan.tensor if plan.split_heads else 1
    shape = dataclasses.replace(
        full,
        dtype=dtype,
        layers=end - start,
        heads=full.heads // split,
        kv_heads=full.kv_heads // split,
    )
    family = family_of(config.to_dict())
    windows = layer_windows(config.to_dict())
    make = _reducing(make_linear, plan, reduce)
    with ExitStack() as stack:
        reader = _Reader(folder, stack)
        get = _Slicer(reader, plan, tp, full, int(config.intermediate_size))
        layers = [
            build_layer(get, f"model.layers.{i}.", make, family, windows[i])
            for i in range(start, end)
        ]
        embed = reader.full("model.embed_tokens.weight") if first else torch.empty(0, shape.hidden)
        norm, head = _head(reader, family, make, shape) if last else (torch.empty(0), _no_head)
    rope = rope_tables(shape)
    local = shape.local_rope_theta
    local_rope = (
        None if local is None else rope_tables(dataclasses.replace(shape, rope_theta=local))
    )
    return Shard(LlamaModel(shape, embed, layers, norm, head, rope, local_rope), first, last)


def _head(
    reader: _Reader, family: Family, make: MakeLinear, shape: LlamaShape
) -> tuple[torch.Tensor, Linear]:
    name = "lm_head.weight" if "lm_head.weight" in reader else "model.embed_tokens.weight"
    norm = reader.full("model.norm.weight") + family.norm_offset
    return norm, make(reader.full(name), "lm_head")


def _no_head(x: torch.Tensor) -> torch.Tensor:
    raise RuntimeError("this pipeline stage holds no head; only the last stage computes logits")


class _Summed:
    """A Linear whose output is a partial sum over the tensor ranks: all-reduced (fp32)."""

    def __init__(self, inner: Linear, reduce: Reduce) -> None:
        self.inner, self.reduce = inner, reduce
        # model.nbytes() counts the tensors among a Linear's attributes: show it the inner's.
        tensors = {k: v for k, v in vars(inner).items() if isinstance(v, torch.Tensor)}
        self.__dict__.update(tensors)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.inner(x).float())


def _reducing(make_linear: MakeLinear, plan: Plan, reduce: Reduce) -> MakeLinear:
    summed = set()
    if plan.tensor > 1 and plan.split_heads:
        summed.add("o")
    if plan.tensor > 1 and plan.split_mlp:
        summed.add("down")

    def make(weight: torch.Tensor, role: str) -> Linear:
        inner = make_linear(weight, role)
        return _Summed(inner, reduce) if role in summed else inner

    return make
