"""MANIFEST.json: written, verified, and any tampering refused with the file named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from slimserve.errors import ModelLoadError
from slimserve.repository.manifest import MANIFEST, hash_tree, verify_manifest, write_manifest


@pytest.fixture
def version(tmp_path: Path) -> Path:
    folder = tmp_path / "m" / "1"
    (folder / "sub").mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"weights" * 1000)
    (folder / "sub" / "config.json").write_text("{}")
    return folder


def test_written_manifest_lists_every_file_with_its_sha256(version):
    path = write_manifest(version)
    data = json.loads(path.read_text())
    assert path == version / MANIFEST
    assert data["algorithm"] == "sha256"
    assert data["files"] == {
        "model.onnx": hashlib.sha256(b"weights" * 1000).hexdigest(),
        "sub/config.json": hashlib.sha256(b"{}").hexdigest(),
    }
    assert not list(version.glob(".*.tmp"))  # the atomic write left no temp file
    assert verify_manifest(version) is True


def test_no_manifest_means_false(version):
    assert verify_manifest(version) is False


def test_a_changed_file_is_refused_naming_it(version):
    write_manifest(version)
    (version / "sub" / "config.json").write_text('{"changed": true}')
    with pytest.raises(ModelLoadError) as exc:
        verify_manifest(version)
    assert str(version / "sub" / "config.json") in exc.value.message
    assert "does not match" in exc.value.message and "slimserve repo manifest" in exc.value.message


def test_a_missing_file_is_refused_naming_it(version):
    write_manifest(version)
    (version / "model.onnx").unlink()
    with pytest.raises(ModelLoadError, match=r"model\.onnx: listed in MANIFEST.json but missing"):
        verify_manifest(version)


def test_an_extra_file_is_refused_naming_it(version):
    write_manifest(version)
    (version / "evil.py").write_text("import os")
    with pytest.raises(ModelLoadError, match=r"evil\.py: not listed in MANIFEST.json"):
        verify_manifest(version)


@pytest.mark.parametrize(
    "text", ["not json", "[]", '{"files": []}', '{"files": {"a": 1}}', '{"algorithm": "sha256"}']
)
def test_a_broken_manifest_is_refused_with_a_fix(version, text):
    (version / MANIFEST).write_text(text)
    with pytest.raises(ModelLoadError) as exc:
        verify_manifest(version)
    assert str(version / MANIFEST) in exc.value.message or "MANIFEST.json" in exc.value.message


def test_variants_have_their_own_manifests(version):
    variant = version / "variants" / "int8"
    variant.mkdir(parents=True)
    (variant / "model.onnx").write_bytes(b"small")
    write_manifest(version)
    write_manifest(variant)
    assert set(hash_tree(version)) == {"model.onnx", "sub/config.json"}
    assert set(hash_tree(variant)) == {"model.onnx"}
    # a change inside the variant does not touch the version's manifest, only the variant's
    (variant / "model.onnx").write_bytes(b"changed")
    assert verify_manifest(version) is True
    with pytest.raises(ModelLoadError, match="int8"):
        verify_manifest(variant)


def test_only_the_top_level_variants_folder_is_skipped(version):
    nested = version / "sub" / "variants"
    nested.mkdir()
    (nested / "data.txt").write_text("part of the model")
    assert "sub/variants/data.txt" in hash_tree(version)
