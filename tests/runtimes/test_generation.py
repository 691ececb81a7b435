"""The text-generation runtime: chosen by task, v2 text in and out, memory, unload, errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from slimserve.errors import ConfigError, ModelLoadError, Unavailable
from slimserve.repository import Repository
from slimserve.runtimes import create_runtime
from slimserve.runtimes.generation import GenerationRuntime
from slimserve.runtimes.llm import malloc
from tests.runtimes.llm.conftest import tiny_llama_dir  # noqa: F401 - a fixture
from tests.transport.test_openai import LM_YAML

pytestmark = pytest.mark.timeout(120)


def repo_with(root: Path, folder: Path, yaml: str) -> Repository:
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "model.yaml").write_text(yaml)
    shutil.copytree(folder, root / "tiny" / "1")
    return Repository(root)


def test_runtime_generates_counts_memory_and_unloads(
    tmp_path: Path,
    tiny_llama_dir: Path,  # noqa: F811
) -> None:
    target = repo_with(tmp_path, tiny_llama_dir, LM_YAML).target("tiny", 1)
    runtime = create_runtime(target)
    assert isinstance(runtime, GenerationRuntime)
    runtime.load()
    # The server runs with large freed buffers kept, as the throughput benchmark measured it.
    assert malloc.tuned() or not Path("/proc/self/maps").read_text().count("libc.so")
    try:
        runtime.warmup()
        engine = runtime.engine
        assert engine is not None
        kv = engine.pool.numel() * engine.pool.element_size()
        assert kv <= 1048576 < kv + engine.block_bytes()  # the pool: kv_cache_bytes, in blocks
        assert runtime.memory_bytes() == engine.model.nbytes() + kv
        prompts = np.array([b"hello world", "caf\u00e9".encode()], dtype=object)
        out = runtime.infer({"text": prompts})["text"]
        assert out.shape == (2,) and out.dtype == object
        assert out[0] == runtime.infer({"text": prompts[:1]})["text"][0]  # greedy: repeatable
        assert all(isinstance(t, bytes) and t for t in out)
    finally:
        runtime.unload()
    assert runtime.memory_bytes() == 0 and engine._thread is None  # the worker stopped
    with pytest.raises(Unavailable):
        runtime.infer({"text": prompts})


def test_text_generation_needs_bytes_tensors(tmp_path: Path, tiny_llama_dir: Path) -> None:  # noqa: F811
    yaml = LM_YAML.replace(
        "outputs: [{name: text, datatype: BYTES, shape: [-1]}]",
        "outputs: [{name: logits, datatype: FP32, shape: [-1]}]",
    )
    runtime = create_runtime(repo_with(tmp_path, tiny_llama_dir, yaml).target("tiny", 1))
    with pytest.raises(ModelLoadError, match="first output"):
        runtime.load()


def test_generation_settings_are_validated(tmp_path: Path, tiny_llama_dir: Path) -> None:  # noqa: F811
    yaml = LM_YAML.replace("max_seqs: 8}", "max_seqs: 8, weights: int4}")
    repository = repo_with(tmp_path, tiny_llama_dir, yaml)
    with pytest.raises(ConfigError, match=r"generation\.weights"):
        repository.config("tiny")


def test_repo_add_detects_a_causal_lm(tmp_path: Path, tiny_llama_dir: Path) -> None:  # noqa: F811
    """`slimserve repo add` of a *ForCausalLM folder writes a text-generation model.yaml whose
    v2 tensors are BYTES text in and out, and it loads as a GenerationRuntime."""
    from slimserve.repository.importer import add_model

    add_model(tmp_path, "lm", tiny_llama_dir)
    config = Repository(tmp_path).config("lm")
    assert config.task == "text-generation"
    assert [(t.name, t.datatype, t.shape) for t in config.outputs] == [("text", "BYTES", [-1])]
    runtime = create_runtime(Repository(tmp_path).target("lm", 1))
    assert isinstance(runtime, GenerationRuntime)


def test_speculative_decoding_is_set_in_model_yaml(tmp_path: Path, tiny_llama_dir: Path) -> None:  # noqa: F811
    """`generation: speculative: {method: draft}` loads the checkpoint again as the draft
    (counted in memory_bytes), and greedy answers are those of plain decoding (fp32: bf16
    verification may break near ties differently from one-row steps)."""
    exact = LM_YAML.replace("max_seqs: 8}", "max_seqs: 8, weights: fp32}")
    plain = create_runtime(repo_with(tmp_path / "a", tiny_llama_dir, exact).target("tiny", 1))
    spec = "weights: fp32, speculative: {method: draft, num_tokens: 3, draft_weights: int8}}"
    yaml = exact.replace("weights: fp32}", spec)
    runtime = create_runtime(repo_with(tmp_path / "b", tiny_llama_dir, yaml).target("tiny", 1))
    prompts = {"text": np.array([b"hello world, hello world, hello"], dtype=object)}
    plain.load()
    runtime.load()
    try:
        engine = runtime.engine
        assert engine is not None
        assert runtime.memory_bytes() > plain.memory_bytes()  # the draft and its KV pool
        assert runtime.infer(prompts)["text"][0] == plain.infer(prompts)["text"][0]
        assert engine.stats().drafted_tokens > 0
    finally:
        runtime.unload()
        plain.unload()
    with pytest.raises(ConfigError, match=r"speculative\.num_tokens"):
        repo_with(tmp_path / "c", tiny_llama_dir, yaml.replace("num_tokens: 3", "num_tokens: 0"))
        Repository(tmp_path / "c").config("tiny")
