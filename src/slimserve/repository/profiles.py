"""Writing measured profiles back where the server reads them.

A variant's profile is the `profile:` section of its variant.yaml; an original version's is
the `profile:` section of VERSION/profile.yaml. Both files are covered by their folder's
MANIFEST.json, so an update checks the manifest first (a tampered folder is not blessed) and
writes it again after.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from slimserve.repository.manifest import MANIFEST, verify_manifest, write_manifest
from slimserve.repository.store import PROFILE_YAML, VARIANT_YAML, Repository


def profile_path(repo: Repository, name: str, version: int, variant: str | None) -> Path:
    """The file holding the profile of a unit (it may not exist yet for an original)."""
    if variant is None:
        return repo.version_dir(name, version) / PROFILE_YAML
    return repo.variant_dir(name, version, variant) / VARIANT_YAML


def update_profile(
    repo: Repository, name: str, version: int, variant: str | None, fields: dict[str, Any]
) -> Path:
    """Merge `fields` into the unit's profile (other keys kept) and refresh its manifest."""
    path = profile_path(repo, name, version, variant)
    folder = path.parent
    had_manifest = (folder / MANIFEST).exists()
    if had_manifest:
        verify_manifest(folder)  # raises naming the file that differs
    doc: dict[str, Any] = {}
    if path.exists():
        loaded = yaml.safe_load(path.read_text())
        doc = loaded if isinstance(loaded, dict) else {}
    profile = doc.get("profile")
    doc["profile"] = {**(profile if isinstance(profile, dict) else {}), **fields}
    tmp = folder / f".{path.name}.tmp"
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)
    if had_manifest:
        write_manifest(folder)
    return path
