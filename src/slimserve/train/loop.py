"""`fit`: the training loop shared by fine-tuning, QAT and distillation.

One process or data-parallel under torchrun, chosen at run time:

- Data: a tuple of tensors sharing their first (batch) dimension, or any torch `Dataset`.
  Batches are drawn by a `DistributedSampler`, also in a single process (1 replica), so the
  order of examples is the same however many processes train: with W processes each takes
  `batch_size / W` examples of the same global batch, and DDP averages the gradients, which
  gives the single-process step up to floating-point summation order.
- `loss_fn(model, batch) -> scalar tensor`: the model it gets is the DDP wrapper when
  distributed (call it, don't reach inside), and `batch` is a tuple of tensors on the device.
- Masks: a parameter `X` of any module that also has a buffer `X_mask` (what `prune_` leaves)
  keeps its zeros: gradients are masked after backward and weights re-masked after each step.
- Mixed precision: `mixed_precision="bf16"` or `"fp16"` runs forward and loss under autocast;
  fp16 adds dynamic loss scaling (`LossScaler`): an overflowing step is skipped and the scale
  halved; after `growth_interval` good steps it doubles again.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from slimserve.errors import InvalidArgument
from slimserve.train.distributed import DistContext, init_distributed
from slimserve.train.engines import Engine, ReplicaEngine, ShardedEngine
from slimserve.train.losses import Batch as Batch  # re-exported: callers type losses with it
from slimserve.train.losses import OutputLoss
from slimserve.train.pipeline import PipelineEngine

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Batch], torch.Tensor]
Data = Dataset[Any] | Sequence[torch.Tensor]

_OPTIMIZERS = ("sgd", "adam", "adamw")
_PRECISIONS = ("off", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """How to train. `batch_size` is the global batch (split across processes)."""

    epochs: int = 1
    lr: float = 1e-3
    # L2 regularisation for sgd/adam (added to the gradient); decoupled decay for adamw.
    weight_decay: float = 0.0
    batch_size: int = 64
    optimizer: str = "adam"
    momentum: float = 0.9  # sgd only
    lr_gamma: float = 1.0  # learning rate multiplied by this after every epoch
    max_grad_norm: float | None = None
    mixed_precision: str = "off"
    loss_scaling: bool | None = None  # None: on for fp16, off otherwise
    shuffle: bool = True
    seed: int = 0
    device: str | None = None  # "cpu", "cuda"; None: CPU
    # Pipeline parallel only: micro-batches per step (None: 2 x stages, or stages, whichever
    # divides the rows each pipeline takes per step).
    microbatches: int | None = None
    progress: bool = True
    desc: str = "train"

    def __post_init__(self) -> None:
        _check(self.epochs >= 0, "epochs", self.epochs, "use 0 or more")
        _check(self.lr > 0 and math.isfinite(self.lr), "lr", self.lr, "use a positive number")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "use 0 or more")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "use 1 or more")
        _check(self.optimizer in _OPTIMIZERS, "optimizer", self.optimizer, f"use {_OPTIMIZERS}")
        _check(
            self.mixed_precision in _PRECISIONS,
            "mixed_precision",
            self.mixed_precision,
            f"use one of {_PRECISIONS}",
        )
        _check(0 < self.lr_gamma <= 1, "lr_gamma", self.lr_gamma, "use a value in (0, 1]")

    @property
    def scales_loss(self) -> bool:
        if self.loss_scaling is None:
            return self.mixed_precision == "fp16"
        return self.loss_scaling


def _check(ok: bool, name: str, value: object, fix: str) -> None:
    if not ok:
        raise InvalidArgument(f"TrainConfig.{name}={value!r} is invalid: {fix}")


class LossScaler:
    """Dynamic loss scaling for fp16 training (the scheme of Micikevicius et al. 2018).

    The loss is multiplied by `scale` before backward so small fp16 gradients don't flush to
    zero; gradients are divided by it before the step. A non-finite gradient skips the step and
    multiplies the scale by `backoff_factor`; `growth_interval` finite steps in a row multiply it
    by `growth_factor`. Under DDP the gradients are already all-reduced when checked, so every
    rank takes the same decision.
    """

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ) -> None:
        if init_scale <= 0 or growth_factor < 1 or not 0 < backoff_factor < 1:
            raise InvalidArgument(
                "LossScaler needs init_scale > 0, growth_factor >= 1, 0 < backoff_factor < 1"
            )
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0  # finite steps since the scale last changed
        self.skipped_steps = 0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    def unscale_(self, optimizer: torch.optim.Optimizer) -> bool:
        """Divide every gradient by the scale in place; True when all are finite."""
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not grads:
            return True
        torch._foreach_mul_(grads, 1.0 / self.scale)
        norms = torch._foreach_norm(grads, ord=math.inf)
        return bool(torch.isfinite(torch.stack(norms)).all())

    def update(self, finite: bool) -> None:
        if not finite:
            self.scale *= self.backoff_factor
            self.good_steps = 0
            self.skipped_steps += 1
            return
        self.good_steps += 1
        if self.good_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.good_steps = 0

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float | None = None) -> bool:
        """Unscale, step when finite (after clipping), update the scale; True if it stepped."""
        finite = self.unscale_(optimizer)
        if finite:
            _clip(optimizer, max_grad_norm)
            optimizer.step()
        self.update(finite)
        return finite


class Callback:
    """Hooks into `fit`; override what you need. `model` is the unwrapped module."""

    def on_train_start(self, model: nn.Module) -> None:
        """Before the first step."""

    def after_backward(self, model: nn.Module) -> None:
        """Gradients are computed (and all-reduced); the optimizer has not stepped yet."""

    def after_step(self, model: nn.Module) -> None:
        """The optimizer stepped (or skipped an overflowing fp16 step)."""

    def on_epoch_end(self, model: nn.Module, epoch: int, loss: float) -> None:
        """`loss`: the epoch's mean training loss, averaged over processes."""


