"""Pruning: `prune_(model, Config, filter_fn=None)`.

- `MagnitudePruning`: unstructured. Zeros the smallest-magnitude weights of each chosen layer
  (`scope="layer"`), or the smallest across all chosen layers (`scope="global"`), to a target
  fraction `amount`; or, Han et al. 2015 style, every weight below `quality` x the standard
  deviation of its layer's surviving weights. Each pruned module keeps a 0/1 buffer
  `weight_mask` beside its weight; `slimserve.train.fit` honours it, so fine-tuning keeps
  zeros zero. `make_permanent` drops the masks once training is over.
- `StructuredPruning`: removes whole output neurons of Linear layers and output channels of
  Conv2d layers, and resizes the layers that read them, leaving a smaller dense model (see
  `slimserve.optimize.structured`).
- `prune_iteratively`: prune a little, fine-tune, repeat (a cubic or linear schedule).
- `sensitivity`: accuracy after pruning one layer at a time, to choose per-layer amounts.

`filter_fn(module, fqn) -> bool` chooses layers among the leaf modules that own a `weight`
parameter; by default Linear and Conv layers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.pruning_base import (
    _WEIGHTED,
    FilterFn,
    MagnitudePruning,
    PruneConfig,
    StructuredPruning,
    _check_amount,
    prunable_layers,
    tensor_of,
)
from slimserve.optimize.structured import find_chains, prune_structured
from slimserve.train.loop import LossFn, TrainConfig, accuracy, classification_loss, fit

__all__ = [
    "FilterFn",
    "MagnitudePruning",
    "PruneConfig",
    "StructuredPruning",
    "prunable_layers",
    "prune_",
    "tensor_of",
]


def prune_(
    model: nn.Module,
    config: PruneConfig,
    filter_fn: FilterFn | None = None,
    *,
    data: Sequence[torch.Tensor] | None = None,
    loss_fn: LossFn = classification_loss,
    example_input: torch.Tensor | None = None,
) -> nn.Module:
    """Prune `model` in place and return it.

    `data` = (inputs, labels): needed by Taylor importance; it also provides the example input
    structured pruning traces the model with (else give `example_input`).
    """
    if isinstance(config, MagnitudePruning):
        _magnitude(model, config, filter_fn)
        return model
    if isinstance(config, StructuredPruning):
        prune_structured(model, config, filter_fn, data, loss_fn, example_input)
        return model
    raise InvalidArgument(
        f"prune_: unknown config {type(config).__name__}; use MagnitudePruning or StructuredPruning"
    )


@torch.no_grad()
def _magnitude(model: nn.Module, config: MagnitudePruning, filter_fn: FilterFn | None) -> None:
    layers = prunable_layers(model, filter_fn)
    unknown = set(config.layer_amounts or {}) - set(layers)
    if unknown:
        raise InvalidArgument(
            f"MagnitudePruning.layer_amounts names {sorted(unknown)}, which are not prunable "
            f"layers; prunable: {sorted(layers)}"
        )
    if config.scope == "global":
        masks = _global_masks(layers, config.amount or 0.0)
    else:
        masks = {name: _layer_mask(name, tensor_of(m), config) for name, m in layers.items()}
    for name, mask in masks.items():
        set_mask(layers[name], mask)


def _layer_mask(name: str, weight: torch.Tensor, config: MagnitudePruning) -> torch.Tensor:
    magnitude = weight.detach().abs()
    if config.quality is not None:
        alive = weight[weight != 0]
        std = alive.std() if alive.numel() > 1 else weight.new_zeros(())
        return (magnitude > config.quality * std).to(weight.dtype)
    amount = (config.layer_amounts or {}).get(name, config.amount or 0.0)
    return _smallest_out(magnitude.flatten(), amount).view_as(weight).to(weight.dtype)


def _smallest_out(magnitude: torch.Tensor, amount: float) -> torch.Tensor:
    """1-D 0/1 mask with exactly round(amount * n) of the smallest entries zeroed."""
    k = round(amount * magnitude.numel())
    mask = torch.ones_like(magnitude)
    if k > 0:
        mask[torch.topk(magnitude, k, largest=False, sorted=False).indices] = 0
    return mask


def _global_masks(layers: Mapping[str, nn.Module], amount: float) -> dict[str, torch.Tensor]:
    weights = [tensor_of(m).detach() for m in layers.values()]
    flat = _smallest_out(torch.cat([w.abs().flatten() for w in weights]), amount)
    parts = flat.split([w.numel() for w in weights])
    return {name: p.view_as(w) for name, p, w in zip(layers, parts, weights, strict=True)}


@torch.no_grad()
def set_mask(module: nn.Module, mask: torch.Tensor, name: str = "weight") -> None:
    """Combine `mask` with the module's existing `<name>_mask` buffer and zero the weight."""
    param = getattr(module, name)
    old = module._buffers.get(f"{name}_mask")
    mask = mask.to(param.dtype) if old is None else mask.to(param.dtype) * old
    module.register_buffer(f"{name}_mask", mask)
    param.mul_(mask)


@torch.no_grad()
def make_permanent(model: nn.Module) -> nn.Module:
    """Apply and drop every `*_mask` buffer: the zeros stay, the state dict is plain again."""
    for module in model.modules():
        for key in [k for k in module._buffers if k.endswith("_mask")]:
            param = module._parameters.get(key[: -len("_mask")])
            mask = module._buffers[key]
            if param is not None and mask is not None:
                param.mul_(mask)
                del module._buffers[key]
    return model


