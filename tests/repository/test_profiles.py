"""Profiles written back into variant.yaml / profile.yaml keep their folder's manifest valid,
and a tampered folder is not blessed by the update."""

from __future__ import annotations

import pytest
import yaml

from slimserve.errors import ModelLoadError
from slimserve.repository import Repository, verify_manifest, write_manifest
from slimserve.repository.profiles import update_profile


@pytest.fixture
def repo(tmp_path):
    root = tmp_path / "models"
    version = root / "m" / "1"
    variant = version / "variants" / "int8"
    variant.mkdir(parents=True)
    (root / "m" / "model.yaml").write_text("backend: onnx\n")
    (version / "model.onnx").write_bytes(b"original")
    (variant / "model.onnx").write_bytes(b"variant")
    (variant / "variant.yaml").write_text(
        yaml.safe_dump({"recipe": {"text": "int8"}, "profile": {"agreement": 0.99}})
    )
    write_manifest(version)
    write_manifest(variant)
    return Repository(root)


def test_variant_profile_is_merged_and_the_manifest_refreshed(repo):
    path = update_profile(repo, "m", 1, "int8", {"sweep": [{"concurrency": 1}], "memory_bytes": 9})
    doc = yaml.safe_load(path.read_text())
    assert doc["recipe"] == {"text": "int8"}  # the rest of variant.yaml is kept
    assert doc["profile"] == {"agreement": 0.99, "sweep": [{"concurrency": 1}], "memory_bytes": 9}
    assert verify_manifest(path.parent)
    target = repo.target("m", 1, "int8")
    assert target.profile is not None and target.profile.quality_loss() == pytest.approx(1.0)


def test_original_profile_goes_to_profile_yaml_and_the_server_reads_it(repo):
    assert repo.target("m", 1).profile is None
    update_profile(repo, "m", 1, None, {"latency_ms_by_batch": {"1": 0.5}})
    assert verify_manifest(repo.root / "m" / "1")
    profile = repo.target("m", 1).profile
    assert profile is not None and profile.model_extra["latency_ms_by_batch"] == {"1": 0.5}


def test_a_tampered_folder_is_refused_not_blessed(repo):
    (repo.root / "m" / "1" / "variants" / "int8" / "model.onnx").write_bytes(b"swapped")
    with pytest.raises(ModelLoadError, match="sha256 does not match"):
        update_profile(repo, "m", 1, "int8", {"memory_bytes": 1})