@dataclass
class FitResult:
    """What happened: mean loss per epoch, steps taken and skipped, seconds, world size."""

    epoch_losses: list[float] = field(default_factory=list)
    steps: int = 0
    skipped_steps: int = 0
    seconds: float = 0.0
    world_size: int = 1
    loss_scale: float | None = None


# Cross-entropy of `model(x)` against integer labels `y`: batch = (x, y).
classification_loss = OutputLoss(nn.functional.cross_entropy)


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: Data,
    config: TrainConfig | None = None,
    callbacks: Sequence[Callback] = (),
) -> FitResult:
    """Train `model` in place on `data`; returns per-epoch losses and step counts."""
    config = config or TrainConfig()
    ctx = init_distributed(config.device)
    model.to(ctx.device)
    fast_layout = _channels_last(model, ctx)
    was_training = model.training
    model.train()
    engine = _engine(model, loss_fn, config, ctx, bool(callbacks))
    optimizer = _optimizer(engine.module, config)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=config.lr_gamma)
    scaler = LossScaler() if config.scales_loss else None
    state = _State(engine, model, optimizer, scaler, config, ctx, callbacks)
    result = FitResult(world_size=ctx.world_size)
    start = time.perf_counter()
    for cb in callbacks:
        cb.on_train_start(model)
    for epoch in range(config.epochs):
        loss = state.run_epoch(data, epoch)
        scheduler.step()
        result.epoch_losses.append(loss)
        for cb in callbacks:
            cb.on_epoch_end(model, epoch, loss)
        if ctx.is_main:
            log.info("%s epoch %d/%d: loss %.4f", config.desc, epoch + 1, config.epochs, loss)
    result.steps, result.skipped_steps = state.steps, state.skipped
    result.seconds = time.perf_counter() - start
    result.loss_scale = scaler.scale if scaler else None
    engine.finish(model)
    if fast_layout:
        _set_conv_layout(model, torch.contiguous_format)
    model.train(was_training)
    if ctx.is_distributed:
        # Free the DDP wrapper now: left to the garbage collector it can outlive the process
        # group and abort the process at exit ("terminate called without an active exception").
        del state, engine
        gc.collect()
    return result


