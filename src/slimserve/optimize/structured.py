"""Structured pruning: remove whole neurons / channels and shrink the layers around them.

How the model's wiring is found: one forward pass with hooks on every leaf module records the
order of calls and which tensor each took and returned. A Linear or Conv2d layer (the
*producer*) can lose output neurons when its output flows, tensor for tensor, through only
shape-preserving modules (activations, dropout, pooling, batch norm, flatten) into exactly one
Linear or Conv2d layer (the *consumer*). Anything else in between (an addition, a
concatenation, a reshape outside a module) ends the chain, and the producer is left alone.

Removing neuron j of the producer removes row j of its weight and bias, entry j of a batch
norm in between, and the inputs of the consumer that read neuron j: column j of a Linear,
input channel j of a Conv2d, or, after Flatten, the S columns j*S .. j*S+S-1 (S = spatial
positions per channel). The result is a plain dense model: new, smaller nn.Linear / nn.Conv2d
modules replace the old ones; the pruned model is checked to give outputs of the same shape.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.pruning_base import FilterFn, StructuredPruning, prunable_layers, tensor_of
from slimserve.train.loop import LossFn

_PRODUCERS = (nn.Linear, nn.Conv2d)
_SHAPE_KEEPING = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.Hardtanh, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)  # fmt: skip
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class _Call:
    name: str
    module: nn.Module
    inp: torch.Tensor | None
    out: torch.Tensor


@dataclass
class Chain:
    """A producer, the batch norms after it, its consumer, and whether a Flatten sits between."""

    producer: str
    consumer: str
    norms: list[str] = field(default_factory=list)
    flatten: bool = False


def _trace(model: nn.Module, example: torch.Tensor) -> list[_Call]:
    calls: list[_Call] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], out: object) -> None:
            inp = args[0] if args and isinstance(args[0], torch.Tensor) else None
            if isinstance(out, torch.Tensor):
                calls.append(_Call(name, module, inp, out))

        return record

    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        with torch.no_grad():
            model.eval()
            model(example)
    finally:
        for h in handles:
            h.remove()
    return calls


def find_chains(model: nn.Module, example: torch.Tensor) -> dict[str, Chain]:
    """Every producer whose neurons can be removed, by module name."""
    was_training = model.training
    calls = _trace(model, example)
    model.train(was_training)
    counts: dict[str, int] = {}
    for c in calls:
        counts[c.name] = counts.get(c.name, 0) + 1
    chains = {}
    for i, call in enumerate(calls):
        if isinstance(call.module, _PRODUCERS) and counts[call.name] == 1:
            chain = _follow(calls, i, counts)
            if chain is not None:
                chains[call.name] = chain
    return chains


def _follow(calls: list[_Call], i: int, counts: dict[str, int]) -> Chain | None:
    producer = calls[i]
    chain = Chain(producer.name, "")
    for prev, call in zip(calls[i:], calls[i + 1 :], strict=False):
        if call.inp is not prev.out:  # data left the module chain
            return None
        module = call.module
        if isinstance(module, _PRODUCERS):
            ok = counts[call.name] == 1 and _fits(producer.module, module, chain.flatten)
            return Chain(producer.name, call.name, chain.norms, chain.flatten) if ok else None
        if isinstance(module, _NORMS) and not chain.flatten and counts[call.name] == 1:
            chain.norms.append(call.name)
        elif isinstance(module, nn.Flatten):
            chain.flatten = chain.flatten or call.out.dim() < call.inp.dim()
        elif not isinstance(module, _SHAPE_KEEPING):
            return None
    return None  # it feeds the model's output: its size is fixed


def _fits(producer: nn.Module, consumer: nn.Module, flattened: bool) -> bool:
    if isinstance(producer, nn.Linear):
        return isinstance(consumer, nn.Linear)
    if isinstance(consumer, nn.Conv2d):
        return not flattened and consumer.groups == 1 and producer.groups == 1  # type: ignore
    # Conv2d -> Flatten -> Linear: each channel owns S consecutive inputs.
    n = producer.out_channels
    return flattened and consumer.in_features % n == 0 and producer.groups == 1  # type: ignore


def _example_input(
    model: nn.Module, data: Sequence[torch.Tensor] | None, example: torch.Tensor | None
) -> torch.Tensor:
    if example is not None:
        return example
    if data is not None:
        return data[0][:2]
    first = next((m for m in model.modules() if isinstance(m, _PRODUCERS)), None)
    if isinstance(first, nn.Linear):
        return torch.zeros(2, first.in_features)
    raise InvalidArgument(
        "structured pruning needs an example input to trace the model: pass data=(x, y) or "
        "example_input=a batch of inputs"
    )


def prune_structured(
    model: nn.Module,
    config: StructuredPruning,
    filter_fn: FilterFn | None,
    data: Sequence[torch.Tensor] | None,
    loss_fn: LossFn,
    example_input: torch.Tensor | None,
) -> None:
    """Shrink `model` in place (see module docstring); errors leave it unchanged."""
    example = _example_input(model, data, example_input)
    chains = _chosen(model, find_chains(model, example), filter_fn, config)
    if config.importance == "taylor":
        if data is None:
            raise InvalidArgument("importance='taylor' needs data=(inputs, labels) for gradients")
        scores = taylor_importance(model, list(chains), data, loss_fn, config.taylor_batches)
    else:
        scores = {name: l2_importance(model.get_submodule(name)) for name in chains}
    keep = {n: _keep(scores[n], (config.layer_amounts or {}).get(n, config.amount)) for n in chains}
    pruned = copy.deepcopy(model)
    for chain in chains.values():
        _shrink(pruned, chain, keep[chain.producer])
    _verify(model, pruned, example)
    touched = {n for c in chains.values() for n in (c.producer, c.consumer, *c.norms)}
    for name in sorted(touched):
        _set(model, name, pruned.get_submodule(name))


def _chosen(
    model: nn.Module, chains: dict[str, Chain], filter_fn: FilterFn | None, config: object
) -> dict[str, Chain]:
    wanted = prunable_layers(model, filter_fn)
    named = set(getattr(config, "layer_amounts", None) or {})
    bad = sorted((named | set(wanted) if filter_fn else named) - set(chains))
    if bad:
        raise InvalidArgument(
            f"structured pruning cannot remove neurons of {bad}: a layer must feed, through "
            "activations/pooling/batch norm/flatten only, one Linear or Conv2d layer (not the "
            f"model's output). Layers that can: {sorted(chains) or 'none'}"
        )
    chosen = {n: c for n, c in chains.items() if n in wanted}
    if not chosen:
        raise InvalidArgument(
            "structured pruning found no layer whose neurons can be removed (the last layer "
            "feeds the output and keeps its size); the model needs two or more Linear/Conv2d "
            "layers in a chain"
        )
    return chosen


def l2_importance(module: nn.Module) -> torch.Tensor:
    """L2 norm of each output neuron's incoming weights: shape (out_features | out_channels,)."""
    norms: torch.Tensor = tensor_of(module).detach().flatten(1).norm(dim=1)
    return norms


