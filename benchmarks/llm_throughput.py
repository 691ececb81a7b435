"""LLM generation throughput: slimserve's engine against transformers' generate().

    .venv/bin/python benchmarks/llm_throughput.py              # SmolLM2-135M, fp32+bf16+int8
    .venv/bin/python benchmarks/llm_throughput.py --streams 1,8 --output-tokens 32   # quicker
    .venv/bin/python benchmarks/llm_throughput.py --streams 32 --mixed-requests 0   # the target

For each weight kind (fp32; bf16: the fp32 weights computed in bf16 where the CPU has
avx512_bf16; int8) and each concurrency c (1, 8, 32): c streams submitted at once to one
engine, 128-token prompts (distinct, so the prefix cache does not help), 128 output tokens
each (end-of-sequence ignored, so every run does the same work). Measured at the consumer:
output tokens/s over the wall time of the run, time to first token (TTFT, from submit to
the first event) and inter-token latency (ITL, between a stream's events) as p50/p99 over
all streams; also the process's CPU time over the run (all threads), which other processes
on shared cores inflate far less than wall time. Baselines in the same run, fp32:
transformers `generate()` one request at a time, and statically batched (all c prompts in
one `generate` call).

Also the KV memory per sequence: paged (blocks actually held at the peak / sequences) against
a contiguous cache reserved for the model's whole context, as servers without paging do.
Prints a markdown section; `--results benchmarks/RESULTS.md` appends it there.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimserve.runtimes.llm import (
    EngineConfig,
    GenerationEngine,
    SamplingParams,
    TextGenerationRuntime,
    convert_gguf,
    keep_freed_memory,
    smollm2_gguf,
)
from slimserve.runtimes.llm.model import kv_bytes_per_token
from slimserve.runtimes.llm.quality import HELD_OUT_TEXT, perplexity


@dataclass
class Run:
    name: str
    streams: int
    output_tokens: int | str  # per request, or a description of mixed lengths
    seconds: float
    tokens: int = 0  # useful output tokens generated in the run
    cpu_seconds: float = 0.0  # CPU time of the whole process (every thread) during the run
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    peak_blocks: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def prompts(runtime: TextGenerationRuntime, count: int, length: int) -> list[list[int]]:
    """Distinct prompts of exactly `length` tokens (a numbered story, so no shared prefix)."""
    text = " ".join([HELD_OUT_TEXT] * 4)
    return [runtime.encode(f"Story number {i}: {text}")[:length] for i in range(count)]


async def stream_one(
    engine: GenerationEngine, prompt: list[int], params: SamplingParams, run: Run
) -> None:
    start = last = time.perf_counter()
    first = True
    async for _event in engine.submit(prompt, params):
        now = time.perf_counter()
        (run.ttft if first else run.itl).append(now - (start if first else last))
        first, last = False, now
        stats = engine.stats()
        run.peak_blocks = max(run.peak_blocks, stats.total_blocks - stats.free_blocks)


def engine_run(
    runtime: TextGenerationRuntime, name: str, batch: list[list[int]], lengths: list[int]
) -> Run:
    """All requests submitted at once; request i generates exactly lengths[i] tokens."""
    config = EngineConfig(
        kv_cache_bytes=512 * 2**20,
        max_seqs=32,
        prefix_caching=False,
        threads=torch.get_num_threads(),  # the engine thread sets its own (per-thread in torch)
    )
    engine = GenerationEngine(runtime.model, runtime.tokenizer, config, runtime.eos_token_ids)
    engine.start()

    def params(tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def all_streams(run: Run, prompts: list[list[int]], lengths: list[int]) -> None:
        await asyncio.gather(
            *(stream_one(engine, p, params(n), run) for p, n in zip(prompts, lengths, strict=True))
        )

    try:
        asyncio.run(all_streams(Run(name, 1, 4, 1.0), batch[:1], [4]))  # warm-up, not counted
        run = Run(name, min(len(batch), 32), _describe(lengths), 0.0, sum(lengths))
        start, cpu = time.perf_counter(), time.process_time()
        asyncio.run(all_streams(run, batch, lengths))
        run.seconds, run.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    finally:
        engine.close()
    return run


def _describe(lengths: list[int]) -> int | str:
    if len(set(lengths)) == 1:
        return lengths[0]
    return f"{min(lengths)}-{max(lengths)} (mean {sum(lengths) / len(lengths):.0f})"


def hf_run(hf: Any, name: str, batch: list[list[int]], lengths: list[int], group_size: int) -> Run:
    """generate() on groups of `group_size` prompts in order (1: one request at a time).

    A static batch runs until its longest request is done; only the tokens each request
    asked for count as output.
    """
    hf.generate(torch.tensor(batch[:1]), max_new_tokens=2, do_sample=False)  # warm-up
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(batch), group_size):
        ids = torch.tensor(batch[first : first + group_size])  # equal lengths: no padding
        longest = max(lengths[first : first + group_size])
        hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=0,
        )
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return Run(name, group_size, _describe(lengths), seconds, sum(lengths), cpu_seconds)


def row(run: Run) -> str:
    ms = 1000.0
    ttft = f"{percentile(run.ttft, 50) * ms:.0f} / {percentile(run.ttft, 99) * ms:.0f}"
    itl = f"{percentile(run.itl, 50) * ms:.0f} / {percentile(run.itl, 99) * ms:.0f}"
    if not run.ttft:
        ttft = itl = "-"
    return (
        f"| {run.name} | {run.streams} | {run.output_tokens} | {run.tokens_per_s:.1f} "
        f"| {ttft} | {itl} | {run.seconds:.1f} | {run.cpu_seconds:.1f} |"
    )


def machine_facts(threads: int) -> list[str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = Path("/proc/cpuinfo").read_text()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
    import transformers

    from slimserve.runtimes.llm.model import HAS_BF16

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return [
        f"- CPU: {cpu}, {os.cpu_count()} cores, flags: {' '.join(simd)}",
        f"- torch {torch.__version__} ({threads} intra-op threads), transformers "
        f"{transformers.__version__}, Python {platform.python_version()}",
        f"- load: `{load}`",
        f"- oneDNN bf16 matmuls (weights=bf16 computes in bf16, else fp32): {HAS_BF16}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a converted folder (default: SmolLM2)")
    parser.add_argument("--streams", default="1,8,32")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--output-tokens-32", type=int, help="cut outputs at 32 streams")
    parser.add_argument("--weights", default="fp32,bf16,int8")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sequential-requests",
        type=int,
        default=2,
        help="generate() one at a time: requests measured (throughput only)",
    )
    parser.add_argument(
        "--mixed-requests",
        type=int,
        default=64,
        help="also: this many requests, 32 at a time, output lengths varying (0: skip)",
    )
    parser.add_argument(
        "--static-bf16",
        action="store_true",
        help="also run generate()'s static batch with the model in bf16, so that the engine's "
        "bf16 weights are compared with the same precision (not only with fp32)",
    )
    parser.add_argument("--results", type=Path, help="append the markdown section here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    malloc_tuned = keep_freed_memory()  # for every system measured here (see malloc.py)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    facts = [*machine_facts(args.threads), f"- glibc malloc keeps freed buffers: {malloc_tuned}"]
    folder = args.model_dir or convert_gguf(
        smollm2_gguf(),
        Path(tempfile.gettempdir()) / f"slimserve-smollm2-{smollm2_gguf().stat().st_size}",
    )
    lines = report(args, folder)
    end_load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    facts.append(f"- load at the end: `{end_load}`")
    section = [
        "## LLM generation throughput (issue 6)",
        "",
        f"Run {started}: `.venv/bin/python {' '.join(sys.argv)}`",
        "",
        *facts,
        "",
        *lines,
    ]
    text = "\n".join(section) + "\n"
    print(text)
    if args.results:
        with args.results.open("a") as out:
            out.write("\n" + text)


def report(args: argparse.Namespace, folder: Path) -> list[str]:
    from transformers import AutoModelForCausalLM

    streams = [int(s) for s in args.streams.split(",")]
    runtimes = {w: TextGenerationRuntime.load(folder, weights=w) for w in args.weights.split(",")}
    first = next(iter(runtimes.values()))
    batch = prompts(first, max(streams), args.prompt_tokens)
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    runs: list[Run] = []
    sequential = batch[: args.sequential_requests]
    fixed = [args.output_tokens] * len(sequential)
    runs.append(hf_run(hf, "generate() one at a time, fp32", sequential, fixed, 1))
    for count in streams:
        cut = count >= 32 and args.output_tokens_32
        lengths = [args.output_tokens_32 if cut else args.output_tokens] * count
        static = hf_run(hf, "generate() static batch, fp32", batch[:count], lengths, count)
        runs.append(static)
        runs += engine_runs(runtimes, batch[:count], lengths, static)
        if args.static_bf16 and count > 1:
            hf16 = copy.deepcopy(hf).to(torch.bfloat16)
            name = "generate() static batch, bf16"
            static16 = hf_run(hf16, name, batch[:count], lengths, count)
            del hf16
            runs.append(static16)
            same = [r for r in runs if r.streams == count and r.name.endswith("engine, bf16")]
            for run in same[-1:]:
                print(f"{run.name} vs bf16 static: {ratio_text(run, static16)}", flush=True)
    if args.mixed_requests:
        mixed = prompts(first, args.mixed_requests, args.prompt_tokens)
        lengths = mixed_lengths(args.mixed_requests, args.output_tokens)
        label = f"mixed, {len(mixed)} requests: "
        static = hf_run(hf, f"{label}generate() static batches of 32, fp32", mixed, lengths, 32)
        runs.append(static)
        runs += engine_runs(runtimes, mixed, lengths, static, label)
    lines = table(runs) + ratio_lines(runs) + memory_lines(first, runs, args)
    return lines + quality_lines(runtimes)


def engine_runs(
    runtimes: dict[str, TextGenerationRuntime],
    batch: list[list[int]],
    lengths: list[int],
    static: Run,
    label: str = "",
) -> list[Run]:
    runs = []
    for weights, runtime in runtimes.items():
        run = engine_run(runtime, f"{label}slimserve engine, {weights}", batch, lengths)
        print(f"{run.name}, {len(batch)} requests: {ratio_text(run, static)}", flush=True)
        runs.append(run)
    return runs


def ratio_text(run: Run, static: Run) -> str:
    """Throughput against the static batch, by wall time and by the process's CPU time (the
    second is steadier where other processes share the cores: it counts only our work)."""
    wall = run.tokens_per_s / static.tokens_per_s
    cpu = static.cpu_seconds / run.cpu_seconds * run.tokens / static.tokens
    return f"{run.tokens_per_s:.1f} tok/s, {wall:.2f}x static (wall), {cpu:.2f}x (CPU time)"


def ratio_lines(runs: list[Run]) -> list[str]:
    """Each engine run against the fp32 static-batch baseline measured just before it; with
    --static-bf16, the bf16 engine also against the bf16 static batch of the same streams."""
    lines, static = [], None
    for run in runs:
        if "static batch" in run.name and run.name.endswith("fp32"):
            static = run
        elif "engine" in run.name and static is not None and run.streams > 1:
            lines.append(f"- {run.name}, {run.streams} streams: {ratio_text(run, static)}")
    for static16 in (r for r in runs if r.name == "generate() static batch, bf16"):
        for run in runs:
            if run.streams == static16.streams and run.name.endswith("engine, bf16"):
                lines.append(
                    f"- {run.name}, {run.streams} streams, against generate() in bf16: "
                    f"{ratio_text(run, static16)}"
                )
    return [*lines, ""]


def mixed_lengths(count: int, longest: int) -> list[int]:
    """Output lengths uniform in [longest / 8, longest], seeded: as if requests hit EOS."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(longest // 8, longest + 1, (count,), generator=generator).tolist()


