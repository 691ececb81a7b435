"""MANIFEST.json: the sha256 of every file of a version (or variant), checked at load."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from slimserve.errors import ModelLoadError

MANIFEST = "MANIFEST.json"
_CHUNK = 1 << 20  # 1 MiB reads keep memory flat for multi-GB weights


def _files(root: Path) -> list[Path]:
    """Files under root, excluding the manifest itself and nested variants (own manifests)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d != "variants"]
        dirnames.sort()
        for name in sorted(filenames):
            if rel_dir == Path(".") and name == MANIFEST:
                continue
            out.append(Path(dirpath) / name)
    return out


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """{relative posix path: sha256 hex} for every file the manifest covers."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in _files(root)}


def write_manifest(root: Path) -> Path:
    """Hash every file under root and write root/MANIFEST.json (atomically)."""
    data = {"algorithm": "sha256", "files": hash_tree(root)}
    target = root / MANIFEST
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target


def verify_manifest(root: Path) -> bool:
    """Check root against its MANIFEST.json.

    Returns True when a manifest exists and matches, False when there is none (a hand-made
    version; the caller logs that it was hashed). Raises ModelLoadError naming the first file
    that is missing, extra or changed.
    """
    path = root / MANIFEST
    if not path.exists():
        return False
    try:
        expected = json.loads(path.read_text())["files"]
        if not isinstance(expected, dict):  # e.g. "files": [] would fail below, unexplained
            raise TypeError("files is not a mapping")
    except (ValueError, KeyError, TypeError):
        raise ModelLoadError(
            f"{path}: not a valid manifest; fix: delete it and run `slimserve repo manifest`"
        ) from None
    actual = hash_tree(root)
    for name, digest in sorted(expected.items()):
        if name not in actual:
            raise ModelLoadError(f"{root / name}: listed in {MANIFEST} but missing")
        if actual[name] != digest:
            raise ModelLoadError(
                f"{root / name}: sha256 does not match {MANIFEST} (file changed or corrupted); "
                "restore it, or run `slimserve repo manifest` if the change is intended"
            )
    extra = sorted(set(actual) - set(expected))
    if extra:
        raise ModelLoadError(
            f"{root / extra[0]}: not listed in {MANIFEST}; remove it, or run "
            "`slimserve repo manifest` if it belongs to the model"
        )
    return True
