"""Recipe steps that prune, train, distill and share weights (registered on import).

Steps that retrain need labelled --data and say so; without retraining, `prune`, `structured`
(l2 importance) and `share` need none. Iterative pruning is one step: `prune:0.92,rounds=4,
epochs=2` prunes on a cubic schedule in 4 rounds with 2 epochs of retraining after each, then
retrains as deep-compression does (`final_epochs`, default 4: twice a round's, the rate decaying).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from slimserve.errors import InvalidArgument
from slimserve.optimize.compress import finetune_centroids, share_weights_
from slimserve.optimize.deep_compression import (
    RETRAIN_WEIGHT_DECAY,
    DeepCompression,
    check_epochs,
    deep_compress_,
    final_epochs_for,
    final_retrain_,
    retrain_lr,
)
from slimserve.optimize.distillation import DistillConfig, derive_student, distill, mlp_sizes
from slimserve.optimize.prune import (
    MagnitudePruning,
    StructuredPruning,
    prune_,
    prune_iteratively,
    schedule_fraction,
    sparsity,
)
from slimserve.optimize.registry import labels_if, register_step
from slimserve.optimize.sharing import WeightSharing
from slimserve.optimize.state import State
from slimserve.train.loop import TrainConfig, classification_loss, fit
from slimserve.zoo import MLP

RETRAIN_LR = 3e-4  # Adam; a third of the usual 1e-3: retraining starts from a trained model


def _retrain_config(args: dict[str, Any], desc: str, lr: float = RETRAIN_LR) -> TrainConfig | None:
    """Pop epochs/lr/batch_size/weight_decay: a TrainConfig when epochs > 0, else None."""
    epochs = args.pop("epochs", 0)
    train: dict[str, Any] = {
        k: args.pop(k)
        for k in ("lr", "lr_gamma", "batch_size", "weight_decay", "optimizer")
        if k in args
    }
    if not epochs:
        if train:
            raise InvalidArgument(f"{sorted(train)} apply to retraining; add epochs=N")
        return None
    defaults: dict[str, Any] = {"epochs": epochs, "lr": lr, "batch_size": 128, "desc": desc}
    return TrainConfig(**{**defaults, **train})


def _seeded(config: TrainConfig, state: State) -> TrainConfig:
    return replace(config, seed=state.seed)


class RoundBar:
    """A progress bar over rounds that shows the model's accuracy after each."""

    def __init__(self, state: State, total: int, desc: str) -> None:
        self.state = state
        self.bar = tqdm(total=total, desc=desc, leave=False, mininterval=0.5)

    def done(self, model: Any) -> float:
        acc = self.state.accuracy(model)
        self.bar.set_postfix(acc="n/a" if acc is None else f"{100 * acc:.2f}%")
        self.bar.update()
        return float("nan") if acc is None else acc

    def close(self) -> None:
        self.bar.close()


# --- prune / structured ------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneStep:
    """prune:0.9[,scope=layer][,rounds=4,epochs=2,final_epochs=4,lr=0.0006,schedule=cubic];
    structured too. prune's threshold is global unless scope=layer; its retraining rate follows
    the model (deep_compression.retrain_lr) unless lr= is given; after the last round it
    retrains as deep-compression does (deep_compression.final_retrain_)."""

    pruning: MagnitudePruning | StructuredPruning
    rounds: int = 1
    schedule: str = "cubic"
    train: TrainConfig | None = None  # retraining after each round; None: none (no data)
    lr_given: bool = False  # prune: else the rate follows the model (deep_compression.retrain_lr)
    final: TrainConfig | None = None  # prune: the final retraining (its rate is train's)


def _deep_compression_retraining(
    train: TrainConfig | None, final_epochs: Any, decay_given: bool
) -> tuple[TrainConfig | None, TrainConfig | None]:
    """The `prune` step retrains as deep-compression does: weight decay RETRAIN_WEIGHT_DECAY
    unless weight_decay= is given, and after the last round a final retraining of
    `final_epochs` (default twice a round's epochs; 0: none) with a decaying rate. On the
    validation split only both together helped (benchmarks/RESULTS.md, issue 16)."""
    check_epochs("final_epochs", final_epochs)
    if train is None:
        if final_epochs:
            raise InvalidArgument("final_epochs applies to retraining; add epochs=N")
        return None, None
    if not decay_given:
        train = replace(train, weight_decay=RETRAIN_WEIGHT_DECAY)
    epochs = final_epochs_for(train.epochs) if final_epochs is None else final_epochs
    return train, replace(train, epochs=epochs) if epochs else None


