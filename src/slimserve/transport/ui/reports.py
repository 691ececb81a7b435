"""Optimize reports as the console shows them: NAME/reports/VERSION/report.json and its plot,
written by `slimserve optimize` inside the model's folder of the repository."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimserve.errors import NotFound
from slimserve.repository.store import Repository

_MAX_REPORT_BYTES = 4 << 20  # report.json files are a few KiB; refuse anything odd


def list_reports(repository: Repository, allowed: Callable[[str], bool]) -> list[dict[str, Any]]:
    """Every readable report.json of the models `allowed(name)` lets through, newest version
    first per model; a report that cannot be read is listed with the reason."""
    found = []
    for name in repository.model_names():
        if not allowed(name):
            continue
        for folder in _version_folders(repository, name):
            found.append(_read(name, folder))
    return found


def plot_bytes(repository: Repository, name: str, version: str) -> bytes:
    """report.png of one report; NotFound when there is none."""
    if not version.isdigit() or not repository.has_model(name):
        raise NotFound(f"no report for model '{name[:64]}' version '{version[:16]}'")
    path = repository.model_dir(name) / "reports" / version / "report.png"
    try:
        return path.read_bytes()
    except OSError:
        raise NotFound(
            f"model '{name}' has no report plot for version {version}; run "
            f"`slimserve optimize {name}` to make one"
        ) from None


def _version_folders(repository: Repository, name: str) -> list[Path]:
    root = repository.model_dir(name) / "reports"
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.isdigit()]
    return sorted(folders, key=lambda p: int(p.name), reverse=True)


def _read(name: str, folder: Path) -> dict[str, Any]:
    report: dict[str, Any] = {
        "model": name,
        "version": folder.name,
        "plot": (folder / "report.png").is_file(),
    }
    path = folder / "report.json"
    try:
        if path.stat().st_size > _MAX_REPORT_BYTES:
            raise ValueError(f"over {_MAX_REPORT_BYTES} bytes")
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        report["error"] = f"report.json could not be read: {type(exc).__name__}"
        return report
    if isinstance(doc, dict):
        for key in ("original", "variants", "earlier_variants"):
            report[key] = doc.get(key)
    return report
