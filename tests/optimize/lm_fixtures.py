"""A tiny Llama that has learned the held-out paragraph, saved as a local folder.

Random weights make perplexity meaningless (worse than uniform) and greedy tokens chaotic, so
quantization tolerances could not be asserted; a few seconds of training on the paragraph
give a model with low perplexity and stable greedy continuations, the regime of a real LM.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.runtimes.llm.helpers import minilm_tokenizer, tiny_llama

CACHE_VERSION = 1  # bump when train_tiny_llama changes
LM_YAML = """\
backend: transformers
task: text-generation
inputs:  [{name: text, datatype: BYTES, shape: [-1]}]
outputs: [{name: text, datatype: BYTES, shape: [-1]}]
batching: {max_batch_size: 8, max_queue_delay_ms: 1}
generation: {block_size: 4, kv_cache_bytes: 1048576, max_seqs: 8}
parameters: {max_tokens: 6}
"""


def train_tiny_llama(folder: Path, steps: int = 150) -> Path:
    """hidden 64, 2 layers, MiniLM's tokenizer; trained `steps` Adam steps on the paragraph
    (150: it has learned it, perplexity ~1.0, and greedy decoding recites it)."""
    import torch

    from slimserve.runtimes.llm.quality import HELD_OUT_TEXT

    tokenizer = minilm_tokenizer()
    model = tiny_llama(tokenizer)
    ids = torch.tensor([tokenizer(HELD_OUT_TEXT)["input_ids"]])
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~8 s; two threads on the shared 2 cores were slower
    try:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model.eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def trained_llama_dir() -> Path:
    """Trained once per machine (deterministic: seed 0, one thread) and kept in the temp
    folder, as the SmolLM2 conversion is; written beside and renamed, so never half there."""
    folder = Path(tempfile.gettempdir()) / f"slimserve-trained-tiny-llama-{CACHE_VERSION}"
    if (folder / "model.safetensors").is_file():
        return folder
    partial = Path(tempfile.mkdtemp(prefix=folder.name + ".partial-", dir=folder.parent))
    train_tiny_llama(partial)
    try:
        partial.rename(folder)
    except OSError:  # another session finished first: use its copy
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def lm_repository(root: Path, lm_folder: Path, name: str = "tiny") -> Path:
    """root/NAME/model.yaml (text-generation) and root/NAME/1/ (a copy of the folder)."""
    (root / name).mkdir(parents=True)
    (root / name / "model.yaml").write_text(LM_YAML)
    shutil.copytree(lm_folder, root / name / "1")
    return root