def _build_pruning(cls: type[MagnitudePruning] | type[StructuredPruning]) -> Any:
    def build(args: dict[str, Any]) -> PruneStep:
        rounds = args.pop("rounds", 1)
        schedule = str(args.pop("schedule", "cubic"))
        if not (isinstance(rounds, int) and 1 <= rounds <= 20):
            raise InvalidArgument(f"rounds={rounds!r}: use 1 to 20 rounds")
        schedule_fraction(1, 1, schedule)  # validates the schedule's name
        lr_given = "lr" in args
        decay_given = "weight_decay" in args
        train = _retrain_config(args, f"{cls.technique} round")
        final = None
        if cls is MagnitudePruning:
            final_epochs = args.pop("final_epochs", None)
            train, final = _deep_compression_retraining(train, final_epochs, decay_given)
            # One threshold for all layers by default, as Han et al.'s per-layer sensitivity
            # does by hand and deep-compression does: on LeNet-300-100 at 92% (validation
            # split) each layer at 92% lost 3.3 points, the global threshold 1.9.
            args.setdefault("scope", "global")
        return PruneStep(cls(**args), rounds, schedule, train, lr_given, final)

    return build


def _prune_needs_labels(step: PruneStep) -> bool:
    taylor = isinstance(step.pruning, StructuredPruning) and step.pruning.importance == "taylor"
    return step.train is not None or taylor


def _run_prune(state: State, step: PruneStep) -> None:
    if isinstance(step.pruning, StructuredPruning):
        _run_structured(state, step, step.pruning)
    elif step.train is None and step.rounds == 1:
        prune_(state.model, step.pruning)
    else:
        data = state.labelled("prune") if step.train else state.tensors()
        train = _seeded(step.train or TrainConfig(epochs=0), state)
        if step.train and not step.lr_given:
            train = replace(train, lr=retrain_lr(state.model))
        bar = RoundBar(state, step.rounds, "prune rounds")
        reports = prune_iteratively(
            state.model, step.pruning, data, train, rounds=step.rounds,  # type: ignore[arg-type]
            schedule=step.schedule, metric=bar.done,
        )  # fmt: skip
        bar.close()
        state.notes["rounds"] = [_round_note(r.sparsity, r.metric) for r in reports]
        if step.train:
            state.notes["retrain_lr"] = train.lr
        if step.final is not None:
            final = replace(step.final, lr=train.lr, seed=state.seed)
            final_retrain_(state.model, state.labelled("prune"), final)
            state.notes["final_epochs"] = step.final.epochs
    state.model.eval()
    state.notes["sparsity"] = round(float(sparsity(state.model)), 4)


def _run_structured(state: State, step: PruneStep, config: StructuredPruning) -> None:
    """Remove `amount` of the neurons in `rounds` equal shares of what is left, retraining
    after each: (1 - f)^rounds = 1 - amount."""
    share = 1 - (1 - config.amount) ** (1 / step.rounds)
    labelled = state.labelled("structured") if _prune_needs_labels(step) else None
    bar = RoundBar(state, step.rounds, "structured rounds")
    notes = []
    for _ in range(step.rounds):
        round_config = replace(config, amount=share, layer_amounts=None)
        example = state.tensors()[0][:2]
        prune_(state.model, round_config, data=labelled, example_input=example)
        if step.train is not None and labelled is not None:
            fit(state.model, classification_loss, labelled, _seeded(step.train, state))
        state.model.eval()
        notes.append(_round_note(None, bar.done(state.model)))
    bar.close()
    if step.rounds > 1:
        state.notes["rounds"] = notes


def _round_note(sparsity_: float | None, metric: float | None) -> dict[str, float | None]:
    acc = None if metric is None or metric != metric else round(metric, 4)  # NaN: not measured
    return {"sparsity": None if sparsity_ is None else round(sparsity_, 4), "accuracy": acc}


register_step(
    "prune",
    _build_pruning(MagnitudePruning),
    _run_prune,
    main="amount",
    needs=labels_if(_prune_needs_labels),
    help="e.g. prune:0.9, prune:amount=0.9,scope=global, or iterative with retraining: "
    "prune:0.92,rounds=4,epochs=4[,final_epochs=8,scope=layer,lr=0.0006,lr_gamma=0.8,"
    "weight_decay=0.00001,schedule=cubic|linear] (then a final retraining, rate decaying, "
    "final_epochs=0 for none)",
)
register_step(
    "structured",
    _build_pruning(StructuredPruning),
    _run_prune,
    main="amount",
    needs=labels_if(_prune_needs_labels),
    help="e.g. structured:0.3, structured:amount=0.3,importance=taylor, or "
    "structured:0.5,rounds=3,epochs=1",
)


# --- finetune, distill --------------------------------------------------------------------------


def _build_finetune(args: dict[str, Any]) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "lr": 1e-4, "desc": "finetune", **args})


def _run_finetune(state: State, config: TrainConfig) -> None:
    result = fit(
        state.model, classification_loss, state.labelled("finetune"), _seeded(config, state)
    )
    state.model.eval()
    state.notes["finetune_losses"] = [round(float(v), 5) for v in result.epoch_losses]


@dataclass(frozen=True)
class DistillStep:
    """distill:hidden=256 (every hidden layer 256 wide) or hidden=300-100 (explicit sizes, any
    teacher ending in a Linear layer, convolutional ones too), or width=0.25[,depth=1] (an MLP
    teacher's hidden sizes scaled); the rest is DistillConfig."""

    hidden: list[int] | None
    width: float
    depth: int | None
    config: DistillConfig


