"""Confinement: hostile names, relative paths and symlinks never lead out of the repository."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from slimserve.errors import InvalidArgument, NotFound, UnsafeArtifact
from slimserve.repository.schema import ModelConfig
from slimserve.repository.store import Repository, split_served_name
from slimserve.runtimes import create_runtime
from slimserve.security.paths import (
    check_model_name,
    check_relative,
    confine,
    confine_tree,
    safe_join,
)
from slimserve.testing import write_model

CONFIG = ModelConfig.model_validate(
    {
        "backend": "onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    }
)

HOSTILE_NAMES = [
    "..",
    "../etc",
    "a/../../b",
    "/etc/passwd",
    "a/b",
    "a\\b",
    "a\x00b",
    ".hidden",
    "",
    " ",
    "a" * 129,
    "C:evil",
    "a..b",
    "m\n",
    "ü",
]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    write_model(root, "good", CONFIG, files={"model.onnx": b"x"})
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "model.yaml").write_text("backend: onnx\n")
    (tmp_path / "secret" / "1").mkdir()
    return root


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_names_refused(root: Path, name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid model name"):
        check_model_name(name)
    with pytest.raises(InvalidArgument):
        Repository(root).model_dir(name)
    with pytest.raises(InvalidArgument):
        split_served_name(f"good:{name}")


def test_plain_names_accepted(root: Path) -> None:
    assert check_model_name("mnist-mlp_v2.1") == "mnist-mlp_v2.1"
    assert Repository(root).model_dir("good") == (root / "good").resolve()


def test_symlinked_model_escape_refused(root: Path) -> None:
    (root / "evil").symlink_to(root.parent / "secret", target_is_directory=True)
    repo = Repository(root)
    with pytest.raises(UnsafeArtifact, match="resolves outside the repository"):
        repo.model_dir("evil")
    assert "evil" in repo.model_names()  # listed, but never opened


def test_symlinked_version_and_variant_escape_refused(root: Path) -> None:
    repo = Repository(root)
    (root / "good" / "2").symlink_to(root.parent / "secret" / "1", target_is_directory=True)
    with pytest.raises(UnsafeArtifact, match="resolves outside"):
        repo.version_dir("good", 2)
    variants = root / "good" / "1" / "variants"
    variants.mkdir()
    (variants / "int8").symlink_to(root.parent / "secret", target_is_directory=True)
    with pytest.raises(UnsafeArtifact, match="resolves outside"):
        repo.variant_dir("good", 1, "int8")
    with pytest.raises(NotFound):
        repo.version_dir("good", 3)


def test_symlinked_artifact_refused_at_load(root: Path, tmp_path: Path) -> None:
    """A file inside a version folder pointing out of it (model.onnx -> ~/.ssh/id_rsa)."""
    outside = tmp_path / "secret" / "stolen.onnx"
    outside.write_bytes(b"not a model")
    folder = root / "good" / "1"
    (folder / "model.onnx").unlink()
    (folder / "model.onnx").symlink_to(outside)
    runtime = create_runtime(Repository(root).target("good", 1))
    with pytest.raises(UnsafeArtifact, match="resolves outside"):
        runtime.load()


def test_confine_tree_checks_nested_and_dangling_links(tmp_path: Path) -> None:
    folder = tmp_path / "unit"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "ok").symlink_to(folder / "sub")  # inside: fine
    confine_tree(folder)
    (folder / "sub" / "dangling").symlink_to("/nonexistent/elsewhere")
    with pytest.raises(UnsafeArtifact, match="dangling"):
        confine_tree(folder)
    os.unlink(folder / "sub" / "dangling")
    (folder / "up").symlink_to("..", target_is_directory=True)
    with pytest.raises(UnsafeArtifact, match="up"):
        confine_tree(folder)
    confine_tree(folder, root=tmp_path)  # allowed when the wider root is the bound


@pytest.mark.parametrize(
    "rel", ["../x", "/etc/passwd", "a/../../x", "a\\..\\..\\x", "C:\\x", "", "a\x00b"]
)
def test_check_relative_refuses(rel: str) -> None:
    with pytest.raises(UnsafeArtifact):
        check_relative(rel)


def test_safe_join_and_confine(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert safe_join(tmp_path, "a/b.bin") == (tmp_path / "a" / "b.bin").resolve()
    assert safe_join(tmp_path, "./a/./b.bin") == (tmp_path / "a" / "b.bin").resolve()
    (tmp_path / "a" / "link").symlink_to("/")
    with pytest.raises(UnsafeArtifact, match="resolves outside"):
        safe_join(tmp_path, "a/link/etc/passwd")
    with pytest.raises(UnsafeArtifact):
        confine(tmp_path / "a", tmp_path)
