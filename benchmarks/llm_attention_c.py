"""Decode attention in C (`qgemv.attend_rows`): this checkout's kernel against an older one's.

    PYTHONPATH=src .venv/bin/python benchmarks/llm_attention_c.py              # from DRAM
    PYTHONPATH=src .venv/bin/python benchmarks/llm_attention_c.py --layers 1   # from cache
    PYTHONPATH=src .venv/bin/python benchmarks/llm_attention_c.py --consecutive
    PYTHONPATH=src .venv/bin/python benchmarks/llm_attention_c.py --base main --dtypes bf16

SmolLM2-135M's attention shape (9 query heads, 3 K/V heads, head_dim 64) over a paged pool
(blocks of 16 positions, each row's blocks scattered over the pool, or in order with
`--consecutive`), rows 1, 8 and 32 at contexts 200 and 1000, on 1 and 2 threads, fp32 and
bf16 K/V. Calls go round `--layers` pools, one a layer, as a decode step's layers do (30 for
SmolLM2), so that K and V come from DRAM as in a step, where the other layers' K/V and the
weights pass through the caches between two uses of a layer's pool; `--layers 1` times one
pool that stays in cache.

The older kernel is `csrc/qgemv.c` as it was at `--base` (default: the commit before session
6's attention change), built with the same flags into a temporary library, and reached
through the same `qgemv.attend_rows` (the two differ only in the C they run), checked to give
the same output within fp32 rounding. Each sample goes `--rounds` times round the layers, the
two kernels alternating, median of `--samples` samples, in us a call (wall clock).
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from slimserve.runtimes.llm import qgemv

HEADS, KV_HEADS, HD, BS = 9, 3, 64, 16
BASE = "42158e3"  # main before session 6's C attention
SOURCE = "src/slimserve/runtimes/llm/csrc/qgemv.c"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_old(base: str, folder: Path) -> ctypes.CDLL:
    """The kernel library as it was at git revision `base`, with today's flags and argtypes."""
    source = folder / "qgemv_old.c"
    source.write_bytes(
        subprocess.run(["git", "show", f"{base}:{SOURCE}"], check=True, capture_output=True).stdout
    )
    compiler = shutil.which("gcc") or shutil.which("cc") or "cc"
    target = folder / "qgemv_old.so"
    command = [compiler, *qgemv._FLAGS, *qgemv._ISA, "-o", str(target), str(source)]
    subprocess.run(command, check=True)
    old, new = ctypes.CDLL(str(target)), qgemv._library()
    assert new is not None, "this CPU or compiler does not take the C kernel"
    for name in ("qgemv_attend_one", "qgemv_attend_rows"):
        getattr(old, name).argtypes = getattr(new, name).argtypes
        getattr(old, name).restype = None
    return old


def case(
    rows: int, context: int, dtype: torch.dtype, consecutive: bool
) -> tuple[torch.Tensor, ...]:
    """q, k, v, pool, slots, tables, positions: each row `context` keys in blocks scattered
    over the pool (as a long-running server's are), or consecutive (as a fresh one's)."""
    per_row = -(-context // BS)
    blocks = rows * per_row + 1
    cache = torch.randn(2, KV_HEADS, blocks, BS, HD).to(dtype)
    order = torch.arange(blocks - 1) if consecutive else torch.randperm(blocks - 1)
    tables = (order + 1).view(rows, per_row)
    positions = torch.full((rows, 1), context - 1)
    last = positions[:, 0]
    slots = tables[torch.arange(rows), last // BS] * BS + last % BS
    q = torch.randn(rows, HEADS, HD)
    k = torch.randn(rows, KV_HEADS, HD).to(dtype)
    v = torch.randn(rows, KV_HEADS, HD).to(dtype)
    return q, k, v, cache, slots, tables, positions


def time_call(cases: list[tuple[torch.Tensor, ...]], rounds: int) -> float:
    """Wall-clock us a call, going `rounds` times round the layers' pools."""
    start = time.perf_counter()
    for _ in range(rounds):
        for args in cases:
            qgemv.attend_rows(*args, 0.125)
    return (time.perf_counter() - start) / rounds / len(cases) * 1e6


def compare(
    old: ctypes.CDLL, cases: list[tuple[torch.Tensor, ...]], options: argparse.Namespace
) -> tuple[float, float]:
    """Median us a call of the old and the new kernel, alternating samples."""
    new = qgemv._library()
    samples: dict[str, list[float]] = {"old": [], "new": []}
    with mock.patch.object(qgemv, "_library", lambda: old):
        expected = qgemv.attend_rows(*cases[0], 0.125)
    got = qgemv.attend_rows(*cases[0], 0.125)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for _ in range(options.samples):
        with mock.patch.object(qgemv, "_library", lambda: old):
            samples["old"].append(time_call(cases, options.rounds))
        assert qgemv._library() is new
        samples["new"].append(time_call(cases, options.rounds))
    return statistics.median(samples["old"]), statistics.median(samples["new"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=BASE, help="git revision of the older kernel")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--contexts", default="200,1000")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--dtypes", default="fp32,bf16", help="K/V pool dtypes: fp32, bf16")
    parser.add_argument("--layers", type=int, default=30, help="pools gone round (1: cached)")
    parser.add_argument("--consecutive", action="store_true", help="each row's blocks in order")
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the layers a sample")
    options = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        old = build_old(options.base, Path(folder))
        print(
            f"torch {torch.__version__}; old kernel: {options.base}; {options.layers} pools; "
            "us a call, medians"
        )
        print("dtype threads rows context      old      new  speed-up")
        for name in options.dtypes.split(","):
            for threads in [int(t) for t in options.threads.split(",")]:
                torch.set_num_threads(threads)
                for rows in [int(r) for r in options.rows.split(",")]:
                    for context in [int(c) for c in options.contexts.split(",")]:
                        cases = [
                            case(rows, context, DTYPES[name], options.consecutive)
                            for _ in range(options.layers)
                        ]
                        before, after = compare(old, cases, options)
                        print(
                            f"{name:5s} {threads:7d} {rows:4d} {context:7d} {before:8.1f} "
                            f"{after:8.1f}  {before / after:6.2f}x",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
