"""Distillation on Fashion-MNIST (Hinton et al. 2015): how much of the teacher/student gap closes.

Teacher 784-1200-1200-10; students 784-300-100-10 and a much smaller 784-32-10. Each student
is trained twice from the same initial weights, the same epochs and learning rate: once on
the labels alone, once distilled (temperature-softened KL x T^2 + hard-label CE). (T, alpha)
is chosen on a validation split (the last 5,000 training images); figures are test accuracy.

gap closed = (distilled - alone) / (teacher - alone). Target: >= 60%.

    .venv/bin/python benchmarks/repro_distill.py
"""

from __future__ import annotations

import argparse
import copy
import json
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


def run_student(sizes, teacher, train, val, test, epochs, grid) -> dict:
    torch.manual_seed(1)
    init = MLP(sizes)
    alone = copy.deepcopy(init)
    cfg = TrainConfig(epochs=epochs, lr=1e-3, batch_size=128, lr_gamma=0.85, desc="alone")
    fit(alone, classification_loss, train, cfg)
    trials = []
    for temperature, alpha in grid:
        student = copy.deepcopy(init)
        dc = DistillConfig(
            temperature, alpha, epochs=epochs, lr=1e-3, batch_size=128, lr_gamma=0.85
        )
        distill(teacher, student, train, dc)
        trials.append((accuracy(student, *val), temperature, alpha, accuracy(student, *test)))
        print(f"  {sizes} T={temperature} alpha={alpha}: val {trials[-1][0]:.4f}", flush=True)
    best = max(trials)
    return {
        "student": "-".join(map(str, sizes)),
        "alone_acc": accuracy(alone, *test),
        "alone_val": accuracy(alone, *val),
        "distilled_acc": best[3],
        "temperature": best[1],
        "alpha": best[2],
        "trials": trials,
    }


def load_or_train_teacher(cache: Path | None, epochs: int, train: tuple) -> MLP:
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    teacher = MLP([784, 1200, 1200, 10])
    if cache is not None and cache.exists():
        teacher.load_state_dict(load_file(cache))
        return teacher
    cfg = TrainConfig(epochs=epochs, lr=1e-3, batch_size=128, lr_gamma=0.85, desc="teacher")
    fit(teacher, classification_loss, train, cfg)
    if cache is not None:
        save_file(teacher.state_dict(), cache)
    return teacher


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher-epochs", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6, help="student epochs, alone and distilled")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grid", default="4:0.9,8:0.7", help="T:alpha pairs tried per student")
    parser.add_argument("--teacher-cache", type=Path, help="safetensors file: reuse the teacher")
    args = parser.parse_args()
    torch.set_num_threads(1)
    facts = machine_facts()
    xtr, ytr, xte, yte = fashion_mnist()
    train, val, test = (xtr[:-VAL], ytr[:-VAL]), (xtr[-VAL:], ytr[-VAL:]), (xte, yte)
    t0 = time.perf_counter()
    teacher = load_or_train_teacher(args.teacher_cache, args.teacher_epochs, train)
    teacher_acc = accuracy(teacher, *test)
    print(f"teacher {teacher_acc:.4f}", flush=True)
    grid = [(float(t), float(a)) for t, a in (p.split(":") for p in args.grid.split(","))]
    results = []
    for sizes in ([784, 300, 100, 10], [784, 32, 10]):
        r = run_student(sizes, teacher, train, val, test, args.epochs, grid)
        gap = teacher_acc - r["alone_acc"]
        r["gap_closed"] = (r["distilled_acc"] - r["alone_acc"]) / gap if gap > 0 else float("nan")
        results.append(r)
        print(r, flush=True)
    facts["loadavg_end"] = machine_facts()["loadavg"]
    lines = [
        "| student | teacher acc | student alone | distilled | (T, alpha) | gap closed |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['student']} | {100 * teacher_acc:.2f} | {100 * r['alone_acc']:.2f} | "
            f"{100 * r['distilled_acc']:.2f} | ({r['temperature']:g}, {r['alpha']:g}) | "
            f"{r['gap_closed']:.0%} |"
        )
    command = "python " + " ".join(sys.argv)
    print(
        f"`{command}` ({time.perf_counter() - t0:.0f} s)\n\n"
        + "\n".join(lines)
        + "\n\n"
        + facts_markdown(facts)
    )
    if args.json:
        args.json.write_text(
            json.dumps({"teacher_acc": teacher_acc, "results": results, "facts": facts}, indent=1)
        )


if __name__ == "__main__":
    main()
