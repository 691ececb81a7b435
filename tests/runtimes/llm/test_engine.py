"""The engine end to end on a tiny Llama: greedy output equals transformers' generate()."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slimserve.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from slimserve.runtimes.llm import (
    EngineConfig,
    GenerationEngine,
    SamplingParams,
    TextGenerationRuntime,
)

from .helpers import collect, greedy_references, text_of, tokens_of

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
# Prompts of several lengths around the block size (4), some sharing a 12-token prefix.
SHARED = list(range(2000, 2012))
PROMPTS = [
    list(range(1000, 1003)),
    [*SHARED, 7, 8, 9],
    list(range(3000, 3016)),
    [*SHARED, 11, 12, 13, 14, 15],
    list(range(4000, 4031)),
    SHARED,
]


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> list[list[int]]:
    return greedy_references(tiny_llama_dir, PROMPTS, GREEDY.max_tokens)


def make_engine(runtime: TextGenerationRuntime, **config: Any) -> Iterator[GenerationEngine]:
    settings = {"block_size": 4, "kv_cache_bytes": 2**20, "max_seqs": 4} | config
    engine = GenerationEngine(runtime.model, runtime.tokenizer, EngineConfig(**settings))
    engine.start()
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture
def engine(runtime: TextGenerationRuntime) -> Iterator[GenerationEngine]:
    yield from make_engine(runtime)


async def drain(stream: Any) -> list[Any]:
    return [event async for event in stream]


async def joining_mid_flight(engine: GenerationEngine) -> list[list[int]]:
    """Half the requests first; the rest once the first ones are generating."""
    first = [engine.submit(p, GREEDY) for p in PROMPTS[:3]]
    heads = [await anext(stream) for stream in first]
    late = [asyncio.create_task(collect(engine, p, GREEDY)) for p in PROMPTS[3:]]
    early = [
        list(head.token_ids) + tokens_of(await drain(s))
        for head, s in zip(heads, first, strict=True)
    ]
    return early + [tokens_of(events) for events in await asyncio.gather(*late)]


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "static"])
@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix", "noprefix"])
def test_greedy_matches_generate(
    runtime: TextGenerationRuntime,
    reference: list[list[int]],
    continuous: bool,
    prefix_caching: bool,
) -> None:
    for engine in make_engine(runtime, continuous=continuous, prefix_caching=prefix_caching):
        assert asyncio.run(joining_mid_flight(engine)) == reference
        stats = engine.stats()
        assert stats.free_blocks == stats.total_blocks  # every block came back
        assert (stats.cached_tokens > 0) == prefix_caching


def test_greedy_matches_generate_under_preemption(
    runtime: TextGenerationRuntime, reference: list[list[int]]
) -> None:
    # 20 blocks of 4 tokens cannot hold 4 sequences of up to 55 tokens: some are preempted
    # and recompute their tokens later, with the same result.
    small = 20 * runtime.model.shape.layers * 2 * 2 * 16 * 4 * 4 + 1
    for engine in make_engine(runtime, kv_cache_bytes=small, prefix_caching=False):
        assert asyncio.run(joining_mid_flight(engine)) == reference
        assert engine.stats().preemptions > 0


def test_prefix_cache_hits_are_reported_in_usage(engine: GenerationEngine) -> None:
    async def scenario() -> tuple[Any, Any]:
        first = await collect(engine, [*SHARED, 1, 2], GREEDY)
        second = await collect(engine, [*SHARED, 3, 4, 5], GREEDY)
        return first[-1].usage, second[-1].usage

    first, second = asyncio.run(scenario())
    assert first.cached_tokens == 0 and second.cached_tokens == 12
    assert (second.prompt_tokens, second.completion_tokens, second.total_tokens) == (15, 24, 39)


def test_events_stream_text_and_a_final_usage(
    engine: GenerationEngine, runtime: TextGenerationRuntime
) -> None:
    events = asyncio.run(collect(engine, PROMPTS[2], SamplingParams(max_tokens=10, temperature=0)))
    assert len(events) == 10 and all(len(e.token_ids) == 1 for e in events)
    assert [e.finish_reason for e in events] == [None] * 9 + ["length"]
    assert all(e.usage is None for e in events[:-1]) and events[-1].usage is not None
    assert text_of(events) == runtime.decode(tokens_of(events))


def test_a_stop_string_ends_the_choice_and_is_cut(
    engine: GenerationEngine, runtime: TextGenerationRuntime
) -> None:
    full = text_of(asyncio.run(collect(engine, PROMPTS[2], GREEDY)))
    stop = full.split()[3]
    params = SamplingParams(max_tokens=24, temperature=0, stop=(stop,))
    events = asyncio.run(collect(engine, PROMPTS[2], params))
    assert text_of(events) == full[: full.index(stop)]
    assert events[-1].finish_reason == "stop" and len(events) < 24


def test_eos_ends_a_choice(runtime: TextGenerationRuntime, reference: list[list[int]]) -> None:
    eos = reference[0][5]
    engine = GenerationEngine(
        runtime.model, runtime.tokenizer, EngineConfig(block_size=4), eos_token_ids=[eos]
    )
    engine.start()
    try:
        events = asyncio.run(collect(engine, PROMPTS[0], GREEDY))
    finally:
        engine.close()
    assert tokens_of(events) == reference[0][: reference[0].index(eos) + 1]
    assert events[-1].finish_reason == "stop"


def test_seeded_sampling_repeats_and_n_gives_choices(engine: GenerationEngine) -> None:
    params = SamplingParams(
        max_tokens=12,
        temperature=1.0,
        top_p=0.9,
        seed=7,
        n=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        logprobs=2,
    )
    first = asyncio.run(collect(engine, PROMPTS[1], params))
    again = asyncio.run(collect(engine, PROMPTS[1], params))
    assert [tokens_of(first, i) for i in range(3)] == [tokens_of(again, i) for i in range(3)]
    assert len({tuple(tokens_of(first, i)) for i in range(3)}) > 1  # seeds seed, seed+1, ...
    assert first[-1].usage is not None and first[-1].usage.completion_tokens == 36
    logprob = first[0].logprobs[0]
    assert logprob.logprob <= 0.0 and len(logprob.top) == 2


def test_leaving_the_stream_cancels_and_frees(engine: GenerationEngine) -> None:
    async def scenario() -> None:
        stream = engine.submit(PROMPTS[4], SamplingParams(max_tokens=400, temperature=0))
        async with stream:
            async for _ in stream:
                break

    asyncio.run(scenario())
    wait_until_idle(engine)
    stats = engine.stats()
    assert stats.running == 0 and stats.free_blocks == stats.total_blocks
    assert stats.iterations < 400  # stopped long before max_tokens


def wait_until_idle(engine: GenerationEngine) -> None:
    """The engine thread frees a cancelled request's blocks at its next iteration."""
    for _ in range(1000):
        stats = engine.stats()
        if stats.free_blocks == stats.total_blocks:
            return
        time.sleep(0.01)


