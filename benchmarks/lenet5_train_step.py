"""LeNet-5 (Han's 20-50-500) training step on CPU: default layout against channels-last.

`fit` trains convolutions in channels-last layout on one CPU process (issue 16: a LeNet-5
epoch took ~35 s on one thread). This times an Adam step at batch 128 both ways, alternating
rounds, and prints the median of each and their ratio.

    OMP_NUM_THREADS=1 python benchmarks/lenet5_train_step.py --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from slimserve.zoo import CaffeLeNet


def step_ms(channels_last: bool, steps: int, batch: int) -> float:
    torch.manual_seed(0)
    model = CaffeLeNet()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.rand(batch, 784), torch.randint(0, 10, (batch,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(3):  # warm-up: oneDNN picks and caches its kernels
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return 1000 * (time.perf_counter() - t0) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    plain, last = [], []
    for _ in range(args.rounds):
        plain.append(step_ms(False, args.steps, args.batch))
        last.append(step_ms(True, args.steps, args.batch))
    p, c = statistics.median(plain), statistics.median(last)
    epoch = 60_000 / args.batch / 1000
    print(f"default layout: {p:.1f} ms/step ({p * epoch:.1f} s per 60,000-row epoch)")
    print(f"channels-last:  {c:.1f} ms/step ({c * epoch:.1f} s per epoch), {p / c:.2f}x faster")


if __name__ == "__main__":
    main()
