"""Tensor requests to text-generation models: BYTES prompts in, BYTES completions out.

`Engine.infer` (the KServe v2 infer path, HTTP and gRPC) sends a text-generation model's
requests here instead of to its batcher (the generation engine batches continuously on its
own), with the request's `parameters`:

  max_tokens, temperature, top_p, stop, seed, presence_penalty, frequency_penalty, ignore_eos,
  top_k, min_p, repetition_penalty

checked by the same rules as the OpenAI routes (serving/sampling_args.py; a bad value is a 400
naming it). Absent ones come from model.yaml `parameters`, then max_tokens 16 and temperature 0
(greedy, unlike the OpenAI API's 1). `n` must be 1: the output holds one completion per
prompt element, in the prompt tensor's shape. The request's `timeout` (v2's deadline, also a
gRPC call's deadline) and model.yaml `parameters.timeout_s` (default 120 s) bound the whole
generation: past it the request fails with DEADLINE_EXCEEDED (504) and its KV blocks are
freed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from slimserve.errors import InvalidArgument
from slimserve.repository.schema import ModelConfig
from slimserve.runtimes.base import TextGenerator
from slimserve.runtimes.llm import SamplingParams
from slimserve.runtimes.llm.stream import GenerationStream
from slimserve.serving.llm import configured_timeout_s
from slimserve.serving.metrics import TokenMeter
from slimserve.serving.sampling_args import DEFAULTS, BadParameter, sampling_params

Meters = Callable[[int], TokenMeter]  # prompt tokens -> a meter for one completion

V2_DEFAULTS: dict[str, Any] = {"max_tokens": 16, "temperature": 0.0}
DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class V2Plan:
    """What one v2 request asks of the generation engine."""

    params: SamplingParams
    timeout_s: float  # the longest the whole request may take, seconds


def plan(config: ModelConfig, parameters: Mapping[str, Any]) -> V2Plan:
    """The request's sampling parameters over the model's; every mistake is a 400."""
    n = parameters.get("n")
    if n is not None and n != 1:
        raise BadParameter(
            f"parameter n={n!r}: the v2 protocol returns one completion per prompt; use n=1 "
            "(or send the prompt several times, or use /v1/completions)",
            "n",
        )
    model_params = config.parameters
    defaults = V2_DEFAULTS | {k: v for k, v in model_params.items() if k in DEFAULTS}
    params = sampling_params(parameters, defaults)
    timeout_s = configured_timeout_s(model_params)
    return V2Plan(params, DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s)


async def complete(
    generator: TextGenerator,
    config: ModelConfig,
    inputs: Mapping[str, np.ndarray],
    plan: V2Plan,
    time_left: float | None,
    meters: Meters,
) -> dict[str, np.ndarray]:
    """Each prompt's completion (choice 0), all submitted at once to the unit's generator.

    `time_left`: seconds the request may still take (its deadline), or None.
    """
    prompts = inputs[config.input_specs()[0].name]
    ids = [generator.encode(p) for p in _texts(prompts)]
    time_left = plan.timeout_s if time_left is None else min(plan.timeout_s, time_left)
    streams: list[GenerationStream] = []
    try:
        for prompt in ids:
            streams.append(generator.submit(prompt, plan.params, time_left))
        texts = await asyncio.gather(
            *(_collect(s, meters(len(p))) for s, p in zip(streams, ids, strict=True))
        )
    finally:
        for stream in streams:  # a refused or failed prompt stops the others
            stream.cancel()
    out = np.empty(len(texts), dtype=object)
    out[:] = [t.encode("utf-8") for t in texts]
    return {config.output_specs()[0].name: out.reshape(prompts.shape)}


def _texts(array: np.ndarray) -> list[str]:
    try:
        return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in array.ravel()]
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"a prompt is not valid UTF-8 ({exc}); send UTF-8") from None


async def _collect(stream: GenerationStream, meter: TokenMeter) -> str:
    parts = []
    try:
        async for event in stream:
            meter.tokens(event.index, len(event.token_ids), event.finish_reason)
            parts.append(event.text)
    finally:
        meter.close()
    return "".join(parts)
