"""Knowledge distillation: train a small student to imitate a teacher.

Classifiers (Hinton et al. 2015): loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T))
+ (1 - alpha) * CE(s, y). The T^2 keeps the soft term's gradients on the same scale as the
hard term's whatever the temperature. Embedding models: loss = 1 - cos(s, t) ("cosine") or
mean squared error ("mse"), no labels needed.

By default the teacher runs once over the training data before training (eval mode, no
gradients) and its outputs ride along as an extra tensor of each batch, so each epoch costs
only the student. With `DistillConfig(augment=fn)` distillation is online and consistent
(Beyer et al. 2022, "function matching"): every step the batch's inputs become one random view
`fn(x, y)`, and the teacher (eval mode, no gradients) and the student both see that same view,
so the student matches the teacher's function on inputs the training set does not hold (e.g.
mixup between images); each step then costs a teacher forward as well.
Training goes through `slimserve.train.fit`: one process or DDP under torchrun alike (under
DDP each process augments its own share of the batch, from its own random stream). With a
pipeline-parallel layout (`--parallel pp=N`) the teacher's forward is pipelined too: each
process runs only its stage of the teacher, and with `release_teacher=True` keeps only that
stage's weights, so a teacher too large for one process is split across the pipeline.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.fields import build
from slimserve.optimize.artifacts import TorchFiles, load_torch_stage
from slimserve.optimize.config import OptimizeConfig
from slimserve.train.distributed import context
from slimserve.train.loop import FitResult, TrainConfig, fit, predict
from slimserve.train.losses import Batch, OutputLoss
from slimserve.train.pipeline import pipeline_forward
from slimserve.zoo import MLP

_KINDS = ("classifier", "embedding")
_EMBEDDING_LOSSES = ("cosine", "mse")

# (inputs (B, ...), labels (B,)) -> a view of the inputs, same shape; labels are only read.
Augment = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DistillConfig(OptimizeConfig):
    """temperature T > 0; alpha in [0, 1] weighs the soft (teacher) term against the labels.

    augment: None (the teacher's outputs computed once, on the plain inputs) or a function
    (x, y) -> x' drawing a random view of each batch; the teacher is then run on that same view
    every step. The labels term (1 - alpha) still uses y, so with a view that mixes images
    (mixup) use alpha=1.
    """

    technique: ClassVar[str] = "distill"

    temperature: float = 4.0
    alpha: float = 0.9
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128
    weight_decay: float = 0.0
    optimizer: str = "adam"
    lr_gamma: float = 1.0
    kind: str = "classifier"
    embedding_loss: str = "cosine"
    progress: bool = True
    seed: int = 0
    augment: Augment | None = None

    def __post_init__(self) -> None:
        if self.augment is not None and not callable(self.augment):
            raise InvalidArgument(
                f"DistillConfig.augment={self.augment!r}: use None or a function (x, y) -> x'"
            )
        if not self.temperature > 0:
            raise InvalidArgument(f"DistillConfig.temperature={self.temperature}: use T > 0")
        if not 0 <= self.alpha <= 1:
            raise InvalidArgument(f"DistillConfig.alpha={self.alpha}: use a value in [0, 1]")
        if self.kind not in _KINDS:
            raise InvalidArgument(f"DistillConfig.kind={self.kind!r}: use one of {_KINDS}")
        if self.embedding_loss not in _EMBEDDING_LOSSES:
            raise InvalidArgument(
                f"DistillConfig.embedding_loss={self.embedding_loss!r}: use {_EMBEDDING_LOSSES}"
            )

    def train_config(self) -> TrainConfig:
        return build(TrainConfig, self, desc="distill")


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """T^2 * KL(teacher || student) on temperature-softened distributions, batch mean."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")
    return kl * temperature**2


def classifier_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    config: DistillConfig,
) -> torch.Tensor:
    soft = soft_target_loss(student_logits, teacher_logits, config.temperature)
    if config.alpha == 1:
        return soft
    return config.alpha * soft + (1 - config.alpha) * hard_label_loss(student_logits, labels)


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the labelled rows, summed and divided by the whole batch size.

    A label < 0 marks an unlabelled row of the transfer set (Hinton et al.: the transfer set may
    hold unlabelled inputs, which get the soft term only). Dividing by the batch, not by the
    labelled count, keeps a batch with few labels from weighing them up (and one with none at
    0 instead of NaN). With every row labelled this is plain batch-mean cross-entropy.
    """
    if bool((labels >= 0).all()):
        return F.cross_entropy(logits, labels)
    ce = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")
    return (ce * (labels >= 0)).sum() / len(labels)


def embedding_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """1 - mean cosine similarity, or mean squared error; inputs (B, D)."""
    if kind == "cosine":
        return 1 - F.cosine_similarity(student, teacher, dim=-1).mean()
    return F.mse_loss(student, teacher)


def teacher_outputs(
    teacher: nn.Module, inputs: torch.Tensor, release: bool = False
) -> torch.Tensor:
    """The teacher's outputs for every input, once (eval mode, no gradients, float32).

    Under a pipeline-parallel layout each process runs its stage of the teacher; `release`
    frees the other stages' weights first (the teacher cannot be used afterwards)."""
    ctx = context()
    if ctx.layout.spec.pp > 1:
        return pipeline_forward(teacher, inputs, ctx, batch_size=1024, release=release)
    return predict(teacher, inputs, batch_size=1024)


