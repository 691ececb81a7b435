"""TransformersRuntime: embeddings and logits equal plain transformers; refusals; bad input."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slimserve.errors import InvalidArgument, ModelLoadError, UnsafeArtifact
from slimserve.repository.store import Target
from slimserve.runtimes import create_runtime
from slimserve.runtimes.transformers import TransformersRuntime

from .conftest import TOKENIZER_FILES

TEXTS = [
    "A man is eating food.",
    "slimserve serves models",
    "Ünïcode text — with dashes and emoji 🙂",
    "",
]


def as_bytes(texts: list[str]) -> np.ndarray:
    return np.array([t.encode() for t in texts], dtype=object)


def with_config(target: Target, **fields: Any) -> Target:
    """The same model folder under a changed model.yaml."""
    config = target.config.model_copy(update=fields)
    return dataclasses.replace(target, config=config)


@pytest.fixture(scope="module")
def embedder(embedding_target: Target) -> Iterator[TransformersRuntime]:
    runtime = TransformersRuntime(embedding_target)
    runtime.load()
    yield runtime
    runtime.unload()


def reference_embeddings(folder: Path, texts: list[str]) -> np.ndarray:
    """sentence-transformers' recipe with plain transformers: mean pooling, then L2 norm."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    encoded = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def test_create_runtime_picks_transformers(embedding_target: Target) -> None:
    assert isinstance(create_runtime(embedding_target), TransformersRuntime)


def test_embeddings_match_plain_transformers(
    embedder: TransformersRuntime, minilm_path: Path
) -> None:
    got = embedder.infer({"text": as_bytes(TEXTS)})["embedding"]
    want = reference_embeddings(minilm_path, TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    cosine = np.sum(got * want, axis=1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    assert cosine.min() > 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_similar_texts_embed_closer(embedder: TransformersRuntime) -> None:
    texts = ["A man is eating food.", "A man is eating a meal.", "The stock market fell."]
    e = embedder.infer({"text": as_bytes(texts)})["embedding"]
    assert e[0] @ e[1] > e[0] @ e[2] + 0.3


def test_without_normalize_same_direction(
    embedding_target: Target, embedder: TransformersRuntime
) -> None:
    raw = TransformersRuntime(with_config(embedding_target, normalize=False))
    raw.load()
    got = raw.infer({"text": as_bytes(TEXTS[:2])})["embedding"]
    unit = embedder.infer({"text": as_bytes(TEXTS[:2])})["embedding"]
    norms = np.linalg.norm(got, axis=1, keepdims=True)
    assert not np.allclose(norms, 1.0, atol=1e-3)
    np.testing.assert_allclose(got / norms, unit, atol=1e-5)


def test_long_text_is_truncated_to_max_length(embedder: TransformersRuntime) -> None:
    long = " ".join(["word"] * 5000)  # ~5000 tokens; max_length is 128
    out = embedder.infer({"text": as_bytes([long, "short"])})["embedding"]
    assert out.shape == (2, 384) and np.isfinite(out).all()


def test_str_elements_are_accepted(embedder: TransformersRuntime) -> None:
    from_str = embedder.infer({"text": np.array(TEXTS[:2], dtype=object)})["embedding"]
    from_bytes = embedder.infer({"text": as_bytes(TEXTS[:2])})["embedding"]
    np.testing.assert_array_equal(from_str, from_bytes)


def test_invalid_utf8_is_an_invalid_argument(embedder: TransformersRuntime) -> None:
    with pytest.raises(InvalidArgument, match="not valid UTF-8"):
        embedder.infer({"text": np.array([b"ok", b"\xff\xfe bad"], dtype=object)})


def test_classifier_logits_match_plain_transformers(
    classifier_target: Target, classifier_dir: Path
) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    runtime = TransformersRuntime(classifier_target)
    runtime.load()
    got = runtime.infer({"text": as_bytes(TEXTS)})["logits"]
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    encoded = tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        want = model(**encoded).logits.numpy()
    assert got.shape == (len(TEXTS), 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_max_length_is_capped_by_the_model(classifier_target: Target) -> None:
    # The tiny BERT has 128 positions; 4096 tokens would index past them.
    runtime = TransformersRuntime(with_config(classifier_target, max_length=4096))
    runtime.load()
    out = runtime.infer({"text": as_bytes([" ".join(["word"] * 1000)])})["logits"]
    assert out.shape == (1, 3) and np.isfinite(out).all()


def copy_config_and_tokenizer(source: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in ["config.json", *TOKENIZER_FILES]:
        shutil.copy(source / name, folder / name)


def test_pickle_only_weights_refused_with_hint(classifier_target: Target, tmp_path: Path) -> None:
    copy_config_and_tokenizer(classifier_target.path, tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # never unpickled
    target = dataclasses.replace(classifier_target, path=tmp_path)
    with pytest.raises(UnsafeArtifact, match=r"pytorch_model.bin: pickle.*save_pretrained"):
        TransformersRuntime(target).load()


def test_folder_without_weights(classifier_target: Target, tmp_path: Path) -> None:
    copy_config_and_tokenizer(classifier_target.path, tmp_path)
    target = dataclasses.replace(classifier_target, path=tmp_path)
    with pytest.raises(ModelLoadError, match=r"no \*.safetensors weights.*save_pretrained"):
        TransformersRuntime(target).load()


def test_missing_folder(classifier_target: Target, tmp_path: Path) -> None:
    target = dataclasses.replace(classifier_target, path=tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="does not exist"):
        TransformersRuntime(target).load()


def test_declared_width_must_match_the_model(embedding_target: Target) -> None:
    outputs = [{"name": "embedding", "datatype": "FP32", "shape": [-1, 768]}]
    target = with_config(embedding_target, outputs=[_tensor(o) for o in outputs])
    with pytest.raises(ModelLoadError, match=r"width 768 but the model's hidden size is 384"):
        TransformersRuntime(target).load()


def test_input_must_be_bytes(classifier_target: Target) -> None:
    inputs = [{"name": "ids", "datatype": "INT64", "shape": [-1, 16]}]
    target = with_config(classifier_target, inputs=[_tensor(i) for i in inputs])
    with pytest.raises(ModelLoadError, match="datatype: BYTES"):
        TransformersRuntime(target).load()


def _tensor(data: dict[str, Any]) -> Any:
    from slimserve.repository.schema import TensorConfig

    return TensorConfig.model_validate(data)
