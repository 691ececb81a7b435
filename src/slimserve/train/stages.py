"""Cutting a model into pipeline stages: its blocks, and which consecutive blocks go where."""

from __future__ import annotations

import itertools

from torch import nn

from slimserve.errors import InvalidArgument


def has_blocks(model: nn.Module) -> bool:
    """Whether `model` says what its forward's sequence of blocks is."""
    return callable(getattr(model, "pipeline_blocks", None)) or isinstance(model, nn.Sequential)


def pipeline_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that, applied one after another, are `model`'s forward.

    An `nn.Sequential` is its children; any other model says so with a `pipeline_blocks()`
    method (slimserve.zoo's models have one).
    """
    blocks = getattr(model, "pipeline_blocks", None)
    if callable(blocks):
        return list(blocks())
    if isinstance(model, nn.Sequential):
        return list(model)
    raise InvalidArgument(
        f"pipeline parallelism needs the model as a sequence of blocks: {type(model).__name__} "
        "is not an nn.Sequential and has no pipeline_blocks() method; add one, or train with "
        "dp=N or fsdp=N"
    )


def split_blocks(blocks: list[nn.Module], stages: int) -> list[tuple[int, int]]:
    """[start, end) block ranges, one per stage, each holding weights, the heaviest as light
    as possible. Weightless blocks (activations, reshapes) stay with the block before them."""
    sizes = [sum(p.numel() for p in b.parameters()) for b in blocks]
    heavy = [i for i, n in enumerate(sizes) if n]
    if len(heavy) < stages:
        raise InvalidArgument(
            f"--parallel pp={stages}: the model has {len(heavy)} blocks with weights, so it "
            f"splits into at most {len(heavy)} pipeline stages; use pp<={len(heavy)}"
        )
    # Stage k > 0 starts at a heavy block; choose the starts minimising the heaviest stage
    # (dynamic programming over the few heavy blocks).
    starts = [0, *heavy[1:]]
    prefix = [0]
    for n in sizes:
        prefix.append(prefix[-1] + n)

    def weight(a: int, b: int) -> int:
        return prefix[starts[b] if b < len(starts) else len(blocks)] - prefix[starts[a]]

    n = len(starts)
    best: dict[tuple[int, int], tuple[int, list[int]]] = {}
    for k in range(1, stages + 1):  # best[(k, a)]: stages k, first start index a
        for a in range(n - k + 1):
            if k == 1:
                best[(1, a)] = (weight(a, n), [a])
                continue
            options = []
            for b in range(a + 1, n - k + 2):
                rest, cuts = best[(k - 1, b)]
                options.append((max(weight(a, b), rest), [a, *cuts]))
            best[(k, a)] = min(options)
    cuts = best[(stages, 0)][1]
    bounds = [starts[c] for c in cuts] + [len(blocks)]
    return list(itertools.pairwise(bounds))
