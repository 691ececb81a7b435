"""The repository folder: names, versions, variants, targets, and paths that stay inside."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.errors import InvalidArgument, NotFound, UnsafeArtifact
from slimserve.repository.store import (
    Repository,
    check_name,
    refuse_pickles,
    split_served_name,
)

YAML = """\
backend: onnx
inputs:  [{name: input,  datatype: FP32, shape: [-1, 4]}]
outputs: [{name: logits, datatype: FP32, shape: [-1, 3]}]
"""


def _model(root: Path, name: str, versions: tuple[str, ...] = ("1",)) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.yaml").write_text(YAML)
    for v in versions:
        (folder / v).mkdir()
        (folder / v / "model.onnx").write_bytes(b"onnx")
    return folder


@pytest.mark.parametrize(
    "name",
    [
        "..",
        ".",
        "../etc",
        "a/b",
        "a\\b",
        "",
        ".hidden",
        "-flag",
        "a..b",
        "x" * 129,
        "m:v",
        "sp ace",
        "nul\x00",
        "é",
        "mlp\n",
        "mlp\r",
    ],
)
def test_hostile_names_are_refused(name):
    with pytest.raises(InvalidArgument, match="invalid model name"):
        check_name(name)


@pytest.mark.parametrize("name", ["mlp", "fashion-mlp", "bert_base.v2", "A1", "x" * 128])
def test_plain_names_pass(name):
    assert check_name(name) == name


def test_a_name_that_is_not_text_gets_the_same_message():
    with pytest.raises(InvalidArgument, match=r"invalid model name '12.5'"):
        check_name(12.5)  # type: ignore[arg-type]  # e.g. an unquoted YAML value


def test_served_names_split_into_model_and_variant():
    assert split_served_name("mlp") == ("mlp", None)
    assert split_served_name("mlp:int8") == ("mlp", "int8")
    with pytest.raises(InvalidArgument, match="invalid variant name"):
        split_served_name("mlp:../x")
    with pytest.raises(InvalidArgument, match="invalid model name"):
        split_served_name("../x:int8")


def test_models_versions_and_variants_are_listed(tmp_path):
    _model(tmp_path, "b", ("1", "10", "2", "0", "draft", ".importing-3-abc", "01", "\u0663"))
    _model(tmp_path, "a")
    (tmp_path / "not-a-model").mkdir()  # no model.yaml
    _model(tmp_path, "a..b")  # a folder whose name check_name refuses is not a model
    (tmp_path / "b" / "10" / "variants" / "int8").mkdir(parents=True)
    (tmp_path / "b" / "10" / "variants" / "pruned").mkdir()
    (tmp_path / "b" / "10" / "variants" / "notes.txt").write_text("not a variant")
    repo = Repository(tmp_path)

    assert repo.model_names() == ["a", "b"]
    # numeric order; 0, "01", Unicode digits and non-numbers ignored
    assert repo.versions("b") == [1, 2, 10]
    for v in repo.versions("b"):
        assert repo.version_dir("b", v).name == str(v)
    assert repo.variants("b", 10) == ["int8", "pruned"]
    assert repo.variants("b", 1) == []


def test_missing_things_are_not_found(tmp_path):
    _model(tmp_path, "a")
    repo = Repository(tmp_path)
    with pytest.raises(NotFound, match="model 'nope' is not in the repository"):
        repo.config("nope")
    with pytest.raises(NotFound, match="no version 5"):
        repo.version_dir("a", 5)
    with pytest.raises(NotFound, match="no variant 'int8'"):
        repo.variant_dir("a", 1, "int8")
    assert Repository(tmp_path / "missing").model_names() == []


def test_targets_carry_config_and_variant_info(tmp_path):
    folder = _model(tmp_path, "a")
    variant = folder / "1" / "variants" / "int8"
    variant.mkdir(parents=True)
    (variant / "variant.yaml").write_text("backend: torch\nrecipe: int8\n")
    repo = Repository(tmp_path)

    plain = repo.target("a", 1)
    assert plain.path == (folder / "1").resolve() and plain.key == "a/1"
    assert plain.backend == "onnx" and plain.info is None
    cheap = repo.target("a", 1, "int8")
    assert cheap.key == "a/1:int8" and cheap.path == variant.resolve()
    assert cheap.backend == "torch"  # the variant's own backend wins


def test_a_model_symlink_escaping_the_root_is_refused(tmp_path):
    outside = _model(tmp_path / "outside", "secret")
    root = tmp_path / "repo"
    root.mkdir()
    (root / "secret").symlink_to(outside)
    with pytest.raises(UnsafeArtifact, match="resolves outside the repository"):
        Repository(root).model_dir("secret")


def test_a_version_symlink_escaping_the_root_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = _model(tmp_path / "repo", "a", ())
    (folder / "1").symlink_to(elsewhere)
    with pytest.raises(UnsafeArtifact, match="resolves outside"):
        Repository(tmp_path / "repo").version_dir("a", 1)


def test_a_variant_symlink_escaping_the_root_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = _model(tmp_path / "repo", "a")
    (folder / "1" / "variants").mkdir()
    (folder / "1" / "variants" / "int8").symlink_to(elsewhere)
    with pytest.raises(UnsafeArtifact, match="resolves outside"):
        Repository(tmp_path / "repo").variant_dir("a", 1, "int8")


def test_a_symlink_inside_the_root_is_allowed(tmp_path):
    folder = _model(tmp_path, "a", ("1",))
    (folder / "2").symlink_to(folder / "1")
    assert Repository(tmp_path).version_dir("a", 2) == (folder / "1").resolve()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.PT", "w.pth", "x.pkl", "c.ckpt"])
def test_pickle_files_are_refused_with_a_conversion_hint(tmp_path, name):
    (tmp_path / "deep").mkdir()
    (tmp_path / "deep" / name).write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeArtifact, match=r"pickle files can run arbitrary code.*save_file"):
        refuse_pickles(tmp_path)


def test_a_clean_folder_passes(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"{}")
    refuse_pickles(tmp_path)
