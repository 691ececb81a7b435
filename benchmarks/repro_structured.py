"""Structured pruning of an MLP and a small CNN on Fashion-MNIST: smaller dense models.

LeNet-300-100 (slimserve.zoo.MLP), the small LeNet-5 (slimserve.zoo.LeNet5, 6-16 channels) and
Han et al.'s LeNet-5 (slimserve.zoo.CaffeLeNet, 20-50 channels, 500 hidden):
train, remove a fraction of every hidden layer's neurons / channels by L2 norm (the layers
after them resized), fine-tune, and measure multiply-accumulates, test accuracy and p50
latency of plain eager PyTorch (dense kernels) at batch 1 and 64, one thread. Latencies are
taken alternating the two models call by call, so load on the shared machine hits both alike.

Targets: >= 30% of FLOPs removed, >= 1.25x lower p50 latency, <= 0.5 points lost.

    .venv/bin/python benchmarks/repro_structured.py
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _repro_common import facts_markdown, fashion_mnist, machine_facts

from slimserve.optimize.prune import StructuredPruning, prune_
from slimserve.optimize.structured import count_macs
from slimserve.train import TrainConfig, accuracy, classification_loss, fit
from slimserve.zoo import MLP, CaffeLeNet, LeNet5

MODELS = {
    # name: (constructor, dense epochs, amount removed, fine-tune epochs)
    "mlp-300-100": (lambda: MLP([784, 300, 100, 10]), 6, 0.5, 3),
    "lenet5-small": (LeNet5, 5, 0.4, 3),
    "lenet5-caffe": (CaffeLeNet, 4, 0.5, 2),  # Han et al.'s LeNet-5 (20-50-500)
}


def p50_latency_us(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor, n: int) -> tuple:
    """Median microseconds per call of `a` and `b`, measured interleaved."""
    times = np.zeros((2, n))
    with torch.inference_mode():
        for model in (a, b):
            for _ in range(20):
                model(x)
        for i in range(n):
            for j, model in enumerate((a, b)):
                t = time.perf_counter_ns()
                model(x)
                times[j, i] = time.perf_counter_ns() - t
    return float(np.median(times[0]) / 1e3), float(np.median(times[1]) / 1e3)


def run(name: str, data: tuple, iters: int) -> dict:
    build, epochs, amount, ft_epochs = MODELS[name]
    xtr, ytr, xte, yte = data
    torch.manual_seed(0)
    dense = build()
    t0 = time.perf_counter()
    fit(
        dense,
        classification_loss,
        (xtr, ytr),
        TrainConfig(epochs=epochs, lr=1e-3, batch_size=128, lr_gamma=0.85, desc=name),
    )
    dense_acc = accuracy(dense, xte, yte)
    small = copy.deepcopy(dense)
    prune_(small, StructuredPruning(amount=amount), data=(xtr[:512], ytr[:512]))
    oneshot = accuracy(small, xte, yte)
    fit(
        small,
        classification_loss,
        (xtr, ytr),
        TrainConfig(epochs=ft_epochs, lr=3e-4, batch_size=128, desc="finetune"),
    )
    small_acc = accuracy(small, xte, yte)
    example = xte[:1]
    macs = count_macs(dense.eval(), example), count_macs(small.eval(), example)
    params = sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in small.parameters())
    lat1 = p50_latency_us(dense, small, xte[:1], iters)
    lat64 = p50_latency_us(dense, small, xte[:64], max(iters // 10, 50))
    print(f"{name}: {dense_acc:.4f} -> {oneshot:.4f} one-shot -> {small_acc:.4f}; MACs {macs}; "
          f"p50 b1 {lat1}, b64 {lat64}", flush=True)  # fmt: skip
    return {
        "model": name,
        "amount": amount,
        "shape": str(small),
        "dense_acc": dense_acc,
        "oneshot_acc": oneshot,
        "pruned_acc": small_acc,
        "macs": macs,
        "params": params,
        "flops_removed": 1 - macs[1] / macs[0],
        "p50_b1_us": lat1,
        "p50_b64_us": lat64,
        "seconds": time.perf_counter() - t0,
    }


def markdown(results: list[dict], facts: dict, command: str) -> str:
    lines = [
        "| model | removed per layer | MACs dense -> pruned | FLOPs removed | dense acc | "
        "one-shot acc | fine-tuned acc | p50 b=1 (us) | speed-up b=1 | p50 b=64 (us) | "
        "speed-up b=64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        (d1, s1), (d64, s64) = r["p50_b1_us"], r["p50_b64_us"]
        lines.append(
            f"| {r['model']} | {r['amount']:.0%} | {r['macs'][0]} -> {r['macs'][1]} | "
            f"{r['flops_removed']:.1%} | {100 * r['dense_acc']:.2f} | "
            f"{100 * r['oneshot_acc']:.2f} | {100 * r['pruned_acc']:.2f} | "
            f"{d1:.1f} -> {s1:.1f} | {d1 / s1:.2f}x | {d64:.0f} -> {s64:.0f} | {d64 / s64:.2f}x |"
        )
    return f"`{command}`\n\n" + "\n".join(lines) + "\n\n" + facts_markdown(facts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", choices=sorted(MODELS))
    parser.add_argument("--iters", type=int, default=2000, help="latency samples per model")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    facts = machine_facts()
    data = fashion_mnist()
    results = [run(m, data, args.iters) for m in args.model or list(MODELS)]
    facts["loadavg_end"] = machine_facts()["loadavg"]
    print(markdown(results, facts, "python " + " ".join(sys.argv)))
    if args.json:
        args.json.write_text(json.dumps({"results": results, "facts": facts}, indent=1))


if __name__ == "__main__":
    main()
