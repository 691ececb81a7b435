"""Few-row matmuls alone: the C kernel (qgemv.py) against torch's int4 kernel, SmolLM2 shapes.

    PYTHONPATH=src .venv/bin/python benchmarks/llm_qgemv_matmul.py             # 1 thread, CPU us
    PYTHONPATH=src .venv/bin/python benchmarks/llm_qgemv_matmul.py --threads 2 # wall us

Random Q4_1 weights (levels 0..15, fp16 step and minimum per group of 32, as the GGUF's) of
SmolLM2-135M's layer shapes, held by both `QLinear` and `Int4Linear`; bf16 activations of
1, 4, 8 and 16 rows; each call 50 times per sample, median of 7 samples, the two kernels
alternating. Weights fit in L2/L3 here, so this is the arithmetic's cost, not DRAM's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from slimserve.runtimes.llm.int4mm import Int4Linear
from slimserve.runtimes.llm.qgemv import QLinear

SHAPES = ((3072, 576), (576, 1536), (960, 576))  # gate_up, down, qkv


def q4_1(n: int, k: int) -> torch.Tensor:
    weight = torch.randn(n, k).view(n, k // 32, 32)
    low, high = weight.amin(2, keepdim=True), weight.amax(2, keepdim=True)
    step, low = ((high - low) / 15).half().float(), low.half().float()
    return (torch.round((weight - low) / step) * step + low).view(n, k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="1,4,8,16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.threads == 1 else time.perf_counter
    kind = "CPU" if args.threads == 1 else "wall"
    print(f"torch {torch.__version__}, {args.threads} thread(s), {kind} us a call")
    for n, k in SHAPES:
        weight = q4_1(n, k)
        kernels = {"C": QLinear(weight), "torch int4": Int4Linear(weight)}
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k).to(torch.bfloat16)
            samples: dict[str, list[float]] = {name: [] for name in kernels}
            for kernel in kernels.values():
                for _ in range(20):
                    kernel(x)
            for _ in range(7):
                for name, kernel in kernels.items():
                    start = clock()
                    for _ in range(50):
                        kernel(x)
                    samples[name].append((clock() - start) / 50 * 1e6)
            c, t = (statistics.median(samples[name]) for name in kernels)
            print(
                f"{n}x{k} rows {rows:2d}: C {c:7.1f}  torch int4 {t:7.1f}  ({t / c:.2f}x)",
                flush=True,
            )


if __name__ == "__main__":
    main()
