"""transformers backend: a local model folder (config.json, tokenizer, safetensors weights).

Loading never touches the network (`local_files_only`), never runs code shipped with the
model (`trust_remote_code=False`) and reads safetensors weights only (`use_safetensors`);
a folder with pickle weights (`pytorch_model.bin`) is refused with how to convert it.

model.yaml `task`:
  embedding                BYTES `text` [-1] (raw UTF-8 strings) -> FP32 [-1, hidden]: the
                           mean of the last hidden states over real (unpadded) tokens, L2
                           normalized when `normalize` is true (sentence-transformers style).
  sequence-classification  BYTES `text` [-1] -> FP32 logits [-1, num_labels].
Tokenization (padding to the longest text of the batch, truncation to `max_length` tokens)
runs inside `infer`. The first declared input and output are used, whatever their names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slimserve.errors import InvalidArgument, ModelLoadError
from slimserve.repository.store import Target
from slimserve.runtimes._common import check_folder, not_loaded
from slimserve.runtimes._hf_memory import load_in_memory
from slimserve.runtimes.base import Runtime, RuntimeOptions
from slimserve.runtimes.torch import module_bytes, resolve_threads, use_threads
from slimserve.security.crypto import SUFFIX

# Loading arguments that keep a model folder from reaching the network or running code.
_SAFE_LOAD: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}


class TransformersRuntime(Runtime):
    """Text embedding or sequence classification with a local transformers model.

    Called from one thread at a time (its unit's): a fast tokenizer called with padding or
    truncation settings mutates itself and fails ("Already borrowed") when two threads use it.
    """

    def __init__(self, target: Target, options: RuntimeOptions | None = None) -> None:
        super().__init__(target, options)
        self._model: nn.Module | None = None
        self._tokenizer: Any = None
        self._threads = resolve_threads(self.options)
        self._max_length = self.target.config.max_length

    def load(self) -> None:
        folder = check_folder(self.target)
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.safetensors.enc")):
            raise ModelLoadError(
                f"{folder}: no *.safetensors weights; fix: save the model with "
                "model.save_pretrained(dir, safe_serialization=True)"
            )
        self._check_specs(folder)
        if any(folder.glob(f"*{SUFFIX}")):  # encrypted files: decrypt in memory, never on disk
            key = self.options.data_key
            tokenizer, model = load_in_memory(folder, self.target.config.task, key)
        else:
            tokenizer, model = _load_folder(folder, self.target.config.task)
        self._check_width(folder, model)
        self._max_length = _token_limit(self.target.config.max_length, tokenizer, model)
        self._tokenizer, self._model = tokenizer, model

    def _check_specs(self, folder: Path) -> None:
        if not self.inputs or self.inputs[0].datatype != "BYTES":
            raise ModelLoadError(
                f"{folder}: the transformers backend takes text: declare the first input as "
                "{name: text, datatype: BYTES, shape: [-1]} in model.yaml"
            )
        if not self.outputs or self.outputs[0].datatype != "FP32":
            raise ModelLoadError(
                f"{folder}: declare the first output as FP32 in model.yaml, e.g. "
                "{name: embedding, datatype: FP32, shape: [-1, 384]}"
            )

    def _check_width(self, folder: Path, model: nn.Module) -> None:
        """The declared output width must be the model's hidden size / number of labels."""
        config: Any = model.config
        is_embedding = self.target.config.task == "embedding"
        width = config.hidden_size if is_embedding else config.num_labels
        declared = self.outputs[0].shape[-1] if self.outputs[0].shape else -1
        if declared not in (-1, width):
            what = "hidden size" if is_embedding else "number of labels"
            raise ModelLoadError(
                f"{folder}: output '{self.outputs[0].name}' is declared with width {declared} "
                f"but the model's {what} is {width}; fix: shape: [-1, {width}] in model.yaml"
            )

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        model, tokenizer = self._model, self._tokenizer
        if model is None:
            raise not_loaded(self.target)
        config = self.target.config
        texts = decode_texts(inputs[self.inputs[0].name])
        use_threads(self._threads)
        encoded = tokenizer(
            texts, padding=True, truncation=True, max_length=self._max_length, return_tensors="pt"
        )
        with torch.inference_mode():
            if config.task == "embedding":
                result = embed(model, encoded, normalize=config.normalize)
            else:
                result = model(**encoded).logits
        return {self.outputs[0].name: result.float().numpy()}

    def unload(self) -> None:
        self._model = None
        self._tokenizer = None

    def memory_bytes(self) -> int:
        model = self._model
        return 0 if model is None else module_bytes(model)


def _load_folder(folder: Path, task: str | None) -> tuple[Any, nn.Module]:
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # A server's log is no place for tqdm bars ("Loading weights ... it/s"); process-wide.
    hf_logging.disable_progress_bar()
    auto = AutoModel if task == "embedding" else AutoModelForSequenceClassification
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), **_SAFE_LOAD)
        model = auto.from_pretrained(str(folder), use_safetensors=True, **_SAFE_LOAD)
    except (OSError, ValueError, KeyError) as exc:
        # transformers reports a missing/invalid config, tokenizer or weight file this way.
        raise ModelLoadError(f"{folder}: transformers cannot load it: {exc}") from None
    return tokenizer, model.eval()


def _token_limit(max_length: int, tokenizer: Any, model: nn.Module) -> int:
    """model.yaml's max_length, capped by what the model can take: longer sequences would
    index past its position embeddings. Tokenizers without a limit report a huge sentinel."""
    positions = getattr(model.config, "max_position_embeddings", None) or max_length
    return min(max_length, int(min(tokenizer.model_max_length, 1 << 30)), positions)


def decode_texts(array: np.ndarray) -> list[str]:
    """A BYTES tensor of any shape (one text per element, batch order) as Python strings."""
    try:
        return [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in array.ravel()]
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"text input is not valid UTF-8 ({exc}); send UTF-8") from None


def embed(model: nn.Module, encoded: Any, *, normalize: bool) -> torch.Tensor:
    """Mean of the last hidden states over the attention mask: (B, T, H) -> (B, H)."""
    hidden = model(**encoded).last_hidden_state  # (B, T, H)
    mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    # clamp: an empty text still has [CLS]/[SEP], but never divide by zero.
    pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (B, H)
    return torch.nn.functional.normalize(pooled, p=2, dim=1) if normalize else pooled
