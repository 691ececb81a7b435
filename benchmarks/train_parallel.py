"""Training step time and memory per process: one process, DDP, PP, FSDP and dp x pp.

Every configuration trains the same MLP (784-2048-2048-2048-10, 10.5M weights, Adam) on the
same global batches of random inputs (timing only: the values do not matter) through
`slimserve.train.fit`, each process on one thread, started by torchrun like a user would.
Each run of a configuration trains one cold epoch (memory) and then `--repeats` timed epochs
(`FitResult.seconds`, set-up excluded); its seconds per step is the slowest rank's median.
Configurations alternate for `--rounds` rounds; the table gives the median over rounds
(memory from the last round). Memory per process:

- state MiB: the bytes this process holds for training (its parameters, gradients and Adam
  moments), counted from the part of the model it trains (its stage; 1/N under FSDP);
- peak RSS growth MiB: the process's resident-set high-water mark during the first (cold)
  epoch (Linux VmHWM, reset through /proc/self/clear_refs) minus its RSS before it, so
  imports, data and the caller's copy of the model are not counted; set-up is (FSDP's sharded
  copy, the pipeline's buffers). With glibc's default, freed large blocks may stay in the
  heap, so the high-water mark can count memory already given back by torch; `--mmap-bytes
  65536` makes every tensor of 64 KiB or more its own mapping, returned when freed.

    python benchmarks/train_parallel.py                      # all configurations, one table
    torchrun --nproc_per_node=2 benchmarks/train_parallel.py --worker OUT.json --parallel pp=2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _repro_common import facts_markdown, machine_facts

from slimserve.train import TrainConfig, classification_loss, fit
from slimserve.train.distributed import DistContext, init_distributed, shutdown
from slimserve.train.parallel import parse_parallel
from slimserve.train.stages import pipeline_blocks, split_blocks
from slimserve.zoo import MLP

SIZES = [784, 2048, 2048, 2048, 10]
CONFIGS = [("one process", 1, None), ("DDP", 2, "dp=2"), ("PP", 2, "pp=2")]
CONFIGS += [("FSDP", 2, "fsdp=2"), ("dp x pp", 4, "dp=2,pp=2")]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(out: Path, parallel: str | None, steps: int, batch: int, repeats: int) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed(parallel=parse_parallel(parallel) if parallel else None)
    torch.manual_seed(0)
    rows = steps * batch
    x, y = torch.randn(rows, SIZES[0]), torch.randint(0, SIZES[-1], (rows,))
    model = MLP(SIZES)
    config = TrainConfig(epochs=1, batch_size=batch, shuffle=False, progress=False)
    # The first fit, cold: its RSS high-water mark over the RSS before it is the memory that
    # training (set-up included) added to this process.
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    fit(model, classification_loss, (x, y), config)
    peak = (_status_kib("VmHWM") - before) / 1024
    seconds = []  # then the timed epochs, warm
    for _ in range(repeats):
        result = fit(model, classification_loss, (x, y), config)
        seconds.append(result.seconds / result.steps)
    report = {"rank": ctx.rank, "step_s": statistics.median(seconds), "peak_mib": peak}
    report["state_mib"] = _state_bytes(model, ctx) / 2**20
    out.with_suffix(f".{ctx.rank}.json").write_text(json.dumps(report))
    shutdown()


def _state_bytes(model: nn.Module, ctx: DistContext) -> int:
    """Weights, gradients and two Adam moments (fp32) of the part this process trains: its
    pipeline stage's blocks, or 1/N of every tensor under FSDP (padding aside)."""
    spec = ctx.layout.spec
    params = list(model.parameters())
    if spec.pp > 1:
        blocks = pipeline_blocks(model)
        a, b = split_blocks(blocks, spec.pp)[ctx.layout.stage]
        params = [p for block in blocks[a:b] for p in block.parameters()]
    return sum(4 * p.numel() * p.element_size() for p in params) // spec.fsdp


def launch(procs: int, parallel: str | None, args: argparse.Namespace) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [__file__, "--worker", str(out), "--steps", str(args.steps)]
        cmd += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
        if parallel:
            cmd += ["--parallel", parallel]
        run = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        run += [f"--nproc_per_node={procs}"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if args.mmap_bytes:  # glibc: allocations this large are mmapped, freed back at once
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_bytes)
        subprocess.run([*run, *cmd], check=True, capture_output=True, env=env)
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("r.*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", type=Path)
    parser.add_argument("--parallel")
    parser.add_argument("--steps", type=int, default=8, help="steps per epoch")
    parser.add_argument("--batch", type=int, default=256, help="global batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs of every configuration")
    parser.add_argument(
        "--mmap-bytes",
        type=int,
        default=0,
        help="glibc's MALLOC_MMAP_THRESHOLD_ for the workers (0: glibc's default); e.g. 65536 "
        "so that freed tensors leave the RSS and its peak follows the live tensors",
    )
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.parallel, args.steps, args.batch, args.repeats)
    facts = machine_facts()
    lines = [
        "| configuration | processes | s/step (median) | vs one process | state MiB per "
        "process | peak RSS growth MiB per process |",
        "|---|---|---|---|---|---|",
    ]
    runs: dict[str, list[list[dict]]] = {name: [] for name, _, _ in CONFIGS}
    for _ in range(args.rounds):  # alternate, so that load changes hit every configuration
        for name, procs, parallel in CONFIGS:
            runs[name].append(launch(procs, parallel, args))
            print(name, runs[name][-1], flush=True)
    base = None
    for name, procs, _ in CONFIGS:
        # The step ends when the slowest rank is done; the median over rounds.
        step = statistics.median(max(r["step_s"] for r in ranks) for ranks in runs[name])
        base = base or step
        last = runs[name][-1]
        state = "/".join(f"{r['state_mib']:.0f}" for r in last)
        peak = "/".join(f"{r['peak_mib']:.0f}" for r in last)
        lines.append(f"| {name} | {procs} | {step:.3f} | {base / step:.2f}x | {state} | {peak} |")
    facts["loadavg_end"] = machine_facts()["loadavg"]
    head = f"`python {' '.join(sys.argv)}` (batch {args.batch}, {args.steps} steps per epoch)"
    print(head + "\n\n" + "\n".join(lines) + "\n\n" + facts_markdown(facts))


if __name__ == "__main__":
    main()
