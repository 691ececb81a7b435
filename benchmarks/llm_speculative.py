"""Speculative decoding on SmolLM2-135M, one stream: speed-up and whether the output is plain.

    .venv/bin/python benchmarks/llm_speculative.py                    # every setup, 128 tokens
    .venv/bin/python benchmarks/llm_speculative.py --setups auto/lookup --max-tokens 64

For each setup (target weights / speculation) the in-process engine answers each prompt
alone (greedy chat completions, up to --max-tokens, ending at the end-of-sequence token), and
its plain twin (same weights, no speculation) answers the same prompts in the same run,
alternating, so load from other processes falls on both. Prompts: "repetitive" ones whose
answer reuses the prompt's text (edit, correct, extract, summarise a given text) and "open"
ones (questions, stories). Reported per setup and prompt kind: decode tok/s (output tokens
after the first over the time after the first), the speed-up over plain, drafted and accepted
tokens, and how many answers are token for token the plain ones.

Setups: `auto/lookup` (the defaults' weights, prompt lookup, 4 drafts), `fp32/lookup`,
`fp32/draft` (fp32 target, the same checkpoint as `bf16+int4` for the draft, 4 drafts).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))

from llm_serving import uptime
from llm_throughput import machine_facts

from slimserve.runtimes.llm import (
    EngineConfig,
    GenerationEngine,
    SamplingParams,
    TextGenerationRuntime,
    convert_gguf,
    smollm2_gguf,
)
from slimserve.runtimes.llm.engine import usable_cores
from slimserve.runtimes.llm.speculate import SpeculativeConfig

PARAGRAPH = (
    "The river rose slowly through the spring, and the people of the valley moved their "
    "animals to the high pastures as their grandparents had done. In the evenings the old "
    "miller told the children how the water had once reached the church steps."
)
CODE = (
    "def total(items):\n    result = 0\n    for item in items:\n        result = result + "
    "item.price * item.count\n    return result\n"
)
REPETITIVE = [
    "Correct the spelling in this text and return the whole text: "
    + PARAGRAPH.replace("the", "teh"),
    f"Rewrite this text with 'river' replaced by 'stream': {PARAGRAPH}",
    f"Rename the variable result to subtotal in this code and return the code:\n{CODE}",
    f"Summarise this text in two sentences: {PARAGRAPH}",
]
OPEN = [
    "Write a short story about a dragon who learns to cook.",
    "Explain why the sky is blue.",
    "What are three good habits for a healthy life?",
    "Describe a day at the beach.",
]
SETUPS = {
    "auto/lookup": ("auto", SpeculativeConfig(method="prompt-lookup", num_tokens=4), None),
    "fp32/lookup": ("fp32", SpeculativeConfig(method="prompt-lookup", num_tokens=4), None),
    "fp32/draft": ("fp32", SpeculativeConfig(method="draft", num_tokens=4), "bf16+int4"),
}


KINDS = ["repetitive", "open"]
IGNORE_EOS = [False]  # --ignore-eos: always max_tokens tokens, as llm_vs_llamacpp.py asks


def answer(engine: GenerationEngine, prompt: list[int], max_tokens: int) -> tuple[list[int], float]:
    """The greedy answer and its decode time (after the first token)."""

    async def run() -> tuple[list[int], float]:
        tokens: list[int] = []
        first = 0.0
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=IGNORE_EOS[0])
        async for event in engine.submit(prompt, params):
            if not tokens:
                first = time.perf_counter()
            tokens += event.token_ids
        return tokens, time.perf_counter() - first

    return asyncio.run(run())


def make_engine(
    runtime: TextGenerationRuntime, spec: SpeculativeConfig | None, draft: Any
) -> GenerationEngine:
    config = EngineConfig(speculative=spec)
    engine = GenerationEngine(
        runtime.model, runtime.tokenizer, config, eos_token_ids=runtime.eos_token_ids, draft=draft
    )
    engine.start()
    answer(engine, runtime.encode_chat([{"role": "user", "content": "Hi"}]), 4)  # warm-up
    return engine


def measure(folder: Path, name: str, max_tokens: int) -> list[str]:
    weights, spec, draft_weights = SETUPS[name]
    runtime = TextGenerationRuntime.load(folder, weights=weights)
    draft = (
        TextGenerationRuntime.load(folder, weights=draft_weights).model if draft_weights else None
    )
    plain, fast = make_engine(runtime, None, None), make_engine(runtime, spec, draft)
    lines = []
    try:
        for kind, texts in (("repetitive", REPETITIVE), ("open", OPEN)):
            if kind not in KINDS:
                continue
            rates: dict[str, list[float]] = {"plain": [], "spec": []}
            same, tokens = 0, 0
            before = fast.stats()
            for text in texts:
                prompt = runtime.encode_chat([{"role": "user", "content": text}])
                a, a_s = answer(plain, prompt, max_tokens)
                b, b_s = answer(fast, prompt, max_tokens)
                rates["plain"].append((len(a) - 1) / a_s)
                rates["spec"].append((len(b) - 1) / b_s)
                same += a == b
                tokens += len(b)
            after = fast.stats()
            drafted = after.drafted_tokens - before.drafted_tokens
            accepted = after.accepted_tokens - before.accepted_tokens
            p, s = median(rates["plain"]), median(rates["spec"])
            lines.append(
                f"| {name} | {kind} | {p:.1f} | {s:.1f} | **{s / p:.2f}x** | {drafted} | "
                f"{accepted} ({accepted / max(drafted, 1):.0%}) | {same} / {len(texts)} "
                f"| {tokens} |"
            )
            print(lines[-1], flush=True)
    finally:
        plain.close()
        fast.close()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--setups", default=",".join(SETUPS), help="comma list of " + ", ".join(SETUPS)
    )
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ignore-eos", action="store_true", help="always --max-tokens tokens")
    parser.add_argument("--kinds", default="repetitive,open", help="prompt kinds to run")
    args = parser.parse_args()
    IGNORE_EOS[0] = args.ignore_eos
    KINDS[:] = args.kinds.split(",")
    torch.set_num_threads(usable_cores())
    started, facts = (
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        machine_facts(usable_cores()),
    )
    gguf = smollm2_gguf()
    folder = convert_gguf(
        gguf, Path(tempfile.gettempdir()) / f"slimserve-smollm2-{gguf.stat().st_size}"
    )
    lines = [
        "| setup | prompts | plain decode tok/s | speculative tok/s | speed-up | drafted "
        "| accepted | same output | tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in args.setups.split(","):
        lines += measure(folder, name, args.max_tokens)
    print(
        "\n".join(
            [
                f"Run {started}: `.venv/bin/python {' '.join(sys.argv)}`",
                "",
                *facts,
                f"- load after: `{uptime()}`",
                "",
                *lines,
            ]
        )
    )


if __name__ == "__main__":
    main()
