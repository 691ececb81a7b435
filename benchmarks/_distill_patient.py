"""The `patient` regime of repro_distill.py: function matching (Beyer et al. 2022, "Knowledge
distillation: A good teacher is patient and consistent").

Both students 784-300-100-10 see the same 55,000 labelled training images for the same epochs.
The distilled student is trained online by `distill(..., DistillConfig(augment=view))`: every
step draws one random view of the batch (horizontal flips, shifts, mixup between images, as
`--patient-grid` says) and the teacher is run on that same view ("consistent"); alpha = 1, so
it learns from the teacher alone. The student alone tries each view of `--patient-alone` on its
labels (mixup with mixed labels), so its best setting, augmented or not, is the baseline.

Choices are made on the 5,000 validation images with seed 0; the chosen settings then train
with seeds 1..n-1 (other initial weights, batch order and views). Gap closed = (mean distilled
- mean alone) / (teacher - mean alone), on test accuracy.

The `labelled-patient` regime runs the same machinery on the labelled regime's data (Hinton et
al. section 5, soft targets as regularisers): both students see only the first --labelled
training images, the views are made from those images alone, and the teacher (the one trained
on the full training split) is the only channel of extra knowledge. Its grid also takes alpha
(view:T:alpha:lr), and a grid entry with view "none" is plain distillation (the teacher's soft
targets computed once on the plain images, as the labelled regime does): the best such entry
is trained on every seed too, as a reference arm beside function matching.
"""

from __future__ import annotations

import copy
import math
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimserve.optimize.distillation import DistillConfig, distill
from slimserve.train import TrainConfig, accuracy, fit, predict
from slimserve.zoo import MLP

BATCH = 128
# (x (B, 784), y (B,)) -> (view (B, 784), partner labels (B,) or None, mix weights (B,) or None)
View = Callable[[torch.Tensor, torch.Tensor], tuple]


@dataclass(frozen=True)
class Plan:
    """One regime's students, tried on seed 0: the student alone's settings {view, lr,
    epochs} and the distilled student's {view, T, alpha, lr, epochs}."""

    name: str
    alone: list[dict]
    grid: list[dict]


def parse_alone(text: str, epochs: int) -> list[dict]:
    """ "view:lr[:epochs],..." -> settings of the student alone (epochs: `epochs` if left out)."""
    settings = []
    for part in text.split(","):
        fields = part.split(":")
        if len(fields) not in (2, 3):
            raise SystemExit(f"setting {part!r}: use view:lr or view:lr:epochs")
        parse_view(fields[0])
        e = int(fields[2]) if len(fields) == 3 else epochs
        settings.append({"view": fields[0], "lr": float(fields[1]), "epochs": e})
    return settings


def parse_grid(text: str, with_alpha: bool, epochs: int) -> list[dict]:
    """ "view:T:lr[:epochs],..." (alpha = 1) or, with_alpha, "view:T:alpha:lr[:epochs],..." ->
    settings of the distilled student; refuses a bad view, and alpha < 1 with mixup (the
    labels term would see the unmixed label of a mixed image)."""
    form = f"view:T:{'alpha:' if with_alpha else ''}lr[:epochs]"
    grid = []
    for part in text.split(","):
        view, *nums = part.split(":")
        n = 3 if with_alpha else 2
        if len(nums) not in (n, n + 1):
            raise SystemExit(f"grid entry {part!r}: use {form}")
        t, alpha, lr = (
            (*map(float, nums[:3]),) if with_alpha else (float(nums[0]), 1.0, float(nums[1]))
        )
        if parse_view(view)[2] and alpha < 1:
            raise SystemExit(f"grid entry {part!r}: mixup views need alpha = 1")
        e = int(nums[n]) if len(nums) > n else epochs
        grid.append({"view": view, "T": t, "alpha": alpha, "lr": lr, "epochs": e})
    return grid


def parse_view(spec: str) -> tuple[int, bool, float]:
    """ "none", or "+"-joined parts of "flip", "shift<k>" (pixels), "mixup<a>" (Beta(a, a))."""
    shift, flip, mix = 0, False, 0.0
    for part in spec.split("+"):
        if part == "flip":
            flip = True
        elif m := re.fullmatch(r"shift(\d+)", part):
            shift = int(m[1])
        elif m := re.fullmatch(r"mixup([\d.]+)", part):
            mix = float(m[1])
        elif part != "none":
            raise SystemExit(f"view {spec!r}: use none or flip, shift<k>, mixup<a> joined by +")
    return shift, flip, mix


