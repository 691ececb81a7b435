"""Text generation for causal language models: continuous batching over a paged KV cache.

    runtime = TextGenerationRuntime.load("models/smollm2/1")          # or weights="int8"
    engine = GenerationEngine(runtime.model, runtime.tokenizer, EngineConfig(),
                              eos_token_ids=runtime.eos_token_ids)
    engine.start()
    async for event in engine.submit(runtime.encode_chat(messages), SamplingParams(...)):
        ...                                   # TokenEvent: index, token_ids, text, finish_reason,
    engine.close()                            # usage (last event), logprobs

Importing this package loads no torch; the torch-backed names load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from slimserve.runtimes.llm.malloc import keep_freed_memory
from slimserve.runtimes.llm.params import (
    FINISH_LENGTH,
    FINISH_STOP,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    Usage,
)
from slimserve.runtimes.llm.scheduler import Decision, Limits, SchedulerState, schedule

if TYPE_CHECKING:
    from slimserve.runtimes.llm.convert import convert_gguf, smollm2_gguf
    from slimserve.runtimes.llm.engine import EngineConfig, GenerationEngine
    from slimserve.runtimes.llm.runtime import TextGenerationRuntime

_LAZY = {
    "GenerationEngine": "engine",
    "EngineConfig": "engine",
    "TextGenerationRuntime": "runtime",
    "convert_gguf": "convert",
    "smollm2_gguf": "convert",
}

__all__ = [
    "FINISH_LENGTH",
    "FINISH_STOP",
    "Decision",
    "EngineConfig",
    "GenerationEngine",
    "Limits",
    "SamplingParams",
    "SchedulerState",
    "TextGenerationRuntime",
    "TokenEvent",
    "TokenLogprob",
    "Usage",
    "convert_gguf",
    "keep_freed_memory",
    "schedule",
    "smollm2_gguf",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
