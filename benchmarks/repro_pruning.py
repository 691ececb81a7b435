"""Reproduce Han et al. 2015 (pruning) and Deep Compression (prune + share + Huffman).

LeNet-300-100 (slimserve.zoo.MLP [784, 300, 100, 10]) and LeNet-5 as Han et al. used it
(slimserve.zoo.CaffeLeNet, 20-50-500) on Fashion-MNIST:

1. train the dense baseline;
2. prune iteratively (global magnitude, cubic schedule) with L2-regularised retraining at a
   lower learning rate after each round, then retrain once more;
3. share weights (k-means per layer), fine-tune the centroids;
4. write the .dcz file (relative sparse indices + Huffman) and load it back, checking the
   round trip is bit-exact and measuring test accuracy of the loaded model.

Targets: >= 12x fewer non-zero weights after pruning; >= 40x (LeNet-300-100) and >= 39x
(LeNet-5) smaller stored size, codebooks, indices and header included; <= 0.5 points of test
accuracy lost at each stage.

    .venv/bin/python benchmarks/repro_pruning.py --model lenet300 --model lenet5
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _repro_common import facts_markdown, fashion_mnist, machine_facts

from slimserve.optimize.compress import (
    WeightSharing,
    finetune_centroids,
    load_compressed,
    save_compressed,
    share_weights_,
)
from slimserve.optimize.prune import (
    MagnitudePruning,
    count_nonzero,
    layer_sparsity,
    prune_iteratively,
)
from slimserve.train import TrainConfig, accuracy, classification_loss, fit
from slimserve.zoo import MLP, CaffeLeNet


@dataclass(frozen=True)
class Recipe:
    build: type
    args: tuple
    epochs: int  # dense training
    sparsity: float  # global target over weights
    rounds: int
    round_epochs: int
    final_epochs: int
    bits: int
    conv_bits: int
    lr: float = 1e-3


RECIPES = {
    "lenet300": Recipe(MLP, ([784, 300, 100, 10],), 8, 0.94, 4, 2, 4, 5, 5),
    "lenet5": Recipe(CaffeLeNet, (), 4, 0.93, 3, 1, 1, 5, 6),
}


def run(name: str, data: tuple, quick: bool) -> dict:
    r = RECIPES[name]
    xtr, ytr, xte, yte = data
    torch.manual_seed(0)
    model = r.build(*r.args)
    t0 = time.perf_counter()
    scale = 0.2 if quick else 1.0
    ep = lambda n: max(1, round(n * scale))  # noqa: E731
    base_cfg = TrainConfig(epochs=ep(r.epochs), lr=r.lr, batch_size=128, lr_gamma=0.85, desc=name)
    fit(model, classification_loss, (xtr, ytr), base_cfg)
    base = accuracy(model, xte, yte)
    print(f"{name}: dense {base:.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    retrain = TrainConfig(epochs=ep(r.round_epochs), lr=r.lr / 3, weight_decay=1e-5, batch_size=128)
    rounds = prune_iteratively(
        model, MagnitudePruning(amount=r.sparsity, scope="global"), (xtr, ytr), retrain,
        rounds=r.rounds, metric=lambda m: accuracy(m, xte, yte),
    )  # fmt: skip
    for rep in rounds:
        print(f"  round {rep.round}: sparsity {rep.sparsity:.4f} acc {rep.metric:.4f}", flush=True)
    final = TrainConfig(
        epochs=ep(r.final_epochs), lr=r.lr / 3, weight_decay=1e-5, batch_size=128, lr_gamma=0.6
    )
    fit(model, classification_loss, (xtr, ytr), final)
    pruned_acc = accuracy(model, xte, yte)
    nonzero, total = count_nonzero(model)
    print(f"  pruned {pruned_acc:.4f}, {total / nonzero:.1f}x fewer non-zeros", flush=True)

    share_weights_(model, WeightSharing(bits=r.bits, conv_bits=r.conv_bits))
    shared0 = accuracy(model, xte, yte)
    ft = TrainConfig(epochs=1, lr=r.lr / 10, batch_size=128, desc="centroids")
    finetune_centroids(model, (xtr, ytr), ft)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.dcz"
        stats = save_compressed(model, path)
        state = load_compressed(path)
    loaded = r.build(*r.args)
    loaded.load_state_dict(state)
    exact = all(
        torch.equal(state[k], v)
        for k, v in model.state_dict().items()
        if not k.endswith(("_mask", "_codes"))
    )
    shared_acc = accuracy(loaded, xte, yte)
    seconds = time.perf_counter() - t0
    print(f"  shared {shared0:.4f} -> {shared_acc:.4f}, {stats.ratio:.1f}x smaller", flush=True)
    return {
        "model": name,
        "params": total,
        "dense_acc": base,
        "pruned_acc": pruned_acc,
        "nonzero": nonzero,
        "nonzero_ratio": total / nonzero,
        "layer_sparsity": layer_sparsity(model),
        "shared_acc_before_ft": shared0,
        "compressed_acc": shared_acc,
        "dense_bytes": stats.dense_bytes,
        "stored_bytes": stats.stored_bytes,
        "size_ratio": stats.ratio,
        "round_trip_exact": exact,
        "seconds": seconds,
        "recipe": {k: v for k, v in r.__dict__.items() if k not in ("build", "args")},
    }


def markdown(results: list[dict], facts: dict, command: str) -> str:
    lines = [
        "| model | params | dense acc | pruned acc | non-zeros | fewer non-zeros | "
        "compressed acc | stored bytes | smaller | exact round trip | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['params']} | {100 * r['dense_acc']:.2f} | "
            f"{100 * r['pruned_acc']:.2f} | {r['nonzero']} | {r['nonzero_ratio']:.1f}x | "
            f"{100 * r['compressed_acc']:.2f} | {r['stored_bytes']} | {r['size_ratio']:.1f}x | "
            f"{r['round_trip_exact']} | {r['seconds']:.0f} |"
        )
    return f"`{command}`\n\n" + "\n".join(lines) + "\n\n" + facts_markdown(facts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=sorted(RECIPES))
    parser.add_argument("--quick", action="store_true", help="a fifth of the epochs (smoke run)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: shared box)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    facts = machine_facts()
    data = fashion_mnist()
    results = [run(m, data, args.quick) for m in args.model or ["lenet300", "lenet5"]]
    facts["loadavg_end"] = machine_facts()["loadavg"]
    command = "python " + " ".join(sys.argv)
    print(markdown(results, facts, command))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "facts": facts}, indent=1))


if __name__ == "__main__":
    main()
