"""What pruning is configured with and works on: the configs and the prunable layers.

Shared by `prune.py` (unstructured, and the `prune_` verb) and `structured.py` (whole
neurons), which both import it; neither imports the other's internals.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.config import OptimizeConfig

FilterFn = Callable[[nn.Module, str], bool]
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _check_amount(owner: str, amount: float) -> None:
    if not (isinstance(amount, (int, float)) and 0.0 <= amount < 1.0):
        raise InvalidArgument(
            f"{owner}: amount={amount!r} is impossible; give the fraction of weights to remove, "
            "in [0, 1) (0.9 removes 90%)"
        )


@dataclass(frozen=True)
class MagnitudePruning(OptimizeConfig):
    """Unstructured magnitude pruning to `amount` (fraction zeroed) or by `quality` x std."""

    technique: ClassVar[str] = "magnitude-pruning"

    amount: float | None = None
    scope: str = "layer"  # "layer": each layer to `amount`; "global": one threshold for all
    quality: float | None = None  # Han et al.: threshold = quality * std(layer's weights)
    layer_amounts: Mapping[str, float] | None = None  # per-layer overrides, by module name

    def __post_init__(self) -> None:
        if (self.amount is None) == (self.quality is None):
            raise InvalidArgument(
                "MagnitudePruning: give exactly one of amount= (fraction to remove, e.g. 0.9) "
                "or quality= (threshold in standard deviations, e.g. 1.0)"
            )
        if self.scope not in ("layer", "global"):
            raise InvalidArgument(
                f"MagnitudePruning: scope={self.scope!r} is unknown; use 'layer' or 'global'"
            )
        if self.amount is not None:
            _check_amount("MagnitudePruning", self.amount)
        if self.quality is not None and not (self.quality >= 0 and math.isfinite(self.quality)):
            raise InvalidArgument(
                f"MagnitudePruning: quality={self.quality!r} must be a finite number >= 0"
            )
        if self.quality is not None and self.scope == "global":
            raise InvalidArgument("MagnitudePruning: quality= works per layer; use scope='layer'")
        for name, amount in (self.layer_amounts or {}).items():
            _check_amount(f"MagnitudePruning.layer_amounts[{name!r}]", amount)


@dataclass(frozen=True)
class StructuredPruning(OptimizeConfig):
    """Remove `amount` of the output neurons/channels of each prunable layer.

    importance: "l2" (norm of the neuron's incoming weights) or "taylor" (squared first-order
    Taylor estimate of the loss change from removing the neuron, Molchanov et al. 2019; needs
    `data`). The last layer (the model's outputs) is never pruned.
    """

    technique: ClassVar[str] = "structured-pruning"

    amount: float
    importance: str = "l2"
    layer_amounts: Mapping[str, float] | None = None
    taylor_batches: int = 8  # batches of 256 examples used for the Taylor estimate

    def __post_init__(self) -> None:
        _check_amount("StructuredPruning", self.amount)
        if self.importance not in ("l2", "taylor"):
            raise InvalidArgument(
                f"StructuredPruning: importance={self.importance!r} is unknown; "
                "use 'l2' or 'taylor'"
            )
        for name, amount in (self.layer_amounts or {}).items():
            _check_amount(f"StructuredPruning.layer_amounts[{name!r}]", amount)


PruneConfig = MagnitudePruning | StructuredPruning


def tensor_of(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """`module.<name>` as a tensor (nn.Module attributes are typed Tensor | Module)."""
    value = getattr(module, name, None)
    if not isinstance(value, torch.Tensor):
        raise InvalidArgument(f"{type(module).__name__} has no tensor {name!r}")
    return value


def prunable_layers(model: nn.Module, filter_fn: FilterFn | None = None) -> dict[str, nn.Module]:
    """Leaf modules chosen for pruning, by name; errors name layers that can't be pruned."""
    chosen: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None:
            continue
        picked = filter_fn(module, name) if filter_fn else isinstance(module, _WEIGHTED)
        if not picked:
            continue
        if weight.dim() < 2:
            raise InvalidArgument(
                f"cannot prune {name!r} ({type(module).__name__}): its weight is a 1-D scale; "
                "exclude it in filter_fn (prune Linear and Conv layers)"
            )
        chosen[name] = module
    if not chosen:
        raise InvalidArgument(
            "no layer to prune: the model has no Linear/Conv layer that filter_fn accepts"
        )
    return chosen
