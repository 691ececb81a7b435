"""Load a causal language model from a local transformers folder for the generation engine.

The folder holds config.json, the tokenizer files and *.safetensors weights (pickle weights
are refused). Nothing touches the network (`local_files_only`) or runs code shipped with the
model (`trust_remote_code=False`). The weights are read straight from safetensors into our own
forward (model.py); the transformers model class is never built, so loading is fast and the
weights are held once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimserve.errors import InvalidArgument, ModelLoadError, UnsafeArtifact
from slimserve.runtimes.llm.model import (
    FloatLinear,
    Linear,
    LlamaModel,
    MakeLinear,
    auto_weights,
    bf16_linear,
    build_model,
    compute_dtype,
)

_SAFE_LOAD: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
_PICKLE = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")
WEIGHTS = ("auto", "fp32", "bf16", "bf16+int4", "int8", "int8-weight-only")


@dataclass
class TextCodec:
    """A model folder's tokenizer (with its chat template) and end-of-sequence ids: what
    serving needs of a model whose weights live elsewhere (model-parallel workers)."""

    folder: Path
    tokenizer: Any
    eos_token_ids: tuple[int, ...]

    @classmethod
    def load_codec(cls, folder: str | Path) -> TextCodec:
        from transformers import AutoConfig, AutoTokenizer

        path = _check_folder(Path(folder))
        config = AutoConfig.from_pretrained(path, **_SAFE_LOAD)
        tokenizer = AutoTokenizer.from_pretrained(path, **_SAFE_LOAD)
        return cls(path, tokenizer, _eos_ids(config, tokenizer))

    def config(self) -> Any:
        """The folder's transformers config."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.folder, **_SAFE_LOAD)

    def encode(self, text: str) -> list[int]:
        """Token ids of a completion prompt (with the tokenizer's usual special tokens)."""
        return list(self.tokenizer(text)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of a chat, rendered by the tokenizer's chat template, ready to answer."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidArgument(
                f"{self.folder}: the tokenizer has no chat template; use completions, or add "
                "a chat_template to tokenizer_config.json"
            )
        ids = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        return list(ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))


@dataclass
class TextGenerationRuntime(TextCodec):
    """A tokenizer (with its chat template) and our Llama forward, from one folder."""

    model: LlamaModel

    @classmethod
    def load(
        cls, folder: str | Path, weights: str = "fp32", int4_compute: str | None = None
    ) -> TextGenerationRuntime:
        """`weights`: auto (what the CPU runs fastest: `bf16+int4` where it has bf16
        arithmetic, else int8; see model.auto_weights); fp32; bf16 (bf16 matmuls, attention
        and KV cache, fp32 residual stream; fp32 where the CPU lacks avx512_bf16);
        bf16+int4 (bf16, and decode steps of one or two rows from int4 planes of the same
        weights: int4mm.py); int8 (int8 weights per channel,
        activations quantized per row on the fly, int8 matmul); int8-weight-only (fp32
        activations). See quant.py.

        A folder whose weights were quantized ahead of time (a `slimserve optimize` variant,
        see prequant.py) loads as stored and `weights` is ignored; `int4_compute` overrides
        how its int4 layers multiply (int8 or unpack)."""
        from transformers import AutoConfig, AutoTokenizer

        path = _check_folder(Path(folder))
        config = AutoConfig.from_pretrained(path, **_SAFE_LOAD)
        tokenizer = AutoTokenizer.from_pretrained(path, **_SAFE_LOAD)
        model = _build(config, path, weights, int4_compute)
        return cls(path, tokenizer, _eos_ids(config, tokenizer), model)

    def memory_bytes(self) -> int:
        return self.model.nbytes()


def _check_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"{folder}: no config.json; give a transformers model folder "
            "(model.save_pretrained(dir, safe_serialization=True) and tokenizer.save_pretrained)"
        )
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for pattern in _PICKLE for p in folder.glob(pattern)]
        if pickles:
            raise UnsafeArtifact(
                f"{folder}: {pickles[0]} is a pickle file, which can run code when loaded; "
                "convert it: model.save_pretrained(dir, safe_serialization=True)"
            )
        raise ModelLoadError(f"{folder}: no *.safetensors weights")
    return folder


def _build(config: Any, path: Path, weights: str, int4_compute: str | None) -> LlamaModel:
    from slimserve.runtimes.llm.prequant import build_quantized, read_format

    meta = read_format(path)
    if meta is not None:
        return build_quantized(config, _read_weights(path), meta, int4_compute)
    return build_model(config, _read_weights(path), linear_maker(weights), compute_dtype(weights))


def _read_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def linear_maker(weights: str) -> MakeLinear:
    if weights == "auto":  # chosen from the CPU's features (model.auto_weights)
        return linear_maker(auto_weights())
    if weights == "bf16+int4":
        from slimserve.runtimes.llm.int4mm import dual_linear

        return dual_linear
    if weights == "fp32":
        return FloatLinear
    if weights == "bf16":  # bf16 matmuls and KV where the CPU has avx512_bf16 (model.py)
        return bf16_linear
    if weights == "int8":
        from slimserve.runtimes.llm.quant import int8_linear

        return int8_linear
    if weights == "int8-weight-only":
        from slimserve.runtimes.llm.quant import weight_only_int8

        return weight_only_int8
    raise InvalidArgument(f"weights={weights!r} is not one of {', '.join(WEIGHTS)}")


def _eos_ids(config: Any, tokenizer: Any) -> tuple[int, ...]:
    """End-of-sequence ids: the config's (an int or a list) and the tokenizer's."""
    found = getattr(config, "eos_token_id", None)
    ids = set(found if isinstance(found, list) else [found])
    ids.add(getattr(tokenizer, "eos_token_id", None))
    return tuple(sorted(i for i in ids if isinstance(i, int)))


__all__ = ["Linear", "TextGenerationRuntime"]