def layer_sparsity(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, float]:
    """Fraction of zero weights in each prunable layer."""
    return {
        name: float((tensor_of(m) == 0).float().mean())
        for name, m in prunable_layers(model, filter_fn).items()
    }


def sparsity(model: nn.Module, filter_fn: FilterFn | None = None) -> float:
    """Fraction of zero weights over all prunable layers together (biases not counted)."""
    layers = prunable_layers(model, filter_fn).values()
    weights = [tensor_of(m) for m in layers]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def count_nonzero(model: nn.Module) -> tuple[int, int]:
    """(non-zero, total) over every parameter of the model, biases included."""
    params = list(model.parameters())
    return sum(int(p.count_nonzero()) for p in params), sum(p.numel() for p in params)


@dataclass
class RoundReport:
    """One round of iterative pruning: target, reached sparsity, final training loss."""

    round: int
    target: float
    sparsity: float
    loss: float | None
    metric: float | None = None


def schedule_fraction(round_: int, rounds: int, kind: str = "cubic") -> float:
    """Share of the final sparsity reached after `round_` of `rounds` (1-based).

    cubic (Zhu & Gupta 2017): 1 - (1 - r/n)^3, large steps first while many weights are
    redundant and small ones near the end; linear: r/n.
    """
    if kind not in ("cubic", "linear"):
        raise InvalidArgument(f"schedule={kind!r} is unknown; use 'cubic' or 'linear'")
    t = round_ / rounds
    return 1.0 - (1.0 - t) ** 3 if kind == "cubic" else t


def _scaled(config: MagnitudePruning, f: float) -> MagnitudePruning:
    layer = {k: v * f for k, v in (config.layer_amounts or {}).items()} or None
    if config.quality is not None:
        return replace(config, quality=config.quality * f, layer_amounts=layer)
    return replace(config, amount=(config.amount or 0.0) * f, layer_amounts=layer)


def prune_iteratively(
    model: nn.Module,
    config: MagnitudePruning,
    data: Sequence[torch.Tensor],
    train: TrainConfig,
    *,
    rounds: int = 3,
    schedule: str = "cubic",
    loss_fn: LossFn = classification_loss,
    filter_fn: FilterFn | None = None,
    metric: Callable[[nn.Module], float] | None = None,
) -> list[RoundReport]:
    """Prune towards `config` in `rounds` steps with `train` epochs of fine-tuning after each.

    Han et al. retrain with L2 regularisation at a lower learning rate: set `train.lr` below
    the original and `train.weight_decay` > 0. Masks keep pruned weights at zero throughout.
    """
    if rounds < 1:
        raise InvalidArgument(f"prune_iteratively: rounds={rounds} must be 1 or more")
    reports = []
    for r in range(1, rounds + 1):
        step = _scaled(config, schedule_fraction(r, rounds, schedule))
        _magnitude(model, step, filter_fn)
        desc = f"prune round {r}/{rounds}"
        result = fit(model, loss_fn, data, replace(train, desc=desc)) if train.epochs else None
        loss = result.epoch_losses[-1] if result and result.epoch_losses else None
        target = step.amount if step.amount is not None else float(step.quality or 0.0)
        score = metric(model) if metric else None
        reports.append(RoundReport(r, target, sparsity(model, filter_fn), loss, score))
    return reports


@dataclass
class Sensitivity:
    """Metric after pruning each layer alone to each amount; `baseline` unpruned."""

    baseline: float
    layers: dict[str, dict[float, float]] = field(default_factory=dict)

    def choose(self, max_drop: float) -> dict[str, float]:
        """Per layer, the largest amount whose metric stays within `max_drop` of baseline."""
        chosen = {}
        for name, by_amount in self.layers.items():
            ok = [a for a, v in by_amount.items() if self.baseline - v <= max_drop]
            chosen[name] = max(ok, default=0.0)
        return chosen


def sensitivity(
    model: nn.Module,
    data: Sequence[torch.Tensor],
    amounts: Sequence[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
    *,
    filter_fn: FilterFn | None = None,
    metric: Callable[[nn.Module], float] | None = None,
    structured: bool = False,
) -> Sensitivity:
    """Prune one layer at a time (on a copy) and measure; the model is left untouched.

    `data` = (inputs, labels); `metric(model) -> float`, higher is better (default: accuracy
    on `data`). `structured=True` removes neurons instead of single weights.
    """
    for a in amounts:
        _check_amount("sensitivity", a)
    score = metric or (lambda m: accuracy(m, data[0], data[1]))
    result = Sensitivity(baseline=score(model))
    names = list(prunable_layers(model, filter_fn))
    if structured:
        names = [n for n in names if n in find_chains(model, data[0][:2])]
    for name in names:
        result.layers[name] = {}
        for a in amounts:
            trial = copy.deepcopy(model)
            if structured:
                prune_(trial, StructuredPruning(a), _only(name), data=data)
            else:
                _magnitude(trial, MagnitudePruning(amount=a), _only(name))
            result.layers[name][a] = score(trial)
    return result


def _only(name: str) -> FilterFn:
    return lambda module, fqn: fqn == name and isinstance(module, _WEIGHTED)
