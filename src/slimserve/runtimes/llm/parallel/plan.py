"""How a model splits over P pipeline stages x T tensor ranks (pure: shapes in, plan out).

Pipeline: the layers in P contiguous stages, as even as they go (the first stages take one
more where P does not divide); the embedding goes with the first stage, the final norm and
the head with the last (a tied head is read from the embedding by the last stage too).

Tensor: attention heads split over T ranks when both the query and the key/value heads
divide by T (each rank: its query heads and the key/value heads they read; the output
projection's matching input columns, partial sums all-reduced); the MLP's gate/up rows and
down columns when the intermediate size divides. What does not divide is replicated on every
rank of the stage (computed T times: correct, no faster) and `notes` says so; SmolLM2-135M
(9 heads, 3 key/value heads, intermediate 1536) at T=2 splits its MLP only.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimserve.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class Dims:
    """The sizes a split depends on (from the transformers config)."""

    layers: int
    heads: int
    kv_heads: int
    intermediate: int


@dataclass(frozen=True, slots=True)
class Plan:
    pipeline: int  # P
    tensor: int  # T
    stages: tuple[tuple[int, int], ...]  # (first layer, end) of each stage
    split_heads: bool
    split_mlp: bool
    notes: tuple[str, ...]

    @property
    def world(self) -> int:
        return self.pipeline * self.tensor

    def place(self, rank: int) -> tuple[int, int]:
        """(stage, tensor rank) of a process; ranks run stage-major."""
        return divmod(rank, self.tensor)

    def rank(self, stage: int, tp: int) -> int:
        return stage * self.tensor + tp


def make_plan(dims: Dims, pipeline: int, tensor: int) -> Plan:
    """The split, or ModelLoadError naming the setting, the value and the fix."""
    if pipeline < 1 or tensor < 1:
        raise ModelLoadError("generation.pipeline_parallel and tensor_parallel must be >= 1")
    if pipeline > dims.layers:
        raise ModelLoadError(
            f"generation.pipeline_parallel={pipeline} exceeds the model's {dims.layers} "
            f"layers; use at most {dims.layers} stages"
        )
    split_heads = dims.heads % tensor == 0 and dims.kv_heads % tensor == 0
    split_mlp = dims.intermediate % tensor == 0
    if tensor > 1 and not (split_heads or split_mlp):
        raise ModelLoadError(
            f"generation.tensor_parallel={tensor} divides neither the attention heads "
            f"({dims.heads} query, {dims.kv_heads} key/value) nor the MLP's intermediate size "
            f"({dims.intermediate}); use a tensor_parallel that divides one of them"
        )
    notes = []
    if tensor > 1 and not split_heads:
        notes.append(
            f"tensor_parallel={tensor}: the attention heads ({dims.heads} query, "
            f"{dims.kv_heads} key/value) do not divide by {tensor}; attention is replicated "
            "on every rank, the MLP is split"
        )
    if tensor > 1 and not split_mlp:
        notes.append(
            f"tensor_parallel={tensor}: the MLP's intermediate size {dims.intermediate} does "
            f"not divide by {tensor}; the MLP is replicated on every rank, attention is split"
        )
    return Plan(
        pipeline, tensor, _stages(dims.layers, pipeline), split_heads, split_mlp, tuple(notes)
    )


def _stages(layers: int, pipeline: int) -> tuple[tuple[int, int], ...]:
    base, extra = divmod(layers, pipeline)
    bounds, start = [], 0
    for stage in range(pipeline):
        end = start + base + (1 if stage < extra else 0)
        bounds.append((start, end))
        start = end
    return tuple(bounds)


def row_ranges(sizes: list[int], tensor: int, rank: int) -> list[tuple[int, int]]:
    """Rank `rank`'s share of each consecutive part of a fused dimension (q | k | v rows,
    gate | up rows): part i of size n gives rows [off + rank * n/T, off + (rank+1) * n/T)."""
    ranges, offset = [], 0
    for size in sizes:
        share = size // tensor
        ranges.append((offset + rank * share, offset + (rank + 1) * share))
        offset += size
    return ranges