def taylor_importance(
    model: nn.Module,
    names: Sequence[str],
    data: Sequence[torch.Tensor],
    loss_fn: LossFn,
    batches: int,
) -> dict[str, torch.Tensor]:
    """Per output neuron: (sum of weight x gradient over its weights and bias)^2, batch mean.

    The squared first-order estimate of the loss change when the neuron is removed
    (Molchanov et al. 2019), from `batches` mini-batches of 256 examples. Shape (out,) each.
    """
    modules = {n: model.get_submodule(n) for n in names}
    sums = {n: torch.zeros(tensor_of(m).shape[0]) for n, m in modules.items()}
    pairs = list(zip(data[0].split(256), data[1].split(256), strict=True))[:batches]
    was_training = model.training
    model.eval()
    try:
        for x, y in pairs:
            model.zero_grad(set_to_none=True)
            loss_fn(model, (x, y)).backward()
            for n, m in modules.items():
                sums[n] += _group_taylor(m) ** 2
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: s / max(len(pairs), 1) for n, s in sums.items()}


def _group_taylor(module: nn.Module) -> torch.Tensor:
    """sum over each output neuron's parameters of w * dL/dw: shape (out,)."""
    w = module.weight
    total = (w * w.grad).detach().flatten(1).sum(1)  # type: ignore[operator]
    if module.bias is not None and module.bias.grad is not None:
        total += (module.bias * module.bias.grad).detach()  # type: ignore[operator]
    return total


