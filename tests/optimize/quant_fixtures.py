"""Tiny trained models and repositories shared by the quantize/export/evaluate/pipeline tests.

Plain cached functions (not a conftest) so that they sit beside the pruning engineer's tests
without clashing; each test copies what it changes.
"""

from __future__ import annotations

import copy
import functools
import hashlib
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import save_file

from slimserve.optimize.data import digits
from slimserve.repository import write_manifest
from slimserve.train import TrainConfig, classification_loss, fit
from slimserve.zoo import MLP

SIZES = [64, 64, 10]


@functools.lru_cache(maxsize=1)
def _trained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x, y = digits("train")
    model = MLP(SIZES)
    config = TrainConfig(epochs=12, lr=3e-3, progress=False, batch_size=64)
    fit(model, classification_loss, (torch.from_numpy(x), torch.from_numpy(y)), config)
    return {k: v.clone() for k, v in model.state_dict().items()}


def digits_mlp() -> MLP:
    """A 64-64-10 MLP trained on digits (~90% test accuracy), in eval mode; a fresh copy."""
    model = MLP(SIZES)
    model.load_state_dict(copy.deepcopy(_trained_state()))
    return model.eval()


def digits_tensors(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits(split)
    return torch.from_numpy(x), torch.from_numpy(y)


def accuracy(model: torch.nn.Module, split: str = "test") -> float:
    x, y = digits_tensors(split)
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


def make_repository(root: Path, name: str = "mlp") -> Path:
    """A repository with the digits MLP as torch model NAME version 1 (manifest written)."""
    version = root / name / "1"
    version.mkdir(parents=True)
    save_file(digits_mlp().state_dict(), str(version / "model.safetensors"))
    model_yaml = {
        "backend": "torch",
        "model_class": "slimserve.zoo:MLP",
        "model_args": {"sizes": SIZES},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    (root / name / "model.yaml").write_text(yaml.safe_dump(model_yaml))
    write_manifest(version)
    return root


def tree_digest(root: Path) -> str:
    """sha256 over every path (files and folders) and file content under root."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def outputs(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return model(x).float().numpy()
