"""Speed-up of data-parallel training: 2 processes x 1 thread (torchrun, gloo) vs 1 process.

Trains LeNet-300-100 (slimserve.zoo.MLP) on Fashion-MNIST for one epoch with the same global
batch in every configuration and reports the training seconds each took (`FitResult.seconds`,
start-up excluded) and samples per second.

    .venv/bin/python benchmarks/ddp_speedup.py            # runs all configurations
    torchrun --nproc_per_node=2 benchmarks/ddp_speedup.py --worker OUT.json   # one of them
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _repro_common import facts_markdown, fashion_mnist, machine_facts

from slimserve.train import TrainConfig, classification_loss, fit
from slimserve.train.distributed import init_distributed, is_main_process, shutdown
from slimserve.zoo import MLP


def worker(out: Path, samples: int, batch: int, threads: int) -> None:
    torch.set_num_threads(threads)
    init_distributed()
    xtr, ytr, _, _ = fashion_mnist()
    torch.manual_seed(0)
    model = MLP([784, 300, 100, 10])
    config = TrainConfig(epochs=1, lr=1e-3, batch_size=batch, progress=False)
    result = fit(model, classification_loss, (xtr[:samples], ytr[:samples]), config)
    if is_main_process():
        out.write_text(json.dumps({"seconds": result.seconds, "world": result.world_size}))
    shutdown()


def launch(procs: int, threads: int, samples: int, batch: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        args = [__file__, "--worker", str(out), "--samples", str(samples), "--batch", str(batch)]
        args += ["--threads", str(threads)]
        if procs > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            cmd += [f"--nproc_per_node={procs}", *args]
        else:
            cmd = [sys.executable, *args]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run(cmd, check=True, env=env, capture_output=True)
        result = json.loads(out.read_text())
    result |= {"procs": procs, "threads": threads, "samples_per_s": samples / result["seconds"]}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", type=Path)
    parser.add_argument("--samples", type=int, default=30720)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.samples, args.batch, args.threads)
    facts = machine_facts()
    rows = []
    for _ in range(args.repeats):  # alternate, so load changes hit every configuration
        for procs, threads in ((1, 1), (2, 1), (1, 2)):
            rows.append(launch(procs, threads, args.samples, args.batch))
            print(rows[-1], flush=True)
    best = {}
    for r in rows:
        key = (r["procs"], r["threads"])
        best[key] = min(best.get(key, float("inf")), r["seconds"])
    base = best[(1, 1)]
    lines = [
        "| processes x threads | best seconds | samples/s | speed-up vs 1x1 |",
        "|---|---|---|---|",
    ]
    for (p, t), s in best.items():
        lines.append(f"| {p} x {t} | {s:.2f} | {args.samples / s:.0f} | {base / s:.2f}x |")
    facts["loadavg_end"] = machine_facts()["loadavg"]
    head = f"`python {' '.join(sys.argv)}` ({args.samples} samples, batch {args.batch})"
    print(head + "\n\n" + "\n".join(lines) + "\n\n" + facts_markdown(facts))


if __name__ == "__main__":
    main()
