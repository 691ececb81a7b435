"""Weight sharing for Deep Compression (Han et al. 2016): k-means codes per layer.

`share_weights_(model, WeightSharing(bits=5))`: per layer, 1-D k-means over the non-zero
weights with centroids initialised linearly between min and max (the paper's best init).
Each weight becomes a code: 0 means zero (pruned), 1 .. 2^bits-1 index the shared values.
The module gets a uint8 buffer `weight_codes`; the weight holds codebook[codes] exactly.
`finetune_centroids(...)` trains the shared values: the gradient of centroid c is the sum of
the gradients of the weights in cluster c. Every weight of a cluster gets that same gradient,
so any element-wise optimizer moves them identically and they stay shared.
The storage format lives in `slimserve.optimize.compress`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.config import OptimizeConfig
from slimserve.optimize.prune import FilterFn, prunable_layers, tensor_of
from slimserve.train.loop import Callback, FitResult, LossFn, TrainConfig, classification_loss, fit


@dataclass(frozen=True)
class WeightSharing(OptimizeConfig):
    """`bits` per code for Linear layers (2^bits - 1 shared values plus zero); `conv_bits` for
    Conv layers (Han et al.: 5 for fully connected, 8 for convolutions)."""

    technique: ClassVar[str] = "weight-sharing"

    bits: int = 5
    conv_bits: int = 8
    iterations: int = 30  # k-means (Lloyd) iterations at most

    def __post_init__(self) -> None:
        for name in ("bits", "conv_bits"):
            value = getattr(self, name)
            if not (isinstance(value, int) and 1 <= value <= 8):
                raise InvalidArgument(
                    f"WeightSharing.{name}={value!r}: use 1 to 8 bits per code "
                    "(5 for Linear, 8 for Conv in Deep Compression)"
                )


@torch.no_grad()
def share_weights_(
    model: nn.Module, config: WeightSharing | None = None, filter_fn: FilterFn | None = None
) -> nn.Module:
    """Cluster each chosen layer's non-zero weights into shared values, in place."""
    config = config or WeightSharing()
    for name, module in prunable_layers(model, filter_fn).items():
        w = tensor_of(module)
        if w.dtype != torch.float32:
            raise InvalidArgument(f"weight sharing needs float32 weights; {name!r} is {w.dtype}")
        bits = config.bits if isinstance(module, nn.Linear) else config.conv_bits
        codebook, codes = kmeans_codes(w.detach(), bits, config.iterations)
        module.register_buffer("weight_codes", codes)
        w.copy_(codebook[codes.long()])
    return model


def kmeans_codes(
    weight: torch.Tensor, bits: int, iterations: int = 30
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codebook (2^bits,) float32 with codebook[0] = 0, codes uint8 shaped like `weight`)."""
    flat = weight.flatten()
    nz = flat != 0
    values = flat[nz]
    k = min((1 << bits) - 1, int(values.unique().numel()))
    codebook = torch.zeros(1 << bits, dtype=torch.float32)
    codes = torch.zeros_like(flat, dtype=torch.uint8)
    if k == 0:
        return codebook, codes.view_as(weight)
    centroids = torch.linspace(float(values.min()), float(values.max()), k)
    for _ in range(iterations):
        assign = _nearest(values, centroids)
        sums = torch.zeros(k).index_add_(0, assign, values)
        counts = torch.bincount(assign, minlength=k)
        new = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
        if torch.equal(new, centroids):
            break
        centroids = new.sort().values
    codebook[1 : k + 1] = centroids
    codes[nz] = (_nearest(values, centroids) + 1).to(torch.uint8)
    return codebook, codes.view_as(weight)


def _nearest(values: torch.Tensor, sorted_centroids: torch.Tensor) -> torch.Tensor:
    # 1-D: the nearest centroid is found by bucketing against the midpoints between them.
    mids = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return torch.bucketize(values, mids)


def codebook_of(module: nn.Module) -> torch.Tensor:
    """The shared values of a layer, read back from its weight: (2^bits,) float32."""
    codes = tensor_of(module, "weight_codes").flatten().long()
    size = 1 << code_bits(module)
    book = torch.zeros(size, dtype=torch.float32)
    # Every position of a cluster holds the same value, so duplicate writes agree.
    book.scatter_(0, codes, tensor_of(module).detach().flatten())
    book[0] = 0.0
    return book


def code_bits(module: nn.Module) -> int:
    """Bits needed for the largest code in use (the stored codebook has 2^bits entries)."""
    codes = tensor_of(module, "weight_codes")
    top = int(codes.max()) if codes.numel() else 0
    return max(1, top.bit_length())


class SharedGradients(Callback):
    """fit() callback: weight gradients summed per cluster; zeros (code 0) get none."""

    def after_backward(self, model: nn.Module) -> None:
        for module in _shared_modules(model):
            weight = tensor_of(module)
            if weight.grad is None:
                continue
            codes = tensor_of(module, "weight_codes").flatten().long()
            grad = weight.grad.flatten()
            sums = torch.zeros(256, dtype=grad.dtype).index_add_(0, codes, grad)
            sums[0] = 0.0
            weight.grad = sums[codes].view_as(weight)

    @torch.no_grad()
    def after_step(self, model: nn.Module) -> None:
        # Re-tie each cluster to one value (guards against optimizers that are not
        # element-wise); a no-op for SGD/Adam, whose updates are already identical.
        for module in _shared_modules(model):
            codes = tensor_of(module, "weight_codes").long()
            tensor_of(module).copy_(codebook_of(module)[codes])


def _shared_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "weight_codes" in m._buffers]


def finetune_centroids(
    model: nn.Module,
    data: Sequence[torch.Tensor],
    config: TrainConfig,
    loss_fn: LossFn = classification_loss,
) -> FitResult:
    """Train the shared values (and the unshared parameters such as biases) on `data`."""
    if not _shared_modules(model):
        raise InvalidArgument("finetune_centroids: no shared layer; call share_weights_ first")
    return fit(model, loss_fn, data, config, callbacks=[SharedGradients()])


def unique_values(model: nn.Module) -> dict[str, int]:
    """Distinct non-zero values per shared layer (at most 2^bits - 1 each)."""
    return {
        n: int(tensor_of(m)[tensor_of(m) != 0].unique().numel())
        for n, m in model.named_modules()
        if "weight_codes" in m._buffers
    }