def _build_distill(args: dict[str, Any]) -> DistillStep:
    hidden = args.pop("hidden", None)
    width = float(args.pop("width", 0.25))
    depth = args.pop("depth", None)
    if hidden is not None:
        hidden = [int(h) for h in str(hidden).split("-")]
        if min(hidden) < 1:
            raise InvalidArgument(f"hidden={hidden}: layer widths must be positive")
    return DistillStep(hidden, width, depth, DistillConfig(**{"epochs": 5, **args}))


def _student(teacher: Any, step: DistillStep, state: State) -> nn.Module:
    """The student MLP. hidden= gives its sizes for any teacher whose last layer is Linear
    (e.g. a convolutional LeNet-5 into 784-300-100-10: inputs flattened, the teacher's classes
    out); width=/depth= scale an MLP teacher's hidden sizes (refused for other teachers)."""
    if step.hidden is None:
        return derive_student(teacher, step.width, step.depth)
    sizes = mlp_sizes(teacher)
    if not isinstance(teacher, MLP):
        return MLP([state.tensors()[0][0].numel(), *step.hidden, sizes[-1]])
    hidden = step.hidden * (len(sizes) - 2) if len(step.hidden) == 1 else step.hidden
    return MLP([sizes[0], *hidden, sizes[-1]])


def _run_distill(state: State, step: DistillStep) -> None:
    teacher = state.model
    student = _student(teacher, step, state)
    # The teacher is dropped after this step: under pipeline parallelism each process may free
    # the stages of it that it does not run.
    distill(teacher.eval(), student, state.labelled("distill"), step.config, release_teacher=True)
    state.model = student.eval()
    state.model_class = "slimserve.zoo:MLP"
    state.model_args = {"sizes": mlp_sizes(student)}
    state.notes["student_sizes"] = state.model_args["sizes"]


register_step(
    "finetune",
    _build_finetune,
    _run_finetune,
    main="epochs",
    needs=labels_if(lambda c: True),
    help="e.g. finetune:epochs=3,lr=0.0001",
)
register_step(
    "distill",
    _build_distill,
    _run_distill,
    main="hidden",
    needs=labels_if(lambda c: True),
    help="e.g. distill:hidden=256,epochs=5 or distill:width=0.25,depth=1,temperature=4",
)


# --- weight sharing, Deep Compression ----------------------------------------------------------


@dataclass(frozen=True)
class ShareStep:
    """share:bits=5[,conv_bits=8][,epochs=1,lr=0.0001]: k-means weight sharing (Deep
    Compression), centroids fine-tuned for `epochs` (none: needs no data); stored as model.dcz."""

    sharing: WeightSharing
    train: TrainConfig | None


def _build_share(args: dict[str, Any]) -> ShareStep:
    train = _retrain_config(args, "centroids", lr=1e-4)
    return ShareStep(WeightSharing(**args), train)


def _run_share(state: State, step: ShareStep) -> None:
    share_weights_(state.model, step.sharing)
    if step.train is not None:
        finetune_centroids(state.model, state.labelled("share"), _seeded(step.train, state))
    state.model.eval()
    state.notes["storage"] = "dcz"


def _build_deep_compression(args: dict[str, Any]) -> DeepCompression:
    return DeepCompression(**args)


def _run_deep_compression(state: State, config: DeepCompression) -> None:
    data = state.labelled("deep-compression")
    report = deep_compress_(state.model, replace(config, seed=state.seed), data, state.accuracy)
    state.notes["storage"] = "dcz"
    state.notes["deep_compression"] = {
        "schedule": vars(report.schedule),
        "baseline_accuracy": report.baseline_accuracy,
        "rounds": report.rounds,
        "pruned_accuracy": report.pruned_accuracy,
        "shared_accuracy": report.shared_accuracy,
        "nonzero": report.nonzero,
        "params": report.params,
        "planned_ratio": round(report.ratio, 2),
    }
    state.notes["sparsity"] = round(float(sparsity(state.model)), 4)


register_step(
    "share",
    _build_share,
    _run_share,
    main="bits",
    produces="torch-dcz",
    needs=labels_if(lambda step: step.train is not None),
    help="e.g. share:bits=5 or share:bits=5,conv_bits=8,epochs=1 (stored as model.dcz)",
)
register_step(
    "deep-compression",
    _build_deep_compression,
    _run_deep_compression,
    main="ratio",
    produces="torch-dcz",
    needs=labels_if(lambda c: True),
    help="Han et al.'s pipeline in one step: e.g. deep-compression or "
    "deep-compression:ratio=40[,rounds=4,epochs=2,final_epochs=4,lr=0.0003,bits=5,conv_bits=8,"
    "distill=0.5,temperature=4,sparsity=0.92] (stored as model.dcz)",
)
