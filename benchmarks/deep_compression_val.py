"""Choose Deep Compression settings on a validation split of the training set (issue 16).

Per seed: a LeNet-300-100 baseline trained on the first 50,000 training rows (the benchmark's
schedule: Adam 1e-3, batch 128, 30 epochs, lr x0.9 per epoch; cached as safetensors), then
`deep_compress_` with the settings given on those 50,000 rows, and the accuracy drop on the
10,000 rows held out (rows 50,000-59,999 of a fixed permutation). The test set is not read, so
settings chosen here can be reported on it afterwards (benchmarks/deep_compression_cli.py).

    OMP_NUM_THREADS=1 python benchmarks/deep_compression_val.py --seeds 0,1,2 \
        --set final_epochs=12 --work /tmp/dcz-val --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).parent))
from _repro_common import fashion_mnist

from slimserve.optimize.compress import compressed_size
from slimserve.optimize.deep_compression import DeepCompression, deep_compress_
from slimserve.train import TrainConfig, accuracy, classification_loss, fit
from slimserve.zoo import MLP

TRAIN_ROWS = 50_000


def split() -> tuple[torch.Tensor, ...]:
    x, y, _, _ = fashion_mnist()
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    tr, va = order[:TRAIN_ROWS], order[TRAIN_ROWS:]
    return x[tr], y[tr], x[va], y[va]


def baseline(seed: int, work: Path, data: tuple[torch.Tensor, ...]) -> MLP:
    path = work / f"lenet300-val50k-seed{seed}.safetensors"
    torch.manual_seed(seed)
    model = MLP([784, 300, 100, 10])
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model
    config = TrainConfig(epochs=30, lr=1e-3, batch_size=128, lr_gamma=0.9, seed=seed)
    fit(model, classification_loss, data[:2], config)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model


def run(seed: int, settings: dict, work: Path, data: tuple[torch.Tensor, ...]) -> dict:
    xtr, ytr, xva, yva = data
    model = baseline(seed, work, data)
    base = accuracy(model, xva, yva)
    config = DeepCompression(seed=seed, progress=False, **settings)
    t0 = time.perf_counter()
    report = deep_compress_(model, config, (xtr, ytr))
    acc = accuracy(model, xva, yva)
    return {
        "seed": seed,
        "val_baseline": base,
        "val_compressed": acc,
        "drop_points": 100 * (base - acc),
        "ratio": compressed_size(model).ratio,
        "sparsity": report.schedule.sparsity,
        "seconds": time.perf_counter() - t0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], help="field=value (YAML value)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slimserve-dcz-val"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    settings = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    data = split()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(run(seed, settings, args.work, data))
        print(json.dumps(rows[-1]), flush=True)
    drops = [r["drop_points"] for r in rows]
    sd = statistics.stdev(drops) if len(drops) > 1 else 0.0
    ratios = [r["ratio"] for r in rows]
    print(
        f"settings {settings}: val drop {statistics.mean(drops):+.2f} +- {sd:.2f} points, "
        f"{statistics.mean(ratios):.1f}x (min {min(ratios):.1f}x)",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