def _keep(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """Sorted indices of the neurons kept: the top (1 - amount) by score, at least one."""
    n = scores.numel()
    keep = max(1, n - int(amount * n))
    return torch.topk(scores, keep).indices.sort().values


def _shrink(model: nn.Module, chain: Chain, keep: torch.Tensor) -> None:
    """Apply one producer's kept set to it, its norms and its consumer (in `model`)."""
    producer = model.get_submodule(chain.producer)
    width = int(tensor_of(producer).shape[0])  # neurons / channels before pruning
    _slice_(producer, "out", keep)
    for name in chain.norms:
        _slice_norm_(model.get_submodule(name), keep)
    consumer = model.get_submodule(chain.consumer)
    if chain.flatten:  # channel j owns inputs j*S .. j*S+S-1 of the Linear after Flatten
        per_channel = int(tensor_of(consumer).shape[1]) // width
        keep = (keep[:, None] * per_channel + torch.arange(per_channel)).flatten()
    _slice_(consumer, "in", keep)


@torch.no_grad()
def _slice_(module: nn.Module, side: str, keep: torch.Tensor) -> None:
    """Keep output rows (side="out") or input columns (side="in") of weight (and mask)."""
    dim = 0 if side == "out" else 1
    for key in ("weight", "weight_mask"):
        t = getattr(module, key, None)
        if t is None:
            continue
        sliced = t.index_select(dim, keep).clone()
        if key == "weight":
            module.weight = nn.Parameter(sliced, requires_grad=t.requires_grad)
        else:
            module.register_buffer(key, sliced)
    if side == "out" and module.bias is not None:
        module.bias = nn.Parameter(module.bias[keep].clone())  # type: ignore[index]
    _resize_attrs(module)


def _resize_attrs(module: nn.Module) -> None:
    out, inp = (int(n) for n in tensor_of(module).shape[:2])
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = out, inp
    elif isinstance(module, nn.Conv2d):
        module.out_channels, module.in_channels = out, inp


@torch.no_grad()
def _slice_norm_(norm: nn.Module, keep: torch.Tensor) -> None:
    for key in ("weight", "bias"):
        p = getattr(norm, key, None)
        if p is not None:
            setattr(norm, key, nn.Parameter(p[keep].clone()))
    for key in ("running_mean", "running_var"):
        b = getattr(norm, key, None)
        if b is not None:
            norm.register_buffer(key, b[keep].clone())
    norm.num_features = len(keep)  # type: ignore[assignment]


def _verify(original: nn.Module, pruned: nn.Module, example: torch.Tensor) -> None:
    with torch.no_grad():
        was = original.training, pruned.training
        original.eval()
        pruned.eval()
        try:
            want, got = original(example).shape, pruned(example).shape
        except RuntimeError as exc:
            raise InvalidArgument(
                "structured pruning broke the model (a pruned layer's output is also used "
                f"outside the module chain, e.g. a residual add): {exc}; exclude that layer "
                "with filter_fn"
            ) from exc
        finally:
            original.train(was[0])
            pruned.train(was[1])
    if want != got:
        raise InvalidArgument(f"structured pruning changed the output shape {want} -> {got}")


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass over `example` in Linear and Conv2d layers,
    per example (dense kernels: zeros count too)."""
    total = 0

    def hook(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Linear):
            total += out.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            per_output = (
                module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            )
            total += out.numel() * per_output

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, _PRODUCERS)]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return total // max(len(example), 1)
