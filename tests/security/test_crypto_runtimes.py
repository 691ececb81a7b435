"""Each runtime loads an encrypted model in memory and answers like the clear one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from slimserve.errors import ModelLoadError, UnsafeArtifact
from slimserve.repository.schema import dump_model_config
from slimserve.repository.store import Repository
from slimserve.runtimes import Runtime, RuntimeOptions, create_runtime
from slimserve.security.crypto import encrypt_unit, generate_data_key

from .conftest import SIZES, text_config

WRONG = "wrong key or the file was modified"
TEXTS = np.array([b"hello world", b"encryption at rest keeps weights private", b""], dtype=object)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _feeds(name: str) -> dict[str, np.ndarray]:
    if name.startswith("tiny-bert"):
        return {"text": TEXTS}
    rng = np.random.default_rng(0)
    return {"input": rng.standard_normal((5, SIZES[0])).astype(np.float32)}


def _answer(root: Path, name: str, key: bytes | None) -> dict[str, np.ndarray]:
    runtime: Runtime = create_runtime(
        Repository(root).target(name, 1), RuntimeOptions(data_key=key)
    )
    runtime.load()
    try:
        return runtime.infer(_feeds(name))
    finally:
        runtime.unload()


def _add_embedding_model(root: Path) -> None:
    """tiny-bert's folder again, served as an embedding model (weights of the base model)."""
    shutil.copytree(root / "tiny-bert" / "1", root / "tiny-bert-emb" / "1")
    (root / "tiny-bert-emb" / "model.yaml").write_text(
        dump_model_config(text_config("embedding", 32))
    )


@pytest.mark.parametrize("name", ["mlp-onnx", "mlp-torch", "tiny-bert", "tiny-bert-emb"])
def test_encrypted_model_answers_like_clear(repo: Path, data_key: bytes, name: str) -> None:
    if name == "tiny-bert-emb":
        _add_embedding_model(repo)
    clear = _answer(repo, name, None)
    unit = repo / name / "1"
    encrypt_unit(unit, data_key)
    before = _snapshot(unit)
    encrypted = _answer(repo, name, data_key)
    assert _snapshot(unit) == before  # nothing written beside the encrypted files
    assert all(p.endswith((".enc", "MANIFEST.json")) for p in before)
    assert clear.keys() == encrypted.keys()
    for out in clear:
        np.testing.assert_allclose(encrypted[out], clear[out], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "name, file",
    [("mlp-onnx", "model.onnx"), ("mlp-torch", "model.safetensors"), ("tiny-bert", "config.json")],
)
def test_wrong_key_tampered_or_missing_key_refused(
    repo: Path, data_key: bytes, name: str, file: str
) -> None:
    unit = repo / name / "1"
    encrypt_unit(unit, data_key)
    with pytest.raises(ModelLoadError, match=f"{file}.enc: cannot decrypt: {WRONG}"):
        _answer(repo, name, generate_data_key())
    with pytest.raises(ModelLoadError, match=f"{file}.enc: the artifact is encrypted and no data"):
        _answer(repo, name, None)
    enc = unit / f"{file}.enc"
    data = bytearray(enc.read_bytes())
    data[len(data) // 2] ^= 0x40
    enc.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match=f"{file}.enc: cannot decrypt: {WRONG}"):
        _answer(repo, name, data_key)


def _external_data_model(repo: Path) -> Path:
    """mlp-onnx re-saved with every weight in model.onnx.data beside it."""
    import onnx

    path = repo / "mlp-onnx" / "1" / "model.onnx"
    model = onnx.load(str(path))
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    return path


def test_onnx_external_data_encrypted(repo: Path, data_key: bytes) -> None:
    clear = _answer(repo, "mlp-onnx", None)
    path = _external_data_model(repo)
    assert (path.parent / "model.onnx.data").is_file()
    np.testing.assert_allclose(_answer(repo, "mlp-onnx", None)["logits"], clear["logits"])
    encrypt_unit(path.parent, data_key)
    assert not (path.parent / "model.onnx.data").exists()
    np.testing.assert_allclose(
        _answer(repo, "mlp-onnx", data_key)["logits"], clear["logits"], rtol=1e-6
    )


@pytest.mark.parametrize("encrypted", [False, True])
@pytest.mark.parametrize("location", ["../../../outside.bin", "/etc/hostname", "sub/../../x.bin"])
def test_onnx_external_data_confined(
    repo: Path, data_key: bytes, location: str, encrypted: bool
) -> None:
    import onnx

    path = _external_data_model(repo)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "location":
            entry.value = location
    onnx.save_model(model, str(path))
    (repo / "outside.bin").write_bytes(b"\0" * 4096)
    if encrypted:
        encrypt_unit(path.parent, data_key)
    with pytest.raises(UnsafeArtifact, match=r"model.onnx"):
        _answer(repo, "mlp-onnx", data_key)


@pytest.mark.parametrize("name", ["mlp-torch", "tiny-bert"])
def test_encrypted_pickle_refused(repo: Path, data_key: bytes, name: str) -> None:
    unit = repo / name / "1"
    encrypt_unit(unit, data_key)
    shutil.copy(unit / "model.safetensors.enc", unit / "pytorch_model.bin.enc")
    with pytest.raises(UnsafeArtifact, match=r"pytorch_model.bin.enc: an encrypted pickle"):
        _answer(repo, name, data_key)