@dataclass
class _State:
    """One fit call's moving parts, so the per-step code stays a short method."""

    engine: Engine
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: LossScaler | None
    config: TrainConfig
    ctx: DistContext
    callbacks: Sequence[Callback]
    steps: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        self.masks = masked_parameters(self.engine.module)

    def run_epoch(self, data: Data, epoch: int) -> float:
        total, count = torch.zeros((), dtype=torch.float64), 0
        batches, n = _batches(data, self.config, self.ctx, epoch)
        bar = _progress(batches, n, self.config, self.ctx, epoch)
        for batch in bar:
            loss = self.step(tuple(t.to(self.ctx.device, non_blocking=True) for t in batch))
            if loss is not None:  # None: a pipeline stage before the last
                total += loss.detach().double().cpu()
                count += 1
        return _mean_over_ranks(total, count, self.ctx)

    def step(self, batch: Batch) -> torch.Tensor | None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.engine.forward_backward(batch, self.scaler.scale if self.scaler else 1.0)
        for cb in self.callbacks:
            cb.after_backward(self.model)
        _mask_grads(self.masks)
        if self.scaler is not None:
            self.skipped += not self.scaler.step(self.optimizer, self.config.max_grad_norm)
        else:
            if self.config.max_grad_norm is not None:
                self.engine.clip(self.config.max_grad_norm)
            self.optimizer.step()
        apply_masks(self.masks)
        for cb in self.callbacks:
            cb.after_step(self.model)
        self.steps += 1
        return loss


def _channels_last(model: nn.Module, ctx: DistContext) -> bool:
    """Convolution weights in channels-last layout while training on one CPU process.

    oneDNN's CPU convolutions run ~1.5x faster forward and backward in that layout (LeNet-5,
    batch 128, one thread: 56 -> 37 ms a step); the values are the same, only the order of
    floating-point sums differs. One process only: DDP's gradient buckets expect the default
    strides. `fit` puts the default layout back at the end.
    """
    convs = any(p.dim() == 4 for p in model.parameters())
    if not convs or ctx.is_distributed or ctx.device.type != "cpu":
        return False
    _set_conv_layout(model, torch.channels_last)
    return True


@torch.no_grad()
def _set_conv_layout(model: nn.Module, layout: torch.memory_format) -> None:
    # In place on `.data`: the Parameter objects (and anything holding them) stay the same.
    for param in model.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=layout)


