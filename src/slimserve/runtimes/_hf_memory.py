"""Build a transformers model and tokenizer from a folder's files read in memory.

Used for folders encrypted with `slimserve repo encrypt`: `from_pretrained` reads files by
path, and decrypted bytes must never reach the disk, so each file goes through
`read_artifact` (decrypted in memory; a clear file is read as is) and the parts are built
from bytes: the config from config.json, the fast tokenizer from tokenizer.json (+
tokenizer_config.json, special_tokens_map.json), the model from its config
(`trust_remote_code=False`) with the safetensors weights loaded into it.
Limits: a fast tokenizer (tokenizer.json) is required; weights load in float32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from slimserve.errors import ModelLoadError
from slimserve.security.crypto import SUFFIX, artifact_exists, read_artifact

# tokenizer_config.json entries that are not constructor arguments of a tokenizer class.
_NOT_KWARGS = frozenset(
    {"tokenizer_class", "name_or_path", "auto_map", "added_tokens_decoder", "tokenizer_file"}
)


def load_in_memory(folder: Path, task: str | None, key: bytes | None) -> tuple[Any, nn.Module]:
    """(tokenizer, model in eval mode) from `folder`, reading every file through memory."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    config = _config(folder, key)
    tokenizer = _tokenizer(folder, key)
    auto = AutoModel if task == "embedding" else AutoModelForSequenceClassification
    # Built with random weights, which load_state_dict replaces below.
    model = auto.from_config(config, trust_remote_code=False)  # type: ignore[no-untyped-call]
    _load_state(model, _weights(folder, key), folder)
    return tokenizer, model.eval()


def _json(folder: Path, name: str, key: bytes | None) -> dict[str, Any] | None:
    path = folder / name
    if not artifact_exists(path):
        return None
    try:
        data = json.loads(read_artifact(path, key, folder))
    except ValueError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _config(folder: Path, key: bytes | None) -> Any:
    from transformers import CONFIG_MAPPING

    data = _json(folder, "config.json", key)
    if data is None:
        raise ModelLoadError(f"{folder}: no config.json; fix: save the model with save_pretrained")
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ModelLoadError(
            f"{folder}/config.json: model_type {model_type!r} is not one transformers knows "
            "(models that need their own code are refused: trust_remote_code is off)"
        )
    return CONFIG_MAPPING[model_type].from_dict(data)


def _tokenizer(folder: Path, key: bytes | None) -> Any:
    from tokenizers import AddedToken, Tokenizer

    path = folder / "tokenizer.json"
    if not artifact_exists(path):
        raise ModelLoadError(
            f"{folder}: an encrypted model needs a fast tokenizer (tokenizer.json); fix: "
            "save it with AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
        )
    backend = Tokenizer.from_str(read_artifact(path, key, folder).decode("utf-8"))
    settings = {
        **(_json(folder, "tokenizer_config.json", key) or {}),
        **(_json(folder, "special_tokens_map.json", key) or {}),
    }
    kwargs = {
        k: AddedToken(**v) if isinstance(v, dict) and "content" in v else v
        for k, v in settings.items()
        if k not in _NOT_KWARGS
    }
    return _tokenizer_class(settings.get("tokenizer_class"))(tokenizer_object=backend, **kwargs)


def _tokenizer_class(name: str | None) -> Any:
    """The fast tokenizer class named in tokenizer_config.json, else the generic fast one."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    if name:
        base = name.removesuffix("Fast")
        for candidate in (base + "Fast", base):
            cls = tokenizer_class_from_name(candidate)
            if cls is not None:
                return cls
    return PreTrainedTokenizerFast


def _weights(folder: Path, key: bytes | None) -> dict[str, Any]:
    """Every *.safetensors file (clear or encrypted; shards merged) as one state dict."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    names = {p.name.removesuffix(SUFFIX) for p in folder.iterdir() if p.is_file()}
    state: dict[str, Any] = {}
    for name in sorted(n for n in names if n.endswith(".safetensors")):
        try:
            state.update(load(read_artifact(folder / name, key, folder)))
        except SafetensorError as exc:
            raise ModelLoadError(
                f"{folder / name}: not a readable safetensors file: {exc}"
            ) from None
    return state


def _load_state(model: nn.Module, state: dict[str, Any], folder: Path) -> None:
    """Load weights saved from the same architecture, or from its base model / a head model.

    from_pretrained adds or strips the base model's prefix ('bert.') the same way.
    """
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") + "."
    if prefix != "." and not expected & set(state):
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
        else:
            state = {prefix + k: v for k, v in state.items()}
    missing = model.load_state_dict(state, strict=False).missing_keys
    if missing:
        raise ModelLoadError(
            f"{folder}: the weights lack {len(missing)} tensors the model needs "
            f"(e.g. {missing[:3]}); fix: save the model with save_pretrained"
        )