def make_view(spec: str) -> View:
    """Random views: jitter (repro_distill.jitter), then each image mixed with a random other
    image of the batch, x' = lam x_i + (1 - lam) x_j, lam ~ Beta(a, a) per image."""
    from repro_distill import jitter

    shift, flip, mix = parse_view(spec)

    def view(x: torch.Tensor, y: torch.Tensor) -> tuple:
        if shift or flip:
            x = jitter(x, shift, flip)
        if not mix:
            return x, None, None
        partner = torch.randperm(len(x))
        lam = torch.distributions.Beta(mix, mix).sample((len(x),))
        return lam[:, None] * x + (1 - lam[:, None]) * x[partner], y[partner], lam

    return view


def alone_loss(spec: str) -> Callable:
    """Cross-entropy on a view; with mixup, lam x CE(y_i) + (1 - lam) x CE(y_j)."""
    view = make_view(spec)

    def loss_fn(model: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = batch
        v, y2, lam = view(x, y)
        out = model(v)
        if lam is None:
            return F.cross_entropy(out, y)
        ce = F.cross_entropy(out, y, reduction="none")
        return (lam * ce + (1 - lam) * F.cross_entropy(out, y2, reduction="none")).mean()

    return loss_fn


class Bf16Teacher(nn.Module):
    """The teacher run under bf16 autocast, logits back in float32: its forward is ~4x faster
    on a CPU with avx512_bf16 (0.9 s against 3.3 s for 55,000 images, 1 thread), which is
    what makes a teacher forward every step affordable. Its accuracy is reported as measured."""

    def __init__(self, teacher: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.teacher(x).float()


def _train_config(args, epochs: int, lr: float, seed: int) -> TrainConfig:
    gamma = args.gamma ** (args.epochs / epochs)  # the full regime's total decay
    return TrainConfig(
        epochs=epochs, lr=lr, batch_size=BATCH, lr_gamma=gamma, progress=False, seed=seed
    )


def train_alone(init: MLP, train: tuple, setting: dict, args, seed: int) -> MLP:
    student = copy.deepcopy(init)
    torch.manual_seed(seed)  # the views' random stream
    tc = _train_config(args, setting["epochs"], setting["lr"], seed)
    fit(student, alone_loss(setting["view"]), train, tc)
    return student


def train_matched(init: MLP, teacher: nn.Module, train: tuple, setting: dict, args, seed: int):
    """Function matching on `setting`'s views; view "none" is plain distillation (the
    teacher's soft targets computed once, on the plain images)."""
    student = copy.deepcopy(init)
    view = make_view(setting["view"])
    tc = _train_config(args, setting["epochs"], setting["lr"], seed)
    dc = DistillConfig(
        setting["T"], setting["alpha"], epochs=tc.epochs, lr=tc.lr, batch_size=BATCH,
        lr_gamma=tc.lr_gamma, progress=False, seed=seed,
        augment=None if setting["view"] == "none" else lambda x, y: view(x, y)[0],
    )  # fmt: skip
    torch.manual_seed(seed)
    distill(teacher, student, train, dc)
    return student


def _score(model: nn.Module, val: tuple, test: tuple, teacher_right: torch.Tensor, **setting):
    """Accuracies, and the test images only the teacher / only this student gets right."""
    right = predict(model, test[0]).argmax(1) == test[1]
    return {
        **setting,
        "val": accuracy(model, *val),
        "test": float(right.float().mean()),
        "only_teacher_right": int((teacher_right & ~right).sum()),
        "only_student_right": int((right & ~teacher_right).sum()),
    }


def run(
    args, plan: Plan, teacher: nn.Module, teacher_acc: float, train: tuple, val: tuple, test: tuple
) -> dict:
    """Seed 0 chooses each student's setting on validation; seeds 1.. repeat the chosen ones.

    Arms: the student alone; function matching (the best grid entry with a view); plain
    distillation (the best grid entry with view "none"), when the grid has one."""
    inits = []
    for seed in range(args.seeds):
        torch.manual_seed(1 + seed)
        inits.append(MLP(args.student))
    t0 = time.perf_counter()
    teacher_right = predict(teacher, test[0]).argmax(1) == test[1]

    def trial(setting: dict, seed: int) -> dict:
        """Train one student (alone when the setting has no T) and score it."""
        if "T" in setting:
            s = train_matched(inits[seed], teacher, train, setting, args, seed)
        else:
            s = train_alone(inits[seed], train, setting, args, seed)
        return _score(s, val, test, teacher_right, **setting, seed=seed)

    trials: dict[str, list[dict]] = {"alone": [], "kd": []}
    candidates = [("alone", a) for a in plan.alone] + [("kd", g) for g in plan.grid]
    for kind, setting in candidates:
        trials[kind].append(trial(setting, 0))
        print(f"  {plan.name} {kind} {setting}: val {trials[kind][-1]['val']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)  # fmt: skip
    matched = [t for t in trials["kd"] if t["view"] != "none"]
    plain = [t for t in trials["kd"] if t["view"] == "none"]
    # plain distillation is the distilled student itself when the grid has no view
    arms = {"alone": _best(trials["alone"]), "distilled": _best(matched or plain)}
    if matched and plain:
        arms["plain"] = _best(plain)
    for seed in range(1, args.seeds):
        for rows in arms.values():
            rows.append(trial(_setting(rows[0]), seed))
        tests = ", ".join(f"{arm} {rows[-1]['test']:.4f}" for arm, rows in arms.items())
        print(f"  seed {seed}: {tests} (test; {time.perf_counter() - t0:.0f} s)", flush=True)
    out = summarise(teacher_acc, arms["alone"], arms["distilled"])
    if "plain" in arms:
        plain = summarise(teacher_acc, arms["alone"], arms["plain"])
        out["plain"] = {
            k: v for k, v in plain.items() if k.startswith(("distill", "gain", "gap_c"))
        }
    return out | {
        "regime": plan.name,
        "epochs": arms["alone"][0]["epochs"],
        "kd_epochs": arms["distilled"][0]["epochs"],
        "alone_trials": trials["alone"],
        "distilled_trials": trials["kd"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _best(trials: list[dict]) -> list[dict]:
    """The trial best on validation, as the first row of its arm."""
    return [max(trials, key=lambda t: t["val"])]


def _setting(row: dict) -> dict:
    """The training setting of a scored row."""
    return {k: row[k] for k in ("view", "T", "alpha", "lr", "epochs") if k in row}


def summarise(teacher_acc: float, alone: list[dict], matched: list[dict]) -> dict:
    """Means, spreads, the gap closed on the means, and per seed (same initial weights)."""
    a = [r["test"] for r in alone]
    m = [r["test"] for r in matched]
    diffs = [x - y for x, y in zip(m, a, strict=True)]
    mean_a, mean_m = statistics.fmean(a), statistics.fmean(m)
    gap = teacher_acc - mean_a
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    # the teacher's lead over one student alone, measured on the same 10,000 test images:
    # its standard error from the images on which they disagree (paired, as McNemar's test)
    b, c = alone[0]["only_teacher_right"], alone[0]["only_student_right"]
    n = 10_000
    gap_se = math.sqrt(b + c - (b - c) ** 2 / n) / n
    return {
        "teacher_acc": teacher_acc,
        "alone": alone,
        "distilled": matched,
        "alone_mean": mean_a,
        "alone_std": statistics.stdev(a) if len(a) > 1 else float("nan"),
        "distilled_mean": mean_m,
        "distilled_std": statistics.stdev(m) if len(m) > 1 else float("nan"),
        "gain_mean": mean_m - mean_a,
        "gain_se": se,
        "gap": gap,
        "gap_se_test_images": gap_se,
        "gap_closed": (mean_m - mean_a) / gap if gap > 0 else float("nan"),
        "gap_closed_per_seed": [d / (teacher_acc - x) for d, x in zip(diffs, a, strict=True)],
    }


def table(r: dict) -> str:
    """The regime's row (function matching) and, when run, plain distillation's."""
    a = r["alone"][0]
    alone = (
        f"{100 * r['alone_mean']:.2f} +- {100 * r['alone_std']:.2f} ({_per_seed(r['alone'])}; "
        f"{a['view']}, lr {a['lr']:g}, {a['epochs']} epochs)"
    )
    lines = [
        "| teacher | distilled | alone: mean +- sd (per seed) | distilled: mean +- sd (per seed) "
        "| gain +- SE | gap closed (per seed) |",
        "|---|---|---|---|---|---|",
    ]
    arms = [("function matching", r)] + ([("plain", r["plain"])] if "plain" in r else [])
    for name, s in arms:
        d = s["distilled"][0]
        setting = f"{d['view']}, T {d['T']:g}, alpha {d['alpha']:g}, lr {d['lr']:g}"
        per_seed = ", ".join(f"{g:.0%}" for g in s["gap_closed_per_seed"])
        lines.append(
            f"| {100 * r['teacher_acc']:.2f} | {name} | {alone} | {100 * s['distilled_mean']:.2f} "
            f"+- {100 * s['distilled_std']:.2f} ({_per_seed(s['distilled'])}; {setting}, "
            f"{d['epochs']} epochs) | {100 * s['gain_mean']:+.2f} +- {100 * s['gain_se']:.2f} | "
            f"**{s['gap_closed']:.0%}** ({per_seed}) |"
        )
    return "\n".join(lines)


def _per_seed(rows: list[dict]) -> str:
    return ", ".join(f"{100 * x['test']:.2f}" for x in rows)
