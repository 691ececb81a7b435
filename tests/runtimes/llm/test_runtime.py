"""Loading a model folder: safety checks, chat prompts, int8 weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slimserve.errors import InvalidArgument, ModelLoadError, UnsafeArtifact
from slimserve.runtimes.llm import TextGenerationRuntime
from slimserve.runtimes.llm.model import Batch, forward, new_kv_pool


def test_chat_prompts_use_the_tokenizer_template(tiny_llama_dir: Path) -> None:
    runtime = TextGenerationRuntime.load(tiny_llama_dir)
    ids = runtime.encode_chat([{"role": "user", "content": "hello there"}])
    assert runtime.decode(ids) == "user : hello there assistant :"  # MiniLM lower-cases


def test_other_architectures_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not an architecture") as info:
        TextGenerationRuntime.load(folder)
    assert "qwen2 (Qwen2, Qwen2.5)" in info.value.message  # with the supported ones listed


def test_pickle_weights_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(UnsafeArtifact, match=r"pytorch_model.bin is a pickle file"):
        TextGenerationRuntime.load(folder)


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config.json"):
        TextGenerationRuntime.load(tmp_path)


def test_unknown_weights_kind_is_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(InvalidArgument, match="weights='int3'"):
        TextGenerationRuntime.load(tiny_llama_dir, weights="int3")


def full_logits(runtime: TextGenerationRuntime, tokens: list[int]):  # type: ignore[no-untyped-def]
    """Logits (T, V) of every position of one sequence, through the paged forward."""
    import torch

    block = 16
    count = -(-len(tokens) // block)
    pool = new_kv_pool(runtime.model.shape, count + 1, block)
    positions = torch.arange(len(tokens))
    batch = Batch(
        tokens=torch.tensor([tokens]),
        positions=positions[None],
        slots=positions + block,
        block_tables=torch.arange(1, count + 1)[None],
        last=torch.tensor([len(tokens) - 1]),
    )
    return forward(runtime.model, pool, batch, all_logits=True)[0]


@pytest.mark.parametrize("weights", ["int8", "int8-weight-only"])
def test_int8_weights_take_a_quarter_and_track_fp32(tiny_llama_dir: Path, weights: str) -> None:
    import torch

    fp32 = TextGenerationRuntime.load(tiny_llama_dir)
    int8 = TextGenerationRuntime.load(tiny_llama_dir, weights=weights)
    tokens = list(range(1000, 1040))
    a, b = full_logits(fp32, tokens), full_logits(int8, tokens)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    # int8 keeps the MLP down projection in fp32 (int8-rounded weights; see quant.py).
    roles = ("qkv", "o", "gate_up") if weights == "int8" else ("qkv", "o", "gate_up", "down")
    ratio = linear_bytes(int8, roles) / linear_bytes(fp32, roles)
    assert ratio < 0.3  # int8 + one fp32 scale per output row


def linear_bytes(runtime: TextGenerationRuntime, roles: tuple[str, ...]) -> int:
    """Bytes of the decoder layers' matmul weights of these roles."""
    linears = [getattr(layer, role) for layer in runtime.model.layers for role in roles]
    tensors = [t for linear in linears for t in vars(linear).values() if hasattr(t, "numel")]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_paged_forward_matches_transformers_logits(tiny_llama_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, local_files_only=True).eval()
    tokens = list(range(500, 537))
    with torch.no_grad():
        expected = hf(torch.tensor([tokens])).logits[0]
    got = full_logits(TextGenerationRuntime.load(tiny_llama_dir), tokens)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_converting_a_missing_gguf_file_is_refused(tmp_path: Path) -> None:
    from slimserve.runtimes.llm import convert_gguf

    with pytest.raises(ModelLoadError, match="no such GGUF file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def test_bf16_weights_track_fp32_and_halve_the_kv_cache(tiny_llama_dir: Path) -> None:
    import torch

    from slimserve.runtimes.llm.model import HAS_BF16, kv_bytes_per_token

    fp32 = TextGenerationRuntime.load(tiny_llama_dir)
    bf16 = TextGenerationRuntime.load(tiny_llama_dir, weights="bf16")
    tokens = list(range(1000, 1040))
    a, b = full_logits(fp32, tokens), full_logits(bf16, tokens)
    assert b.dtype == torch.float32  # logits are handed to sampling in fp32 either way
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    # Where the CPU lacks avx512_bf16, `bf16` is the exact fp32 path.
    expected = torch.bfloat16 if HAS_BF16 else torch.float32
    assert bf16.model.shape.dtype == expected
    ratio = kv_bytes_per_token(bf16.model.shape) / kv_bytes_per_token(fp32.model.shape)
    assert ratio == (0.5 if HAS_BF16 else 1.0)


def test_decode_attention_matches_prefill_attention(tiny_llama_dir: Path) -> None:
    """Decoding token by token (the batched-matmul path) gives the logits of one prefill
    (scaled_dot_product_attention), with the sequence's blocks scattered in the pool."""
    import torch

    runtime = TextGenerationRuntime.load(tiny_llama_dir)
    tokens, block = list(range(700, 723)), 4
    table = torch.tensor([9, 2, 7, 4, 11, 1])  # positions 0-3 in block 9, 4-7 in block 2, ...
    pool = new_kv_pool(runtime.model.shape, 12, block)
    expected = full_logits(runtime, tokens)
    for position, token in enumerate(tokens):
        slot = table[position // block] * block + position % block
        step = Batch(
            tokens=torch.tensor([[token]]),
            positions=torch.tensor([[position]]),
            slots=slot.view(1),
            block_tables=table[None, : position // block + 1],
            last=torch.tensor([0]),
        )
        logits = forward(runtime.model, pool, step)[0]
        torch.testing.assert_close(logits, expected[position], rtol=1e-4, atol=1e-4)
