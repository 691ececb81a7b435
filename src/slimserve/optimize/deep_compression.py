"""Deep Compression (Han et al. 2016) as one verb: `deep_compress_(model, DeepCompression(), data)`.

1. **Plan the sparsity** for the size target: on a copy of the model, global magnitude pruning
   at a candidate sparsity, weight sharing and the .dcz encoding give the stored size; a
   bisection finds the smallest sparsity whose file is `ratio` (x a 12% margin, since retraining
   moves the weights) times smaller than float32. The global threshold gives each layer its own
   sparsity from its weights' magnitudes (Han et al.'s per-layer thresholds from sensitivity
   do the same job by hand: layers with large weights, such as the first convolution, keep more).
   Measured on LeNet-5 (Fashion-MNIST, 40x): the first convolution keeps ~65% of its weights
   (Han et al.: 66%), the last fully connected layer ~35% (19%), the large ones 6-20% (8-12%).
2. **Prune iteratively**: `rounds` rounds on a cubic schedule (large steps first), each followed
   by retraining with L2 regularisation at a lower learning rate; masks keep pruned weights at
   zero. Then a final retraining with a decaying learning rate. Retraining learns from the
   labels; with `distill` > 0 also from the dense model's softened outputs (Hinton et al.'s
   soft targets, computed once before pruning). Off by default: on LeNet-300-100 at 40x it
   measured worse, as did longer late rounds with a rate decaying in each round
   (benchmarks/RESULTS.md, issue 16).
3. **Share weights** (k-means per layer, `bits` for fully connected layers, `conv_bits` for
   convolutions: 5 and 8 as Han et al.) and **fine-tune the centroids** (gradients summed per
   cluster, same loss).
4. The caller stores the result as .dcz (relative sparse indices, Huffman-coded codes and gaps:
   `compress.save_compressed`), which the torch runtime loads.

Epochs and learning rate follow the data when not given: about `STEPS_PER_ROUND` optimizer
steps per round (4 epochs of Fashion-MNIST's 60,000 rows at batch 128, 20 of a 5,000-row
set, at most 20), twice that for the final retraining; Adam at 3e-4 (a third of its usual
1e-3, as Han et al. retrain below the original rate), x`FINAL_GAMMA` per epoch in the final
retraining; centroids at 1e-4. A model without convolutions retrains at `FC_LR` (6e-4)
instead: LeNet-300-100 at 40x lost +0.34 points at 6e-4 against +0.54 at 3e-4 (3 seeds), while
LeNet-5 met its target at 3e-4 (benchmarks/RESULTS.md, issue 16).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from slimserve.errors import InvalidArgument
from slimserve.fields import pick
from slimserve.optimize.compress import compressed_size
from slimserve.optimize.config import OptimizeConfig
from slimserve.optimize.distillation import soft_target_loss, teacher_outputs
from slimserve.optimize.prune import MagnitudePruning, count_nonzero, prune_, prune_iteratively
from slimserve.optimize.sharing import WeightSharing, finetune_centroids, share_weights_
from slimserve.train.loop import LossFn, TrainConfig, classification_loss, fit
from slimserve.train.losses import Batch

STEPS_PER_ROUND = 1500  # optimizer steps of retraining per pruning round (see the docstring)
MAX_EPOCHS = 20
# Plan for this much more than `ratio`: retrained weights share and code less well than the
# trial's (measured on LeNet-300-100: planned 42.0x at 1.05 gave 39.3x; 1.12 gave 42.1x).
SIZE_MARGIN = 1.12
FINAL_GAMMA = 0.7  # learning rate x this per epoch within the final retraining
CONV_LR = 3e-4  # Adam, retraining a model with convolutions (LeNet-5 measured at this rate)
FC_LR = 6e-4  # Adam, retraining a model of fully connected layers only (chosen on LeNet-300-100)
RETRAIN_WEIGHT_DECAY = 1e-5  # L2 in retraining (Han et al.), the final retraining's too


@dataclass(frozen=True)
class DeepCompression(OptimizeConfig):
    """Prune, retrain, share, fine-tune centroids; stored as .dcz. None: chosen (docstring)."""

    technique: ClassVar[str] = "deep-compression"
    ratio: float = 40.0  # stored size target: float32 bytes / .dcz bytes
    sparsity: float | None = None  # fraction of weights pruned (global); None: from `ratio`
    rounds: int = 4
    epochs: int | None = None  # retraining epochs per round
    final_epochs: int | None = None
    lr: float | None = None  # Adam, retraining
    weight_decay: float = RETRAIN_WEIGHT_DECAY
    distill: float = 0.0  # weight of the dense model's soft targets in retraining; 0: labels
    temperature: float = 4.0  # softens the dense model's and the pruned model's outputs
    bits: int = 5  # per shared value, fully connected layers
    conv_bits: int = 8  # convolutions
    centroid_epochs: int | None = None
    centroid_lr: float = 1e-4
    batch_size: int = 128
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, int | float) and 1 < self.ratio <= 1000):
            raise InvalidArgument(f"ratio={self.ratio!r}: give the size target, e.g. ratio=40")
        if self.sparsity is not None and not 0 < self.sparsity < 1:
            raise InvalidArgument(f"sparsity={self.sparsity!r}: use a fraction in (0, 1)")
        if not (isinstance(self.rounds, int) and 1 <= self.rounds <= 20):
            raise InvalidArgument(f"rounds={self.rounds!r}: use 1 to 20 rounds")
        for name in ("epochs", "final_epochs", "centroid_epochs"):
            check_epochs(name, getattr(self, name))
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise InvalidArgument(f"lr={self.lr!r}: use a positive learning rate, e.g. 0.0003")
        if not (isinstance(self.distill, int | float) and 0 <= self.distill <= 1):
            raise InvalidArgument(
                f"distill={self.distill!r}: use a weight in [0, 1] (0: retrain on labels only)"
            )
        if not (isinstance(self.temperature, int | float) and 0 < self.temperature <= 100):
            raise InvalidArgument(f"temperature={self.temperature!r}: use e.g. 4 (0 < T <= 100)")
        WeightSharing(bits=self.bits, conv_bits=self.conv_bits)  # validates both widths


@dataclass(frozen=True)
class Schedule:
    """The epochs and learning rate a run uses, resolved against the data size."""

    sparsity: float
    round_epochs: int
    final_epochs: int
    centroid_epochs: int
    lr: float


@dataclass
class DeepCompressionReport:
    """What each stage reached: accuracy (None without labelled held-out data), sizes."""

    schedule: Schedule
    baseline_accuracy: float | None
    rounds: list[dict[str, float | None]] = field(default_factory=list)
    pruned_accuracy: float | None = None
    shared_accuracy: float | None = None
    nonzero: int = 0
    params: int = 0
    dense_bytes: int = 0
    stored_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.stored_bytes, 1)


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d) for m in model.modules())


def retrain_lr(model: nn.Module) -> float:
    """Adam's rate for retraining a pruned `model`: CONV_LR with convolutions, else FC_LR (the
    `prune` step's default too: benchmarks/RESULTS.md, issue 16, session 5)."""
    return CONV_LR if has_conv(model) else FC_LR


