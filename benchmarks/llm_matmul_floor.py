"""The floor under an fp32 decode step: SmolLM2-135M's matmuls alone, nothing else.

    .venv/bin/python benchmarks/llm_matmul_floor.py                 # 32 rows, 1 thread
    .venv/bin/python benchmarks/llm_matmul_floor.py --rows 1,8,32 --threads 2

Times the generation engine's own fp32 layer (`FloatLinear`: oneDNN, weights packed once) on
every projection of one decode step of SmolLM2-135M's shape (30 layers of q/k/v, o, gate/up and
down, plus the tied 49,152-word head), random weights, for `rows` sequences decoding together.
No attention, no norms, no sampling: what the rest of a step can never go below, and the
figure that says how far a fp32 engine can outrun a static batch (benchmarks/RESULTS.md, issue
6). Prints the median of `--repeats` steps, the FLOPs and the rate.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from slimserve.runtimes.llm.model import FloatLinear

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152
QKV = HIDDEN + 2 * 192  # 9 query heads and 3 key/value heads of 64
PROJECTIONS = [(QKV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN), (HIDDEN, INTERMEDIATE)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="32", help="comma-separated rows per step (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per row count")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    layers = [[FloatLinear(torch.randn(o, i)) for o, i in PROJECTIONS] for _ in range(LAYERS)]
    head = FloatLinear(torch.randn(VOCAB, HIDDEN))
    params = LAYERS * sum(o * i for o, i in PROJECTIONS) + VOCAB * HIDDEN
    print(f"torch {torch.__version__}, {args.threads} thread(s), {params / 1e6:.1f} M weights")
    for rows in (int(r) for r in args.rows.split(",")):
        x, m = torch.randn(rows, HIDDEN), torch.randn(rows, INTERMEDIATE)

        def step(x: torch.Tensor = x, m: torch.Tensor = m) -> None:
            for qkv, o, gate_up, down in layers:
                qkv(x), o(x), gate_up(x), down(m)
            head(x)

        for _ in range(3):
            step()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        flop = 2 * rows * params
        print(
            f"{rows:3d} rows: median {median * 1e3:6.1f} ms (min {min(times) * 1e3:.1f}), "
            f"{flop / 1e9:.2f} GFLOP, {flop / median / 1e9:.0f} GFLOP/s"
        )


if __name__ == "__main__":
    main()