def test_a_task_cancelled_mid_stream_cancels_its_request(engine: GenerationEngine) -> None:
    async def scenario() -> None:
        task = asyncio.create_task(collect(engine, PROMPTS[4], SamplingParams(max_tokens=400)))
        while engine.stats().running == 0:  # noqa: ASYNC110 - polls a state that has no event to wait on
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while engine.stats().free_blocks < engine.stats().total_blocks:  # noqa: ASYNC110 - polls a state that has no event to wait on
            await asyncio.sleep(0.005)

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_a_passed_deadline_fails_the_stream(runtime: TextGenerationRuntime) -> None:
    now = [0.0]
    engine = GenerationEngine(
        runtime.model, runtime.tokenizer, EngineConfig(block_size=4), clock=lambda: now[0]
    )
    engine.start()

    async def scenario() -> None:
        stream = engine.submit(PROMPTS[0], SamplingParams(max_tokens=400), deadline_s=5.0)
        await anext(stream)
        now[0] = 6.0
        with pytest.raises(DeadlineExceeded):
            async for _ in stream:
                pass

    try:
        asyncio.run(asyncio.wait_for(scenario(), 20))
    finally:
        engine.close()


@pytest.mark.parametrize(
    ("prompt", "params", "message"),
    [
        ([], GREEDY, "prompt is empty"),
        ([10**6], GREEDY, "token ids must be in"),
        ([5] * 500, GREEDY, "exceeds the context of"),
    ],
)
def test_bad_requests_are_refused_at_submit(
    engine: GenerationEngine, prompt: list[int], params: SamplingParams, message: str
) -> None:
    async def scenario() -> None:
        with pytest.raises(InvalidArgument, match=message):
            engine.submit(prompt, params)

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 0),
        ("temperature", -1.0),
        ("top_p", 0.0),
        ("n", 0),
        ("stop", ("",)),
        ("presence_penalty", 3.0),
        ("logprobs", 99),
    ],
)
def test_bad_sampling_params_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(InvalidArgument, match=f"{field}="):
        SamplingParams(**{field: value})


