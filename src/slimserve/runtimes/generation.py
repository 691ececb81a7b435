"""transformers backend, `task: text-generation`: a causal LM behind the generation engine.

The folder is a local transformers folder (config.json, tokenizer, *.safetensors); the
weights go into our own Llama forward (runtimes/llm) and one started `GenerationEngine`
(continuous batching over a paged KV cache) serves every request of this unit: the OpenAI
routes stream from it through `Engine.generate`, and so does the v2 path (below).

v2: a served request goes to serving/prompt_tensors.py (the request's `parameters` such as
max_tokens, temperature, top_p, stop and seed, with model.yaml `parameters` as defaults) and
streams from the engine like the OpenAI routes. `infer` here is the runtime contract's direct
path, without a request: BYTES prompts [-1] in, BYTES completions [-1] out, sampling from
model.yaml `parameters` only: `max_tokens` (default 16), `temperature` (default 0: greedy),
`timeout_s` (default 120: a prompt not done by then fails with DEADLINE_EXCEEDED rather than
holding its worker thread forever).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np

from slimserve.errors import ModelLoadError
from slimserve.fields import build
from slimserve.repository.schema import GenerationSettings, SpeculativeSettings
from slimserve.repository.store import Target
from slimserve.runtimes._common import check_folder, not_loaded
from slimserve.runtimes.base import Runtime, RuntimeOptions, TextGenerator
from slimserve.runtimes.llm import SamplingParams, keep_freed_memory
from slimserve.runtimes.llm.engine import (
    EngineConfig,
    EngineStats,
    GenerationEngine,
    RemoteModel,
    usable_cores,
)
from slimserve.runtimes.llm.model import LlamaModel
from slimserve.runtimes.llm.parallel.group import GroupConfig, ModelGroup
from slimserve.runtimes.llm.parallel.local import LocalLauncher
from slimserve.runtimes.llm.runtime import TextCodec, TextGenerationRuntime
from slimserve.runtimes.llm.speculate import SpeculativeConfig
from slimserve.runtimes.llm.stream import GenerationStream

_V2_DEFAULTS: dict[str, Any] = {"max_tokens": 16, "temperature": 0.0, "timeout_s": 120.0}


class GenerationRuntime(Runtime, TextGenerator):
    """A loaded causal LM and its running generation engine."""

    def __init__(self, target: Target, options: RuntimeOptions | None = None) -> None:
        super().__init__(target, options)
        self.settings = target.config.generation or GenerationSettings()
        self.text: TextCodec | None = None
        self.engine: GenerationEngine | None = None
        self.group: ModelGroup | None = None

    def load(self) -> None:
        folder = check_folder(self.target)
        self._check_specs()
        # As the throughput benchmark runs: a 16 x 128-token int8 prefill took 1.81 s with
        # glibc's defaults and 1.29 s with large freed buffers kept (see llm/malloc.py).
        keep_freed_memory()
        text, model = self._load_model(folder)
        spec = self.settings.speculative
        draft = None
        if spec is not None and spec.method == "draft":
            draft = TextGenerationRuntime.load(folder, weights=spec.draft_weights).model
        try:
            engine = GenerationEngine(
                model,
                text.tokenizer,
                self._engine_config(),
                eos_token_ids=text.eos_token_ids,
                clock=self.options.clock,
                draft=draft,
            )
        except BaseException:
            self._close_group()
            raise
        engine.start()
        self.text, self.engine = text, engine

    def _load_model(self, folder: Path) -> tuple[TextCodec, LlamaModel | RemoteModel]:
        """In this process, or split over the worker processes model.yaml asks for."""
        s = self.settings
        if s.processes == 1:
            text = TextGenerationRuntime.load(folder, weights=s.weights)
            return text, text.model
        codec = TextCodec.load_codec(folder)
        threads = self.options.intra_op_threads or max(1, usable_cores() // s.processes)
        config = GroupConfig(
            folder,
            s.weights,
            pipeline=s.pipeline_parallel,
            tensor=s.tensor_parallel,
            threads=threads,
            budget_bytes=self.options.memory_budget_bytes,
            step_timeout_s=s.step_timeout_s,
            launcher=self.options.launcher or LocalLauncher(),
        )
        self.group = ModelGroup(config, codec.config())
        return codec, self.group

    def _close_group(self) -> None:
        group, self.group = self.group, None
        if group is not None:
            group.close()

    def _engine_config(self) -> EngineConfig:
        # model.yaml's generation settings under the engine's own names (block_size, ...).
        return build(
            EngineConfig,
            self.settings,
            threads=self.options.intra_op_threads,
            speculative=_speculative(self.settings.speculative),
        )

    def _check_specs(self) -> None:
        for kind, specs in (("input", self.inputs), ("output", self.outputs)):
            if not specs or specs[0].datatype != "BYTES":
                raise ModelLoadError(
                    f"{self.target.path}: a text-generation model takes and returns text: "
                    f"declare its first {kind} as {{name: text, datatype: BYTES, shape: [-1]}} "
                    "in model.yaml"
                )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Complete each prompt (runs in a worker thread, on a private event loop)."""
        text, engine = self.text, self.engine
        if text is None or engine is None:
            raise not_loaded(self.target)
        from slimserve.runtimes.transformers import decode_texts

        prompts = decode_texts(inputs[self.inputs[0].name])
        options = _V2_DEFAULTS | self.target.config.parameters
        params = SamplingParams(
            max_tokens=int(options["max_tokens"]), temperature=float(options["temperature"])
        )
        ids = [text.encode(p) for p in prompts]
        completions = asyncio.run(_complete(engine, ids, params, float(options["timeout_s"])))
        out = np.empty(len(completions), dtype=object)
        out[:] = [c.encode("utf-8") for c in completions]
        return {self.outputs[0].name: out.reshape(inputs[self.inputs[0].name].shape)}

    # -- TextGenerator: what the serving layer uses ------------------------------------------

    def _loaded(self) -> tuple[TextCodec, GenerationEngine]:
        text, engine = self.text, self.engine
        if text is None or engine is None:
            raise not_loaded(self.target)
        return text, engine

    @property
    def max_context(self) -> int:
        return self._loaded()[1].max_context

    def encode(self, text: str) -> list[int]:
        return list(self._loaded()[0].encode(text))

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return list(self._loaded()[0].encode_chat(messages))

    def token_text(self, token_id: int) -> str:
        return str(self._loaded()[0].tokenizer.decode([token_id]))

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, deadline_s: float | None
    ) -> GenerationStream:
        return self._loaded()[1].submit(prompt_ids, params, deadline_s)

    def generation_stats(self) -> EngineStats:
        return self._loaded()[1].stats()

    def warmup(self) -> None:
        """One token for a short prompt: builds the forward's lazy state before a request."""
        text, engine = self.text, self.engine
        if text is None or engine is None:
            raise not_loaded(self.target)
        asyncio.run(_complete(engine, [text.encode("warm up")], SamplingParams(max_tokens=1), 60))

    def unload(self) -> None:
        engine, self.engine, self.text = self.engine, None, None
        if engine is not None:
            engine.close()
        self._close_group()

    def memory_bytes(self) -> int:
        """Weights plus the KV pool (allocated whole at load), a draft model's included."""
        engine = self.engine
        if engine is None:
            return 0
        return engine.nbytes()


def _speculative(settings: SpeculativeSettings | None) -> SpeculativeConfig | None:
    if settings is None:
        return None
    fields = settings.model_dump(exclude={"draft_weights"})
    return SpeculativeConfig(**fields)


async def _complete(
    engine: GenerationEngine, prompts: list[list[int]], params: SamplingParams, timeout_s: float
) -> list[str]:
    """Each prompt's completion text (choice 0), all submitted at once."""

    async def one(ids: list[int]) -> str:
        stream = engine.submit(ids, params, deadline_s=timeout_s)
        return "".join([event.text async for event in stream if event.index == 0])

    return list(await asyncio.gather(*(one(ids) for ids in prompts)))
