"""Distillation on Fashion-MNIST (Hinton et al. 2015): how much of the teacher/student gap closes.

Teacher 784-1200-1200-10, trained on the 55,000 training images (the last 5,000 are the
validation split that every choice below is made on). Student 784-300-100-10 (--student for
another). Each student is trained from the same initial weights, with the same epochs, batch
128 and learning-rate decay, once on the labels alone and once distilled (alpha x T^2 x
KL(teacher_T || student_T) + (1 - alpha) x CE); the student alone tries each learning rate
of --alone-lrs and the distilled student each (T, alpha, lr) of --grid, and each keeps the
setting best on validation. Figures are test accuracy. gap closed = (distilled - alone) /
(teacher - alone); target (issue 3): >= 60%.

Three regimes (--regimes):
  full         every student sees all 55,000 labelled images (--epochs).
  labelled     (Hinton et al. section 5, soft targets as regularisers: 3% of the data) the
               students see only --labelled images; alone on their labels, distilled on the
               teacher's soft targets for those same images plus their labels.
  transfer     the same --labelled labelled images, and the other training images *without
               labels* as transfer set: the distilled student gets soft targets on all of them
               (Hinton et al. section 2: the transfer set may be unlabelled), the student alone
               can only use the labelled ones. Same number of optimizer steps for both.

    .venv/bin/python benchmarks/repro_distill.py
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _repro_common import facts_markdown, fashion_mnist, machine_facts  # noqa: E402

from slimserve.optimize.distill import DistillConfig, distill  # noqa: E402
from slimserve.train import TrainConfig, accuracy, classification_loss, fit  # noqa: E402
from slimserve.zoo import MLP  # noqa: E402

VAL = 5000
BATCH = 128


def train_alone(init: MLP, data: tuple, epochs: int, lr: float, gamma: float) -> MLP:
    student = copy.deepcopy(init)
    cfg = TrainConfig(
        epochs=epochs, lr=lr, batch_size=BATCH, lr_gamma=gamma, progress=False, desc="alone"
    )
    fit(student, classification_loss, data, cfg)
    return student


def train_distilled(
    init: MLP, teacher: MLP, data: tuple, epochs: int, setting: tuple, gamma: float
) -> MLP:
    temperature, alpha, lr = setting
    student = copy.deepcopy(init)
    dc = DistillConfig(
        temperature, alpha, epochs=epochs, lr=lr, batch_size=BATCH, lr_gamma=gamma, progress=False
    )
    distill(teacher, student, data, dc)
    return student


def best_on_val(trials: list[dict]) -> dict:
    return max(trials, key=lambda t: t["val"])


def regime(
    name: str, args, teacher: MLP, train: tuple, val: tuple, test: tuple, memo: dict
) -> dict:
    """Train the student alone and distilled in one regime; choices made on validation.

    memo: the students alone, shared by the labelled and transfer regimes (the same runs)."""
    x, y = train
    n = args.labelled
    labelled = (x[:n], y[:n])
    if name == "full":
        alone_data, kd_data, epochs, kd_epochs = train, train, args.epochs, args.epochs
    elif name == "labelled":
        alone_data, kd_data, epochs, kd_epochs = labelled, labelled, args.small_epochs, None
    else:  # transfer: labels only on the first n images; -1 marks the unlabelled rest
        y_partial = torch.cat([y[:n], torch.full((len(y) - n,), -1, dtype=y.dtype)])
        alone_data, kd_data, epochs = labelled, (x, y_partial), args.small_epochs
        # the same number of optimizer steps as the student alone gets on n images
        kd_epochs = max(1, round(epochs * math.ceil(n / BATCH) / math.ceil(len(x) / BATCH)))
    kd_epochs = kd_epochs or epochs
    gamma = args.gamma ** (args.epochs / epochs)  # the same total decay in every regime
    kd_gamma = gamma ** (epochs / kd_epochs)
    torch.manual_seed(1)
    init = MLP(args.student)
    alone, distilled = [], []
    for lr in args.alone_lrs:
        key = (name == "full", lr)
        if key not in memo:
            s = train_alone(init, alone_data, epochs, lr, gamma)
            memo[key] = {"lr": lr, "val": accuracy(s, *val), "test": accuracy(s, *test)}
        alone.append(memo[key])
        print(f"  {name} alone lr={lr:g}: val {alone[-1]['val']:.4f}", flush=True)
    for setting in args.grid:
        s = train_distilled(init, teacher, kd_data, kd_epochs, setting, kd_gamma)
        t, a, lr = setting
        distilled.append(
            {"T": t, "alpha": a, "lr": lr, "val": accuracy(s, *val), "test": accuracy(s, *test)}
        )
        print(f"  {name} distilled T={t:g} a={a:g} lr={lr:g}: val {distilled[-1]['val']:.4f}")
    return {
        "regime": name,
        "epochs": epochs,
        "kd_epochs": kd_epochs,
        "alone": best_on_val(alone),
        "distilled": best_on_val(distilled),
        "alone_trials": alone,
        "distilled_trials": distilled,
    }


def load_or_train_teacher(cache: Path | None, epochs: int, train: tuple) -> MLP:
    """784-1200-1200-10, Adam 1e-3 decayed x0.9 per epoch (cached as safetensors)."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    teacher = MLP([784, 1200, 1200, 10])
    if cache is not None and cache.exists():
        teacher.load_state_dict(load_file(cache))
        return teacher.eval()
    cfg = TrainConfig(
        epochs=epochs, lr=1e-3, batch_size=BATCH, lr_gamma=0.9, progress=False, desc="teacher"
    )
    fit(teacher, classification_loss, train, cfg)
    if cache is not None:
        save_file(teacher.state_dict(), cache)
    return teacher.eval()


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--teacher-cache", type=Path, help="safetensors file: reuse the teacher")
    parser.add_argument("--student", default="784-300-100-10")
    parser.add_argument("--regimes", default="full,labelled,transfer")
    parser.add_argument("--epochs", type=int, default=20, help="student epochs, full regime")
    parser.add_argument("--labelled", type=int, default=2000, help="labelled images (small)")
    parser.add_argument("--small-epochs", type=int, default=300, help="epochs on those images")
    parser.add_argument("--gamma", type=float, default=0.85, help="lr decay/epoch, full regime")
    parser.add_argument("--alone-lrs", type=_floats, default=[1e-3, 3e-3, 1e-2])
    parser.add_argument(
        "--grid",
        default="2:0.5:0.001,2:0.9:0.01,4:0.9:0.01",
        help="T:alpha:lr settings tried for the distilled student",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.student = [int(v) for v in args.student.split("-")]
    args.grid = [tuple(float(v) for v in p.split(":")) for p in args.grid.split(",")]
    torch.set_num_threads(1)
    facts = machine_facts()
    xtr, ytr, xte, yte = fashion_mnist()
    train, val, test = (xtr[:-VAL], ytr[:-VAL]), (xtr[-VAL:], ytr[-VAL:]), (xte, yte)
    t0 = time.perf_counter()
    teacher = load_or_train_teacher(args.teacher_cache, args.teacher_epochs, train)
    teacher_acc = accuracy(teacher, *test)
    print(f"teacher {teacher_acc:.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    results: list[dict] = []
    memo: dict = {}
    for name in args.regimes.split(","):
        r = regime(name, args, teacher, train, val, test, memo)
        gap = teacher_acc - r["alone"]["test"]
        gain = r["distilled"]["test"] - r["alone"]["test"]
        r["gap_closed"] = gain / gap if gap > 0 else float("nan")
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("trials")}), flush=True)
    facts["loadavg_end"] = machine_facts()["loadavg"]
    seconds = time.perf_counter() - t0
    print(f"`python {' '.join(sys.argv)}` ({seconds:.0f} s)\n\n{table(results, teacher_acc)}")
    print("\n" + facts_markdown(facts))
    if args.json:
        out = {"teacher_acc": teacher_acc, "results": results, "facts": facts, "seconds": seconds}
        args.json.write_text(json.dumps(out, indent=1))


def table(results: list[dict], teacher_acc: float) -> str:
    lines = [
        "| regime | epochs (alone / distilled) | teacher | alone (lr) | distilled (T, alpha, lr) "
        "| gap closed |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        a, d = r["alone"], r["distilled"]
        lines.append(
            f"| {r['regime']} | {r['epochs']} / {r['kd_epochs']} | {100 * teacher_acc:.2f} | "
            f"{100 * a['test']:.2f} ({a['lr']:g}) | {100 * d['test']:.2f} "
            f"({d['T']:g}, {d['alpha']:g}, {d['lr']:g}) | {r['gap_closed']:.0%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