def test_submit_before_start_is_unavailable(runtime: TextGenerationRuntime) -> None:
    engine = GenerationEngine(runtime.model, runtime.tokenizer)

    async def scenario() -> None:
        with pytest.raises(Unavailable, match="start"):
            engine.submit([1, 2], GREEDY)

    asyncio.run(scenario())


def test_queue_bound_refuses_with_resource_exhausted(runtime: TextGenerationRuntime) -> None:
    # max_seqs=1 and a long first request: the second waits, the third finds the queue full.
    for engine in make_engine(runtime, max_seqs=1, max_waiting=1):

        async def scenario(engine: GenerationEngine) -> None:
            first = engine.submit(PROMPTS[0], SamplingParams(max_tokens=300, temperature=0))
            await anext(first)
            second = engine.submit(PROMPTS[1], GREEDY)
            with pytest.raises(ResourceExhausted, match="already waiting"):
                engine.submit(PROMPTS[2], GREEDY)
            await first.aclose()
            assert len(tokens_of([e async for e in second])) == 24

        asyncio.run(asyncio.wait_for(scenario(engine), 30))


def test_engine_config_names_a_bad_field() -> None:
    with pytest.raises(InvalidArgument, match=r"EngineConfig.block_size=0"):
        EngineConfig(block_size=0)
    with pytest.raises(InvalidArgument, match=r"EngineConfig.prefill_first=-1"):
        EngineConfig(prefill_first=-1)


def test_a_kv_budget_below_two_blocks_is_refused(runtime: TextGenerationRuntime) -> None:
    with pytest.raises(ResourceExhausted, match="raise the KV memory budget"):
        GenerationEngine(runtime.model, runtime.tokenizer, EngineConfig(kv_cache_bytes=1))


def test_n_greedy_choices_share_the_prompt_blocks(
    engine: GenerationEngine, reference: list[list[int]]
) -> None:
    params = SamplingParams(max_tokens=24, temperature=0, n=3)
    events = asyncio.run(collect(engine, PROMPTS[4], params))
    assert [tokens_of(events, i) for i in range(3)] == [reference[4]] * 3
    # 31 prompt tokens: 7 full blocks of 4 before the last token, shared by choices 1 and 2.
    assert engine.stats().cached_tokens == 2 * 7 * 4


def test_preemption_with_prefix_caching_still_matches(
    runtime: TextGenerationRuntime, reference: list[list[int]]
) -> None:
    small = 20 * runtime.model.shape.layers * 2 * 2 * 16 * 4 * 4 + 1
    for engine in make_engine(runtime, kv_cache_bytes=small, prefix_caching=True):
        assert asyncio.run(joining_mid_flight(engine)) == reference
        assert engine.stats().preemptions > 0