def distill(
    teacher: nn.Module | TorchFiles,
    student: nn.Module,
    data: Sequence[torch.Tensor],
    config: DistillConfig | None = None,
    release_teacher: bool = False,
) -> FitResult:
    """Train `student` in place to imitate `teacher` on `data`.

    data: (inputs, labels) for classifiers; (inputs,) or (inputs, anything) for embeddings.
    A label of -1 marks an unlabelled input: it is trained on the teacher's soft targets only.
    release_teacher: under pipeline parallelism, keep only this process's stage of the
    teacher (the teacher is unusable afterwards).
    A teacher given as TorchFiles is loaded here: whole in one process (or with dp / fsdp);
    under pipeline parallelism each process reads only its stage's tensors from the file, so
    no process ever holds the whole teacher.
    """
    config = config or DistillConfig()
    if not data or not isinstance(data[0], torch.Tensor):
        raise InvalidArgument("distill: data must be (inputs, labels) tensors")
    if config.kind == "classifier" and len(data) < 2:
        raise InvalidArgument("distill: classifiers need (inputs, labels); labels are missing")
    labels = data[1] if config.kind == "classifier" else torch.zeros(len(data[0]))
    teacher, release_teacher = _teacher_module(teacher, release_teacher, config)
    if config.augment is not None:
        return _distill_online(teacher, student, (data[0], labels), config, config.augment)
    targets = teacher_outputs(teacher, data[0], release_teacher)
    _check_shapes(student, data[0], targets)
    # An OutputLoss: a pipelined student computes it on its last stage, per micro-batch.
    loss_fn = OutputLoss(functools.partial(_offline_loss, config=config))
    return fit(student, loss_fn, (data[0], labels, targets), config.train_config())


def _teacher_module(
    teacher: nn.Module | TorchFiles, release: bool, config: DistillConfig
) -> tuple[nn.Module, bool]:
    """The teacher as a module, and whether to free the stages this process does not run."""
    if isinstance(teacher, nn.Module):
        return teacher, release
    layout = context().layout
    if layout.spec.pp == 1:
        return teacher.load(), release
    if config.augment is not None:
        raise InvalidArgument(
            "distill: augment runs the teacher whole on every view, so a teacher split over "
            "pipeline stages (TorchFiles under --parallel pp) cannot take it; drop augment, "
            "or pass the teacher as a module"
        )
    return load_torch_stage(teacher, layout.spec.pp, layout.stage), True


def _offline_loss(
    out: torch.Tensor, y: torch.Tensor, t: torch.Tensor, config: DistillConfig
) -> torch.Tensor:
    return _student_loss(out, t, y, config)


def _student_loss(
    out: torch.Tensor, t: torch.Tensor, y: torch.Tensor, config: DistillConfig
) -> torch.Tensor:
    if config.kind == "embedding":
        return embedding_loss(out, t, config.embedding_loss)
    return classifier_loss(out, t, y, config)


def _distill_online(
    teacher: nn.Module,
    student: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    config: DistillConfig,
    augment: Augment,
) -> FitResult:
    """Each step: view = augment(x, y); the teacher's outputs for that view (eval mode, no
    gradients) are the student's targets on the same view."""
    _check_shapes(student, data[0], teacher_outputs(teacher, data[0][:2]))

    def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
        x, y = batch
        view = augment(x, y)
        if not isinstance(view, torch.Tensor) or view.shape != x.shape:
            got = tuple(view.shape) if isinstance(view, torch.Tensor) else type(view).__name__
            raise InvalidArgument(
                f"DistillConfig.augment returned {got} for inputs {tuple(x.shape)}: "
                "it must return a tensor shaped like its input"
            )
        with torch.no_grad():
            t = teacher(view).float()
        return _student_loss(model(view), t, y, config)

    was_training = teacher.training
    teacher.eval()  # dropout and batch-norm statistics as at inference
    try:
        return fit(student, loss_fn, data, config.train_config())
    finally:
        teacher.train(was_training)


def _check_shapes(student: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> None:
    try:
        out = predict(student, inputs[:2])
    except RuntimeError as exc:
        raise InvalidArgument(
            f"distill: the student cannot take the teacher's inputs: {exc}"
        ) from exc
    if out.shape[1:] != targets.shape[1:]:
        raise InvalidArgument(
            f"distill: student outputs {tuple(out.shape[1:])} per example but the teacher "
            f"gives {tuple(targets.shape[1:])}; the student's last layer must match"
        )


def derive_student(teacher: nn.Module, width: float = 0.25, depth: int | None = None) -> nn.Module:
    """A smaller `slimserve.zoo.MLP` from an MLP teacher: hidden sizes x `width`, and the
    first `depth` hidden layers kept (all when None). Weights are freshly initialised.

    e.g. teacher 784-1200-1200-10, width=0.25 -> 784-300-300-10; depth=1 -> 784-300-10.
    """
    if not isinstance(teacher, MLP):
        raise InvalidArgument(
            f"derive_student works on slimserve.zoo.MLP teachers, not {type(teacher).__name__}; "
            "build the student yourself and pass it to distill()"
        )
    if not 0 < width <= 1:
        raise InvalidArgument(f"derive_student: width={width} must be in (0, 1]")
    sizes = mlp_sizes(teacher)
    hidden = sizes[1:-1]
    if depth is not None and not 0 <= depth <= len(hidden):
        raise InvalidArgument(
            f"derive_student: depth={depth} must be in [0, {len(hidden)}] (teacher's hidden layers)"
        )
    kept = hidden[: len(hidden) if depth is None else depth]
    return MLP([sizes[0], *(max(1, round(h * width)) for h in kept), sizes[-1]])


def mlp_sizes(model: nn.Module) -> list[int]:
    """[in, hidden..., out] of an MLP made of Linear layers (in order)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InvalidArgument("the model has no Linear layer")
    return [linears[0].in_features, *(m.out_features for m in linears)]
