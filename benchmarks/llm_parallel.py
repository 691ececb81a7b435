"""Model-parallel generation on SmolLM2-135M: one process against pipeline and tensor splits.

    .venv/bin/python benchmarks/llm_parallel.py                     # bf16, 1 / 8 / 32 streams
    .venv/bin/python benchmarks/llm_parallel.py --streams 1,8 --output-tokens 16   # quicker

In one run, the same engine (continuous batching, paged KV, prefix caching off, distinct
prompts of --prompt-tokens tokens, --output-tokens each with end-of-sequence ignored) drives:
  1 process x 2 threads  the model in the engine's process, 2 intra-op threads;
  P=2 x 1 thread         two pipeline stages (15 layers each), one worker process each,
                         a step's rows in two micro-batches;
  T=2 x 1 thread         two tensor ranks (SmolLM2's 9 heads / 3 KV heads do not divide by 2:
                         attention is replicated, the MLP is split; an all-reduce per layer).
All three are started first; then at each concurrency c, each setup in turn gets c streams
submitted at once, for --rounds rounds (so the shared machine's load hits them alike): output
tokens/s over the wall time, TTFT and ITL p50 / p99 over all streams (as llm_throughput.py),
the round of median tok/s shown. Per split: each worker's
time in forwards and, of it, waiting on peers (receiving the previous stage's hidden states,
all-reduces, sends: transfer plus pipeline bubble), per engine step; and memory per process
(weights + KV pool as allocated, and the resident set from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from llm_throughput import Run, machine_facts, prompts, row, stream_one

from slimserve.runtimes.llm import (
    EngineConfig,
    GenerationEngine,
    SamplingParams,
    TextGenerationRuntime,
    convert_gguf,
    keep_freed_memory,
    smollm2_gguf,
)
from slimserve.runtimes.llm.parallel.group import GroupConfig, ModelGroup

MiB = 2**20
KV_BYTES = 128 * MiB


def run_streams(engine: GenerationEngine, name: str, batch: list[list[int]], tokens: int) -> Run:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def all_streams(run: Run, rows: list[list[int]]) -> None:
        await asyncio.gather(*(stream_one(engine, p, params, run) for p in rows))

    asyncio.run(all_streams(Run(name, 1, tokens, 1.0), batch[:1]))  # warm-up, not counted
    run = Run(name, len(batch), tokens, 0.0, len(batch) * tokens)
    start, cpu = time.perf_counter(), time.process_time()
    asyncio.run(all_streams(run, batch))
    run.seconds, run.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return run


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def interleaved(
    engines: dict[str, GenerationEngine], runtime: TextGenerationRuntime, args: argparse.Namespace
) -> list[Run]:
    """Each concurrency on each setup in turn, `--rounds` times (the shared machine's load
    then hits every setup alike); the run of median tok/s per setup and concurrency."""
    runs: list[Run] = []
    for streams in args.streams:
        batch = prompts(runtime, streams, args.prompt_tokens)
        found: dict[str, list[Run]] = {name: [] for name in engines}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                found[name].append(run_streams(engine, name, batch, args.output_tokens))
                print(row(found[name][-1]), flush=True)
        for name in engines:
            ordered = sorted(found[name], key=lambda run: run.tokens_per_s)
            runs.append(ordered[len(ordered) // 2])
    return sorted(runs, key=lambda run: list(engines).index(run.name))


def process_lines(model: Any, engine: GenerationEngine, name: str) -> list[str]:
    if not isinstance(model, ModelGroup):
        mib = engine.nbytes() / MiB
        return [f"| {name} | engine process | {mib:.0f} | {rss_mib(os.getpid()):.0f} | - | - |"]
    lines = []
    for rank, (size, times) in enumerate(zip(model.per_process, model.worker_stats(), strict=True)):
        stage, tp = model.plan.place(rank)
        held = (size["weights"] + size["kv"]) / MiB
        per_step = 1000 * times["forward_s"] / max(times["steps"], 1)
        waiting = 1000 * times["wait_s"] / max(times["steps"], 1)
        lines.append(
            f"| {name} | stage {stage} rank {tp} | {held:.0f} | {rss_mib(size['pid']):.0f} "
            f"| {per_step:.1f} | {waiting:.1f} |"
        )
    return lines


SETUPS = (("1 process x 2 threads", 1, 1), ("P=2 x 1 thread", 2, 1), ("T=2 x 1 thread", 1, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="bf16")
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    keep_freed_memory()
    gguf = smollm2_gguf()
    cache = Path(tempfile.gettempdir()) / f"slimserve-smollm2-{gguf.stat().st_size}"
    folder = convert_gguf(gguf, cache)
    runtime = TextGenerationRuntime.load(folder, weights=args.weights)
    models: dict[str, Any] = {}
    engines: dict[str, GenerationEngine] = {}
    config = EngineConfig(kv_cache_bytes=KV_BYTES, max_seqs=32, prefix_caching=False, threads=2)
    try:
        for name, pipeline, tensor in SETUPS:
            models[name] = runtime.model
            if pipeline * tensor > 1:
                split = GroupConfig(folder, args.weights, pipeline, tensor, threads=1)
                models[name] = ModelGroup(split, runtime.config())
            engines[name] = GenerationEngine(
                models[name], runtime.tokenizer, config, runtime.eos_token_ids
            )
            engines[name].start()
        runs = interleaved(engines, runtime, args)
        memory = [
            line
            for name, engine in engines.items()
            for line in process_lines(models[name], engine, name)
        ]
    finally:
        for engine in engines.values():
            engine.close()
        for model in models.values():
            if isinstance(model, ModelGroup):
                model.close()
    report(args, runs, memory)


def report(args: argparse.Namespace, runs: list[Run], memory: list[str]) -> None:
    print(f"\n### Model-parallel generation, SmolLM2-135M {args.weights}\n")
    print("```\n" + " ".join(sys.argv) + "\n```\n")
    print("\n".join(machine_facts(2)))
    print(
        f"- prompts {args.prompt_tokens} tokens, {args.output_tokens} output tokens each; "
        f"each setup in turn, {args.rounds} rounds; the run of median tok/s shown\n"
    )
    print(
        "| setup | streams | out tokens | tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
        "| wall s | driver CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(row(run) for run in runs))
    print(
        "\n| setup | process | weights + KV MiB | RSS MiB | forward ms / step "
        "| waiting on peers ms / step |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(memory))


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
