"""Model-parallel generation on the tiny Llama (4 heads, 2 KV heads, 2 layers): P stages x T
tensor ranks in real worker processes (torch.distributed, gloo). Greedy tokens equal
transformers' generate() and the single-process engine, with continuous batching, prefix
caching, preemption and requests joining mid-flight; a killed worker fails the requests in
flight with UNAVAILABLE and the group serves again."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from slimserve.errors import InvalidArgument, ModelLoadError, Unavailable
from slimserve.runtimes.llm import EngineConfig, GenerationEngine, SamplingParams
from slimserve.runtimes.llm.parallel.group import GroupConfig, ModelGroup
from slimserve.runtimes.llm.parallel.plan import Dims, make_plan
from slimserve.runtimes.llm.runtime import TextCodec, TextGenerationRuntime
from slimserve.runtimes.llm.speculate import SpeculativeConfig

from .conftest import save_random_llama
from .helpers import collect, greedy_references, tokens_of
from .test_engine import GREEDY, PROMPTS, joining_mid_flight

SPLITS = [(2, 1), (1, 2), (2, 2)]  # (pipeline, tensor)
TIGHT_KV = 20  # blocks: 4 sequences of up to 55 tokens do not fit, some are preempted


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path) -> list[list[int]]:
    return greedy_references(tiny_llama_dir, PROMPTS, GREEDY.max_tokens)


def start_group(folder: Path, pipeline: int, tensor: int, **config: Any) -> ModelGroup:
    settings = GroupConfig(folder, "fp32", pipeline, tensor, **({"step_timeout_s": 60.0} | config))
    return ModelGroup(settings, TextCodec.load_codec(folder).config())


@pytest.fixture(scope="module", params=SPLITS, ids=[f"P{p}xT{t}" for p, t in SPLITS])
def group(request: pytest.FixtureRequest, tiny_llama_dir: Path) -> Iterator[ModelGroup]:
    pipeline, tensor = request.param
    group = start_group(tiny_llama_dir, pipeline, tensor)
    try:
        yield group
    finally:
        group.close()


@contextmanager
def engine_on(
    model: Any, runtime: TextGenerationRuntime, **config: Any
) -> Iterator[GenerationEngine]:
    settings = {"block_size": 4, "kv_cache_bytes": 2**20, "max_seqs": 4} | config
    engine = GenerationEngine(model, runtime.tokenizer, EngineConfig(**settings))
    engine.start()
    try:
        yield engine
    finally:
        engine.close()


def kv_bytes(runtime: TextGenerationRuntime, blocks: int) -> int:
    shape = runtime.model.shape  # K and V of every layer, fp32, block size 4
    return blocks * shape.layers * 2 * shape.kv_heads * shape.head_dim * 4 * 4 + 1


def test_greedy_matches_generate_and_one_process(
    group: ModelGroup, runtime: TextGenerationRuntime, reference: list[list[int]]
) -> None:
    with engine_on(group, runtime) as engine:
        assert asyncio.run(joining_mid_flight(engine)) == reference
        stats = engine.stats()
        assert stats.cached_tokens > 0  # the shared prompts hit the workers' cached blocks
        assert stats.free_blocks == stats.total_blocks
    with engine_on(runtime.model, runtime) as engine:
        assert asyncio.run(joining_mid_flight(engine)) == reference


def test_greedy_matches_under_preemption(
    group: ModelGroup, runtime: TextGenerationRuntime, reference: list[list[int]]
) -> None:
    small = kv_bytes(runtime, TIGHT_KV)
    with engine_on(group, runtime, kv_cache_bytes=small) as engine:
        assert asyncio.run(joining_mid_flight(engine)) == reference
        assert engine.stats().preemptions > 0


def test_each_process_holds_its_share(group: ModelGroup, runtime: TextGenerationRuntime) -> None:
    with engine_on(group, runtime):
        sizes = group.per_process
    assert len(sizes) == group.plan.world
    whole_kv = kv_bytes(runtime, 2**20 // kv_bytes(runtime, 1)) - 1
    for size in sizes:  # the KV pool splits by layers (P) and KV heads (T)
        assert size["kv"] * group.plan.world == pytest.approx(whole_kv, rel=0.01)
        assert size["weights"] < runtime.model.nbytes()


def test_a_killed_worker_fails_in_flight_requests_and_the_group_recovers(
    tiny_llama_dir: Path, runtime: TextGenerationRuntime, reference: list[list[int]]
) -> None:
    group = start_group(tiny_llama_dir, 2, 1, step_timeout_s=30.0)
    try:
        with engine_on(group, runtime) as engine:

            async def scenario() -> None:
                stream = engine.submit(PROMPTS[4], SamplingParams(max_tokens=400))
                await anext(stream)  # generating
                os.kill(group.per_process[1]["pid"], signal.SIGKILL)
                with pytest.raises(Unavailable, match="worker"):
                    async for _ in stream:
                        pass

            asyncio.run(asyncio.wait_for(scenario(), 60))
            assert group.restarts == 1
            events = asyncio.run(asyncio.wait_for(collect(engine, PROMPTS[1], GREEDY), 120))
            assert tokens_of(events) == reference[1]  # served again, by new processes
            os.kill(group.per_process[0]["pid"], signal.SIGKILL)  # idle: no request fails
            wait_until(lambda: not group.healthy())
            events = asyncio.run(asyncio.wait_for(collect(engine, PROMPTS[2], GREEDY), 120))
            assert tokens_of(events) == reference[2] and group.restarts == 2
    finally:
        group.close()


def wait_until(condition: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_a_bad_split_is_refused_naming_the_setting(tiny_llama_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="pipeline_parallel=3 exceeds the model's 2 layers"):
        start_group(tiny_llama_dir, 3, 1)
    with pytest.raises(ModelLoadError, match="tensor_parallel=3 divides neither"):
        start_group(tiny_llama_dir, 1, 3)


def test_the_budget_is_checked_per_process(
    tiny_llama_dir: Path, runtime: TextGenerationRuntime
) -> None:
    group = start_group(tiny_llama_dir, 2, 1, budget_bytes=2**20)
    try:
        with pytest.raises(ModelLoadError, match=r"over its memory budget of 1\.0 MiB"):
            GenerationEngine(group, runtime.tokenizer, EngineConfig(block_size=4))
    finally:
        group.close()


def test_speculative_decoding_is_refused_on_a_group(
    group: ModelGroup, runtime: TextGenerationRuntime
) -> None:
    config = EngineConfig(block_size=4, kv_cache_bytes=2**20, speculative=SpeculativeConfig())
    with pytest.raises(InvalidArgument, match="speculative decoding does not run"):
        GenerationEngine(group, runtime.tokenizer, config)


def test_stages_split_layers_evenly_and_smollm2_splits_only_its_mlp() -> None:
    assert make_plan(Dims(5, 4, 2, 128), 2, 1).stages == ((0, 3), (3, 5))
    smollm2 = make_plan(Dims(30, 9, 3, 1536), 1, 2)  # 9 query heads, 3 KV heads
    assert (smollm2.split_heads, smollm2.split_mlp) == (False, True)
    assert "attention is replicated on every rank, the MLP is split" in smollm2.notes[0]
    assert make_plan(Dims(2, 4, 2, 128), 2, 2).notes == ()


@pytest.fixture(scope="module")
def odd_heads_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny Llama's tokenizer with 6 query and 3 KV heads: at T=2 only the MLP splits."""
    from transformers import AutoTokenizer, LlamaConfig

    folder = tmp_path_factory.mktemp("odd-heads")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir, local_files_only=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    save_random_llama(folder, config, tokenizer, seed=1)
    return folder


def test_heads_that_do_not_divide_are_replicated_and_still_match(odd_heads_dir: Path) -> None:
    runtime = TextGenerationRuntime.load(odd_heads_dir)
    expected = greedy_references(odd_heads_dir, PROMPTS[:3], GREEDY.max_tokens)
    group = start_group(odd_heads_dir, 2, 2)  # 3 layers in stages of 2 and 1
    try:
        assert group.plan.stages == ((0, 2), (2, 3)) and not group.plan.split_heads
        with engine_on(group, runtime) as engine:

            async def all_at_once() -> list[list[int]]:
                runs = [collect(engine, p, GREEDY) for p in PROMPTS[:3]]
                return [tokens_of(events) for events in await asyncio.gather(*runs)]

            assert asyncio.run(all_at_once()) == expected
    finally:
        group.close()


def test_model_yaml_names_a_bad_split_setting() -> None:
    from pydantic import ValidationError

    from slimserve.repository.schema import GenerationSettings

    with pytest.raises(ValidationError, match="pipeline_parallel"):
        GenerationSettings(pipeline_parallel=0)
    assert GenerationSettings(pipeline_parallel=2, tensor_parallel=2).processes == 4
