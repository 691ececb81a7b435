"""Pruning, structured pruning, distillation and DDP through the command line, against
well-trained baselines, per seed (issue 16; the issue-3 reproductions redone as a user would).

Baselines, repositories and `slimserve optimize` runs come from `deep_compression_cli.py`
(trained once per model and seed, cached under --work, imported with `repo add`). Kinds:

- prune: `--recipe prune:0.92,rounds=4,epochs=4`; non-zeros (biases included) of the variant
  against the baseline's parameters, accuracy delta (Han et al. 2015: >= 12x, <= 0.5 points).
- structured: `structured:0.5,rounds=3,epochs=4`; MACs of the variant as the server loads it
  (`count_macs`), the optimize report's p50 latency at batch 1 for both (issue 3: >= 30% FLOPs,
  >= 1.25x p50, <= 0.5 points).
- distill: the LeNet-5 baseline of the same seed teaches a fresh 784-300-100-10 student
  (`distill:hidden=300-100,...`, the student alone being the LeNet-300-100 baseline of that seed,
  trained on the same schedule); gap closed = (distilled - alone) / (teacher - alone).
- ddp: the same recipe (iterative pruning: its retraining is what DDP splits) in one process
  and in two (`torchrun --nproc_per_node=2 -m slimserve optimize ... --parallel dp=2`),
  alternated `--repeats` times; accuracy of each, the recipe's own seconds (`build_seconds`
  in variant.yaml: the step, without start-up, evaluation and profiling) and the command's.
  A timing: run it on a quiet machine.

    OMP_NUM_THREADS=1 nice -n 15 python benchmarks/repro_cli.py --kind prune --model lenet300 \
        --seeds 0,1,2 --work /tmp/dcz --json out.json

`--val` trains and evaluates on a 50,000/10,000 split of the training set (the test set unread),
to choose settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from _repro_common import facts_markdown, fashion_mnist, machine_facts
from deep_compression_cli import (
    BASELINES,
    TEST_DATA,
    Run,
    build,
    by_model,
    imported,
    optimize,
    train_baseline,
)

from slimserve.optimize.artifacts import load_torch
from slimserve.optimize.structured import count_macs

RECIPES = {
    "prune": "prune:0.92,rounds=4,epochs=4",
    "structured": "structured:0.5,rounds=3,epochs=4",
    # The student alone is the LeNet-300-100 baseline: 30 epochs, Adam 1e-3 x0.9 per epoch.
    "distill": "distill:hidden=300-100,epochs=30,lr=0.001,lr_gamma=0.9,temperature=2,alpha=0.5",
    "ddp": "prune:0.92,rounds=4,epochs=4",
}
VAL_ROWS = 50_000
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2")


def val_split(work: Path) -> tuple[tuple, tuple[str, str]]:
    """The 50k/10k split of the training set (a fixed permutation), as tensors and as .npz
    files for --data/--eval-data."""
    x, y, _, _ = fashion_mnist()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    tr, va = order[:VAL_ROWS], order[VAL_ROWS:]
    files = (work / "val-train50k.npz", work / "val-held10k.npz")
    for path, rows in zip(files, (tr, va), strict=True):
        if not path.exists():
            np.savez(path, x=x[rows].numpy(), y=y[rows].numpy())
    return (x[tr], y[tr], x[va], y[va]), (str(files[0]), str(files[1]))


def macs(run: Run, name: str) -> int:
    """MACs per example of the variant as the server builds it."""
    b = BASELINES[name]
    doc = run.doc
    model = load_torch(
        run.variant_dir, doc.get("model_class", b.model_class), doc.get("model_args", b.model_args)
    )
    shape = [int(s) for s in b.input_shape.split(",")]
    return count_macs(model.eval(), torch.zeros(1, *shape))


def row(kind: str, name: str, seed: int, run: Run, extra: dict) -> dict:
    profile, original = run.doc["profile"], run.original
    base, acc = original["accuracy"], profile["accuracy"]
    out = {
        "kind": kind,
        "model": name,
        "seed": seed,
        "baseline_acc": base,
        "acc": acc,
        "drop_points": 100 * (base - acc),
        "nonzero_ratio": original["parameters"] / profile["nonzeros"],
        "p50_b1_ms": (original["latency_ms_batch1"], profile["latency_ms_batch1"]),
        "notes": run.doc.get("notes", {}),
        "seconds": run.seconds,
        "command": run.command,
        "load": os.getloadavg()[0],
    }
    return out | extra


def one(args: argparse.Namespace, name: str, seed: int, ctx: dict) -> list[dict]:
    data, files, tag = ctx["data"], ctx["files"], ctx["tag"]
    recipe = args.recipe or RECIPES[args.kind]
    if args.kind == "distill":
        teacher_w, teacher_acc = train_baseline("lenet5", seed, args.work, data, tag)
        _, alone_acc = train_baseline("lenet300", seed, args.work, data, tag)
        repo, model = imported("lenet5", seed, teacher_w, args.work, tag)
        run = optimize(repo, model, recipe, seed, files)
        acc = run.doc["profile"]["accuracy"]
        gap = (acc - alone_acc) / (teacher_acc - alone_acc)
        extra = {"teacher_acc": teacher_acc, "alone_acc": alone_acc, "gap_closed": gap}
        return [row("distill", "lenet300<-lenet5", seed, run, extra)]
    weights, acc = train_baseline(name, seed, args.work, data, tag)
    if acc < BASELINES[name].target and not tag:
        print(f"WARNING {name} seed {seed}: baseline {acc:.4f} under target", flush=True)
    repo, model = imported(name, seed, weights, args.work, tag)
    if args.kind == "ddp":
        rows = []
        for i in range(args.repeats):
            for procs in (1, 2):
                launcher = TORCHRUN if procs == 2 else ()
                extra = ("--parallel", "dp=2") if procs == 2 else ()
                run = optimize(repo, model, recipe, seed, files, launcher, extra)
                rows.append(row("ddp", name, seed, run, {"processes": procs, "repeat": i}))
        return rows
    run = optimize(repo, model, recipe, seed, files)
    extra = {}
    if args.kind == "structured":
        b = BASELINES[name]
        dense = build(b)
        dense.load_state_dict(load_file(str(weights)))
        example = torch.zeros(1, *(int(s) for s in b.input_shape.split(",")))
        extra = {"macs": (count_macs(dense.eval(), example), macs(run, name))}
    return [row(args.kind, name, seed, run, extra)]


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _pm(values: list[float], fmt: str = "+.2f") -> str:
    return f"{statistics.mean(values):{fmt}} +- {_sd(values):{fmt.lstrip('+')}}"


def _ms(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.4f} -> {pair[1]:.4f}"


def table(rows: list[dict]) -> list[str]:
    """Markdown per seed, then mean +- sd per model (drop: baseline - result, in points)."""
    kind = rows[0]["kind"]
    if kind == "distill":
        head = "| seed | teacher (LeNet-5) | student alone | distilled | gap closed |"
        cells = [
            f"| {r['seed']} | {100 * r['teacher_acc']:.2f} | {100 * r['alone_acc']:.2f} "
            f"| {100 * r['acc']:.2f} | {100 * r['gap_closed']:.0f}% |"
            for r in rows
        ]
        gaps = [100 * r["gap_closed"] for r in rows]
        cells.append(f"| **mean +- sd** | | | | **{_pm(gaps, '.0f')}%** |")
        return [head, "|---|---|---|---|---|", *cells]
    if kind == "ddp":
        head = (
            "| seed | repeat | processes | accuracy | step seconds | command seconds | load avg |"
        )
        cells = [
            f"| {r['seed']} | {r['repeat']} | {r['processes']} | {100 * r['acc']:.2f} "
            f"| {r['notes'].get('build_seconds', float('nan')):.1f} | {r['seconds']:.1f} "
            f"| {r['load']:.2f} |"
            for r in rows
        ]
        return [head, "|---|---|---|---|---|---|---|", *cells]
    head = (
        "| model | seed | baseline acc | result acc | drop (points) | fewer non-zeros "
        "| p50 batch 1 (ms) | MACs removed |"
    )
    cells = []
    for r in rows:
        removed = f"{100 * (1 - r['macs'][1] / r['macs'][0]):.1f}%" if "macs" in r else ""
        cells.append(
            f"| {r['model']} | {r['seed']} | {100 * r['baseline_acc']:.2f} | {100 * r['acc']:.2f} "
            f"| {r['drop_points']:+.2f} | {r['nonzero_ratio']:.1f}x | {_ms(r['p50_b1_ms'])} "
            f"| {removed} |"
        )
    for name, mine in by_model(rows):
        speed = [r["p50_b1_ms"][0] / r["p50_b1_ms"][1] for r in mine]
        cells.append(
            f"| **{name} mean +- sd** | {len(mine)} seeds "
            f"| {100 * statistics.mean(r['baseline_acc'] for r in mine):.2f} "
            f"| {100 * statistics.mean(r['acc'] for r in mine):.2f} "
            f"| **{_pm([r['drop_points'] for r in mine])}** "
            f"| **{_pm([r['nonzero_ratio'] for r in mine], '.1f')}x** "
            f"| speed-up {_pm(speed, '.2f')}x | |"
        )
    return [head, "|---|---|---|---|---|---|---|---|", *cells]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", choices=sorted(RECIPES), required=True)
    parser.add_argument("--model", action="append", choices=sorted(BASELINES))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--recipe", help="default: per kind (RECIPES)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimserve-dcz"))
    parser.add_argument("--val", action="store_true", help="50k/10k split of the training set")
    parser.add_argument("--repeats", type=int, default=1, help="ddp: alternated repeats")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    args.work.mkdir(parents=True, exist_ok=True)
    if args.val:
        data, files = val_split(args.work)
        ctx = {"data": data, "files": files, "tag": "val50k"}
    else:
        ctx = {"data": fashion_mnist(), "files": TEST_DATA, "tag": ""}
    rows: list[dict] = []
    models = ["lenet300"] if args.kind == "distill" else args.model or ["lenet300"]
    for name in models:
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += one(args, name, seed, ctx)
            print("\n".join(table(rows)), flush=True)
            if args.json:  # after each seed: a run cut short keeps what it measured
                args.json.write_text(json.dumps({"rows": rows, "facts": machine_facts()}, indent=2))
    print("\n".join(table(rows)) + "\n\n" + facts_markdown(machine_facts()))


if __name__ == "__main__":
    main()