def schedule_for(
    config: DeepCompression, rows: int, sparsity: float, has_conv: bool = True
) -> Schedule:
    """Epochs from the number of training rows (about STEPS_PER_ROUND steps a round), the
    learning rate from the model's layers (CONV_LR with convolutions, else FC_LR)."""
    steps = max(1, math.ceil(rows / config.batch_size))
    per_round = min(MAX_EPOCHS, max(1, math.ceil(STEPS_PER_ROUND / steps)))
    return Schedule(
        sparsity=sparsity,
        round_epochs=per_round if config.epochs is None else config.epochs,
        final_epochs=(
            final_epochs_for(per_round) if config.final_epochs is None else config.final_epochs
        ),
        centroid_epochs=(
            max(1, per_round // 2) if config.centroid_epochs is None else config.centroid_epochs
        ),
        lr=(CONV_LR if has_conv else FC_LR) if config.lr is None else config.lr,
    )


def check_epochs(name: str, value: Any) -> None:
    """An epochs setting is None (chosen from the data) or a whole number, 0-200."""
    if value is not None and not (isinstance(value, int) and 0 <= value <= 200):
        raise InvalidArgument(f"{name}={value!r}: use a whole number of epochs, 0-200")


def final_epochs_for(round_epochs: int) -> int:
    """The final retraining's epochs: twice a pruning round's, at most MAX_EPOCHS."""
    return min(MAX_EPOCHS, 2 * round_epochs)


def final_retrain_(
    model: nn.Module,
    data: Sequence[torch.Tensor],
    train: TrainConfig,
    loss: LossFn = classification_loss,
) -> None:
    """The final retraining after the last pruning round (the `prune` step's too): `train`
    with its learning rate x FINAL_GAMMA per epoch; masks keep pruned weights at zero."""
    if train.epochs:
        fit(model, loss, data, replace(train, lr_gamma=FINAL_GAMMA, desc="retrain"))
    model.eval()


def stored_ratio(model: nn.Module, sparsity: float, sharing: WeightSharing) -> float:
    """float32 bytes / .dcz bytes of a copy pruned (global magnitude) to `sparsity` and shared."""
    trial = copy.deepcopy(model)
    prune_(trial, MagnitudePruning(amount=sparsity, scope="global"))
    share_weights_(trial, replace(sharing, iterations=10))
    return compressed_size(trial).ratio


def plan_sparsity(model: nn.Module, config: DeepCompression, steps: int = 8) -> float:
    """The smallest global sparsity whose stored size meets ratio x SIZE_MARGIN (bisection)."""
    if config.sparsity is not None:
        return config.sparsity
    sharing = WeightSharing(bits=config.bits, conv_bits=config.conv_bits)
    target = config.ratio * SIZE_MARGIN
    lo, hi = 0.5, 0.995
    if stored_ratio(model, hi, sharing) < target:
        raise InvalidArgument(
            f"ratio={config.ratio}: even 99.5% sparsity stores this model only "
            f"{stored_ratio(model, hi, sharing):.1f}x smaller; ask for a smaller ratio"
        )
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if stored_ratio(model, mid, sharing) >= target else (mid, hi)
    return round(hi, 4)


Metric = Callable[[nn.Module], float | None]


def deep_compress_(
    model: nn.Module,
    config: DeepCompression,
    data: Sequence[torch.Tensor],
    metric: Metric | None = None,
) -> DeepCompressionReport:
    """Prune, retrain, share and fine-tune `model` in place (module docstring).

    data: (inputs, labels) to retrain on; metric(model) -> accuracy on held-out data (shown
    in the progress bar and kept in the report), or None.
    """
    score: Metric = metric or (lambda m: None)
    schedule = schedule_for(config, len(data[0]), plan_sparsity(model, config), has_conv(model))
    report = DeepCompressionReport(schedule, score(model))
    bar = tqdm(total=config.rounds + 2, desc="deep-compression", disable=not config.progress)
    data, loss = _retraining(model, config, data)
    _prune_rounds(model, config, schedule, data, loss, score, report, bar)
    final = _train(config, schedule.final_epochs, schedule.lr, "retrain")
    final_retrain_(model, data, final, loss)
    report.pruned_accuracy = score(model)
    report.nonzero, report.params = count_nonzero(model)
    bar.set_postfix(stage="pruned", acc=_pct(report.pruned_accuracy))
    bar.update()
    share_weights_(model, WeightSharing(bits=config.bits, conv_bits=config.conv_bits))
    if schedule.centroid_epochs:
        train = _train(config, schedule.centroid_epochs, config.centroid_lr, "centroids")
        finetune_centroids(model, data, train, loss)
    model.eval()
    report.shared_accuracy = score(model)
    stats = compressed_size(model)
    report.dense_bytes, report.stored_bytes = stats.dense_bytes, stats.stored_bytes
    bar.set_postfix(stage="shared", acc=_pct(report.shared_accuracy), ratio=f"{stats.ratio:.1f}x")
    bar.update()
    bar.close()
    return report


def _prune_rounds(
    model: nn.Module,
    config: DeepCompression,
    schedule: Schedule,
    data: Sequence[torch.Tensor],
    loss: LossFn,
    score: Metric,
    report: DeepCompressionReport,
    bar: tqdm,
) -> None:
    def after_round(m: nn.Module) -> float:
        acc = score(m)
        bar.set_postfix(stage=f"round {len(report.rounds) + 1}", acc=_pct(acc))
        bar.update()
        report.rounds.append({"accuracy": acc})
        return float("nan") if acc is None else acc

    train = _train(config, schedule.round_epochs, schedule.lr, "prune round")
    rounds = prune_iteratively(
        model,
        MagnitudePruning(amount=schedule.sparsity, scope="global"),
        data,
        train,
        rounds=config.rounds,
        loss_fn=loss,
        metric=after_round,
    )
    for entry, r in zip(report.rounds, rounds, strict=True):
        entry["sparsity"] = round(r.sparsity, 4)


def _retraining(
    model: nn.Module, config: DeepCompression, data: Sequence[torch.Tensor]
) -> tuple[Sequence[torch.Tensor], LossFn]:
    """The data and loss every retraining uses: (x, y) and cross-entropy, or with `distill`
    (x, y, the dense model's logits) and the soft-target loss mixed with cross-entropy."""
    if not config.distill:
        return data, classification_loss
    x, y = data[0], data[1]
    dense = teacher_outputs(model, x)  # once, before any weight is pruned
    alpha, temperature = float(config.distill), float(config.temperature)

    def loss(net: nn.Module, batch: Batch) -> torch.Tensor:
        out = net(batch[0])
        soft = soft_target_loss(out, batch[2], temperature)
        return alpha * soft + (1 - alpha) * F.cross_entropy(out, batch[1])

    return (x, y, dense), loss


def _train(config: DeepCompression, epochs: int, lr: float, desc: str) -> TrainConfig:
    shared = pick(config, "weight_decay batch_size seed progress")
    return TrainConfig(epochs=epochs, lr=lr, desc=desc, **shared)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"
