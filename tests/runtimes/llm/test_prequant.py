"""Pre-quantized LM weights: int4 packing, the stored format, and loading it without
re-quantizing; greedy output of a loaded variant stays close to the original's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from slimserve.errors import InvalidArgument, ModelLoadError
from slimserve.runtimes.llm import SamplingParams
from slimserve.runtimes.llm.engine import EngineConfig, GenerationEngine
from slimserve.runtimes.llm.prequant import METADATA_KEY, quantize_state, read_format
from slimserve.runtimes.llm.quality import HELD_OUT_TEXT
from slimserve.runtimes.llm.quant import Int8Linear
from slimserve.runtimes.llm.quant4 import Int4Linear
from slimserve.runtimes.llm.runtime import TextGenerationRuntime
from slimserve.runtimes.qmath import dequantize_int4_affine, quantize_int4_affine, unpack_uint4
from tests.optimize.lm_fixtures import trained_llama_dir  # noqa: F401 - a fixture
from tests.runtimes.llm.helpers import collect, run, tokens_of

# Greedy continuations of a prompt must agree on at least this share of tokens with the
# original's (measured: int8 and int4 group 32 both 16/16 on the tiny trained model).
GREEDY_AGREEMENT = 0.75


def test_int4_packs_two_levels_a_byte_low_nibble_first() -> None:
    weight = torch.tensor([[0.0, 15.0, 3.0, 12.0]])  # one group of 4: scale 1, low 0
    packed, scale, low = quantize_int4_affine(weight, 4)
    assert packed.tolist() == [[0xF0, 0xC3]]
    assert unpack_uint4(packed).tolist() == [[0, 15, 3, 12]]
    assert scale.tolist() == [[1.0]] and low.tolist() == [[0.0]]


def test_int4_error_is_within_half_a_step_per_group() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 128) * torch.linspace(0.01, 2.0, 48)[:, None]  # rows of any range
    packed, scale, low = quantize_int4_affine(weight, 32)
    assert packed.shape == (48, 64) and scale.shape == low.shape == (48, 4)
    back = dequantize_int4_affine(packed, scale, low, torch.float32)
    step = scale.float().repeat_interleave(32, dim=1)
    assert bool(((back - weight).abs() <= step * 0.5 + 1e-3 * weight.abs() + 1e-6).all())


def test_int4_linear_multiplies_by_the_dequantized_weight() -> None:
    torch.manual_seed(1)
    packed, scale, low = quantize_int4_affine(torch.randn(16, 64), 32)
    x = torch.randn(3, 5, 64)
    expected = x @ dequantize_int4_affine(packed, scale, low, torch.float32).T
    torch.testing.assert_close(Int4Linear(packed, scale, low)(x), expected)


def _quantized_folder(src: Path, dst: Path, scheme: str, group: int | None = None) -> Path:
    import shutil

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors, meta = quantize_state(load_file(src / "model.safetensors"), scheme, group)
    save_file(tensors, str(dst / "model.safetensors"), metadata=meta)
    return dst


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, trained_llama_dir: Path) -> Any:  # noqa: F811
    root = tmp_path_factory.mktemp("prequant")
    return {
        "int8": _quantized_folder(trained_llama_dir, root / "int8", "int8"),
        "int4": _quantized_folder(trained_llama_dir, root / "int4", "int4", 32),
    }


def test_plain_folders_have_no_quantization(trained_llama_dir: Path) -> None:  # noqa: F811
    assert read_format(trained_llama_dir) is None


def test_int8_loads_the_stored_levels_without_re_rounding(folders: Any) -> None:
    runtime = TextGenerationRuntime.load(folders["int8"], weights="fp32")  # stored form wins
    stored = load_file(folders["int8"] / "model.safetensors")
    qkv = runtime.model.layers[1].qkv
    assert isinstance(qkv, Int8Linear)
    parts = [f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkv"]
    assert torch.equal(qkv.qweight, torch.cat([stored[p + ".q"] for p in parts]))
    assert torch.equal(qkv.scale, torch.cat([stored[p + ".scale"] for p in parts]))


def test_int4_compute_int8_or_unpack(folders: Any) -> None:
    fast = TextGenerationRuntime.load(folders["int4"])
    small = TextGenerationRuntime.load(folders["int4"], int4_compute="unpack")
    assert isinstance(fast.model.layers[0].gate_up, Int8Linear)
    assert isinstance(small.model.layers[0].gate_up, Int4Linear)
    assert small.model.nbytes() < fast.model.nbytes()
    with pytest.raises(InvalidArgument, match="int4_compute"):
        TextGenerationRuntime.load(folders["int4"], int4_compute="int2")


def test_unknown_scheme_in_the_header_is_refused(folders: Any, tmp_path: Path) -> None:
    tensors = load_file(folders["int8"] / "model.safetensors")
    save_file(
        tensors,
        str(tmp_path / "model.safetensors"),
        metadata={METADATA_KEY: json.dumps({"scheme": "int3"})},
    )
    with pytest.raises(ModelLoadError, match="make the variant again"):
        read_format(tmp_path)


def test_int4_group_must_divide_every_layer(trained_llama_dir: Path) -> None:  # noqa: F811
    state = load_file(trained_llama_dir / "model.safetensors")
    with pytest.raises(InvalidArgument, match="use group=32 or 64"):
        quantize_state(state, "int4", 128)


def _greedy(runtime: TextGenerationRuntime, prompt: list[int], tokens: int) -> list[int]:
    engine = GenerationEngine(
        runtime.model, runtime.tokenizer, EngineConfig(), runtime.eos_token_ids
    )
    engine.start()
    try:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        return tokens_of(run(collect(engine, prompt, params)))
    finally:
        engine.close()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_greedy_output_stays_close_to_the_original(
    folders: Any,
    trained_llama_dir: Path,  # noqa: F811
    scheme: str,
) -> None:
    original = TextGenerationRuntime.load(trained_llama_dir)
    variant = TextGenerationRuntime.load(folders[scheme])
    prompt = original.encode(HELD_OUT_TEXT[:60])[:-1]  # without the closing [SEP]
    want, got = _greedy(original, prompt, 16), _greedy(variant, prompt, 16)
    same = sum(a == b for a, b in zip(want, got, strict=True)) / len(want)
    assert same >= GREEDY_AGREEMENT, (want, got)