def masked_parameters(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """(parameter, mask) pairs for every parameter `X` whose module has a buffer `X_mask`."""
    pairs = []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            mask = module._buffers.get(f"{name}_mask")
            if mask is not None:
                pairs.append((param, mask))
    return pairs


@torch.no_grad()
def apply_masks(pairs: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Zero every masked-out weight (mask is 0/1, same shape as the weight)."""
    for param, mask in pairs:
        param.mul_(mask)


def _mask_grads(pairs: Sequence[tuple[nn.Parameter, torch.Tensor]]) -> None:
    # Masked gradients keep optimizer moments of pruned weights at zero as well.
    for param, mask in pairs:
        if param.grad is not None:
            param.grad.mul_(mask)


def _clip(optimizer: torch.optim.Optimizer, max_norm: float | None) -> None:
    if max_norm is not None:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        nn.utils.clip_grad_norm_(params, max_norm)


def _engine(
    model: nn.Module, loss_fn: LossFn, config: TrainConfig, ctx: DistContext, callbacks: bool
) -> Engine:
    """The engine for this process's layout; refuses what it cannot train exactly."""
    spec = ctx.layout.spec
    if spec.pp == 1 and spec.fsdp == 1:
        return ReplicaEngine(model, loss_fn, ctx, config.mixed_precision)
    if callbacks or config.scales_loss:
        what = "fp16 loss scaling" if config.scales_loss else "this step's training hooks"
        raise InvalidArgument(
            f"--parallel {spec}: {what} need the whole model and gradients in every process; "
            "use dp=N for this step (or bf16 instead of fp16)"
        )
    if spec.fsdp > 1:
        return ShardedEngine(model, loss_fn, ctx, config.mixed_precision)
    if not isinstance(loss_fn, OutputLoss):
        raise InvalidArgument(
            f"--parallel {spec}: this step's loss needs the whole model in one process "
            "(it is not an OutputLoss of the model's output); use dp=N or fsdp=N for it"
        )
    rows = _per_replica(config, ctx)
    return PipelineEngine(
        model, loss_fn.criterion, ctx, config.mixed_precision, rows, config.microbatches
    )


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InvalidArgument("fit: the model has no trainable parameters (requires_grad=True)")
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=config.lr, weight_decay=config.weight_decay)


def _as_tensors(data: Data) -> tuple[torch.Tensor, ...] | None:
    if isinstance(data, TensorDataset):
        return tuple(data.tensors)
    if isinstance(data, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in data):
        if not data or any(len(t) != len(data[0]) for t in data):
            raise InvalidArgument(
                "fit: data tensors must share their first (batch) dimension, got lengths "
                f"{[len(t) for t in data]}"
            )
        return tuple(data)
    return None


def _per_replica(config: TrainConfig, ctx: DistContext) -> int:
    """Rows of each global batch that one data-parallel replica takes."""
    replicas = ctx.layout.spec.replicas
    if config.batch_size % replicas:
        raise InvalidArgument(
            f"batch_size {config.batch_size} must divide evenly among {replicas} "
            "data-parallel replicas; use a multiple of their count"
        )
    return config.batch_size // replicas


def _batches(
    data: Data, config: TrainConfig, ctx: DistContext, epoch: int
) -> tuple[Iterator[Batch], int]:
    """This rank's batches for `epoch`, and how many there are."""
    replicas = ctx.layout.spec.replicas
    per_rank = _per_replica(config, ctx)
    tensors = _as_tensors(data)
    dataset = cast(Dataset[Any], TensorDataset(*tensors) if tensors is not None else data)
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise InvalidArgument("fit: the training data is empty")
    sampler: DistributedSampler[Any] = DistributedSampler(
        dataset,
        num_replicas=replicas,
        rank=ctx.layout.replica,
        shuffle=config.shuffle,
        seed=config.seed,
    )
    sampler.set_epoch(epoch)
    count = math.ceil(len(sampler) / per_rank)
    if tensors is None:
        return iter(DataLoader(dataset, batch_size=per_rank, sampler=sampler)), count
    # Tensors: index whole batches at once instead of collating example by example.
    order = torch.tensor(list(iter(sampler)), dtype=torch.long)
    return (tuple(t[idx] for t in tensors) for idx in order.split(per_rank)), count


def _progress(
    batches: Iterator[Batch], total: int, config: TrainConfig, ctx: DistContext, epoch: int
) -> Iterator[Batch]:
    from tqdm.auto import tqdm

    desc = f"{config.desc} {epoch + 1}/{config.epochs}"
    show = config.progress and ctx.is_main  # only rank 0 draws
    shown: Iterator[tuple[torch.Tensor, ...]] = tqdm(
        batches, desc=desc, total=total, disable=not show, leave=False, mininterval=1.0
    )
    return shown


def _mean_over_ranks(total: torch.Tensor, count: int, ctx: DistContext) -> float:
    if ctx.is_distributed:
        import torch.distributed as dist

        pair = torch.stack([total, torch.tensor(float(count), dtype=torch.float64)])
        dist.all_reduce(pair)  # gloo and NCCL both sum float64
        total, count = pair[0], int(pair[1].item())
    return float(total) / max(count, 1)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Outputs of `model` for every row of `x`, in eval mode, computed `batch_size` at a time."""
    was_training = model.training
    model.eval()
    # A quantized model may hold only buffers; one with neither runs on the CPU.
    tensors = itertools.chain(model.parameters(), model.buffers())
    device = next(tensors, torch.empty(0)).device
    out = torch.cat([model(chunk.to(device)).float().cpu() for chunk in x.split(batch_size)])
    model.train(was_training)
    return out


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of a classifier, in [0, 1]."""
    return float((predict(model, x, batch_size).argmax(1) == y).float().mean())