def table(runs: list[Run]) -> list[str]:
    return [
        "| system | streams | output tokens | output tok/s | TTFT p50 / p99 ms "
        "| ITL p50 / p99 ms | wall s | CPU s |",
        "|---|---|---|---|---|---|---|---|",
        *[row(run) for run in runs],
        "",
    ]


def memory_lines(
    runtime: TextGenerationRuntime, runs: list[Run], args: argparse.Namespace
) -> list[str]:
    per_token = kv_bytes_per_token(runtime.model.shape)
    biggest = max(
        (r for r in runs if r.peak_blocks and isinstance(r.output_tokens, int)),
        key=lambda r: r.streams,
    )
    block = EngineConfig().block_size
    paged = biggest.peak_blocks * block * per_token / biggest.streams
    context = runtime.model.shape.max_positions
    kib = 1024
    return [
        f"KV memory per sequence ({args.prompt_tokens} + {biggest.output_tokens} tokens, "
        f"{per_token} bytes per token, blocks of {block} tokens): paged, measured at the peak "
        f"of the {biggest.streams}-stream run: {paged / kib:,.0f} KiB; contiguous, reserved "
        f"for the model's {context}-token context: {context * per_token / kib:,.0f} KiB "
        f"({context * per_token / paged:.0f}x more).",
        "",
    ]


def quality_lines(runtimes: dict[str, TextGenerationRuntime]) -> list[str]:
    tokens = next(iter(runtimes.values())).encode(HELD_OUT_TEXT)
    parts = []
    for weights, runtime in runtimes.items():
        ppl = perplexity(runtime.model, tokens)
        parts.append(f"{weights} {ppl:.2f} ({runtime.memory_bytes() / 2**20:.0f} MiB weights)")
    return [f"Perplexity on the held-out paragraph ({len(tokens)} tokens): {', '.join(parts)}.", ""]


if __name__ == "__main__":
    main()
