"""What every `slimserve optimize` run shares, classifiers and language models alike:

- `plan`: parse every recipe, check step order and names before any work;
- `stage_all`: make each variant in a hidden folder `VERSION/variants/.tmp-NAME-*`, and on any
  error remove them all (and the variants/ folder if this run created it);
- `commit`: rename each staged folder into place (os.rename: atomic on one file system), only
  when every recipe succeeded;
- the typed result (`Result`, `VariantRow`, `Profile`) and `plain` for YAML.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NotRequired, TypedDict, TypeVar

import numpy as np

from slimserve.errors import AlreadyExists, InvalidArgument
from slimserve.optimize.recipe import Recipe, parse_recipe
from slimserve.optimize.steps import check_order
from slimserve.repository import Repository
from slimserve.repository.store import VARIANTS_DIR


class Profile(TypedDict, total=False):
    """A measured profile (variant.yaml `profile:`); classifiers and LMs fill different keys."""

    size_bytes: int
    memory_bytes: int
    latency_ms_batch1: float
    latency_ms_best: float
    throughput_rps: float
    accuracy: float | None  # None: not measured (no labelled data)
    agreement: float  # top-1 agreement with the original on the same inputs
    data: str  # where the inputs came from: "--data", "--eval-data", or "synthetic"
    perplexity: float  # language models
    weight_bytes: int


class VariantRow(TypedDict):
    name: str
    recipe: str
    backend: str | None
    profile: dict[str, Any]
    seed: NotRequired[int]
    baseline: NotRequired[dict[str, Any]]  # the original's figures this variant came from


@dataclass
class Result:
    model: str
    version: int
    original: dict[str, Any]
    variants: list[VariantRow] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)
    # Variants of the same version made by earlier runs (read back from their variant.yaml),
    # so the report compares everything the version has.
    earlier: list[dict[str, Any]] = field(default_factory=list)


def latest_version(repo: Repository, name: str) -> int:
    versions = repo.versions(name)
    if not versions:
        raise InvalidArgument(f"model '{name}' has no version folder (1/, 2/, ...) to optimize")
    return versions[-1]


def plan(texts: Sequence[str], start: str, vdir: Path, overwrite: bool) -> list[Recipe]:
    """Every recipe parsed and checked (names, step order, existing variants)."""
    if not texts:
        raise InvalidArgument("give at least one --recipe, e.g. --recipe int8")
    recipes = [parse_recipe(t) for t in texts]
    names = [r.name for r in recipes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidArgument(
            f"two recipes make the same variant {dupes}; name them apart in "
            "a recipe file (name: ...)"
        )
    for recipe in recipes:
        check_order([(s.spec.name, s.text) for s in recipe.steps], start)
        if (vdir / VARIANTS_DIR / recipe.name).exists() and not overwrite:
            raise AlreadyExists(
                f"variant '{recipe.name}' already exists in {vdir / VARIANTS_DIR}; "
                "pass --overwrite to replace it, or name the recipe differently"
            )
    return recipes


T = TypeVar("T")


def stage_all(
    variants_dir: Path,
    items: Sequence[T],
    name_of: Callable[[T], str],
    make: Callable[[T, Path], VariantRow],
    result: Result,
) -> list[tuple[Path, str]]:
    """make(item, stage folder) for each item; on any error remove every staged folder."""
    created = not variants_dir.exists()
    staged: list[tuple[Path, str]] = []
    try:
        variants_dir.mkdir(exist_ok=True)
        for item in items:
            name = name_of(item)
            stage = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=variants_dir))
            stage.chmod(0o755)  # mkdtemp makes it private; a variant is as readable as its model
            staged.append((stage, name))
            result.variants.append(make(item, stage))
    except BaseException:
        for stage, _ in staged:
            shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(variants_dir, ignore_errors=True)
        raise
    return staged


def commit(staged: list[tuple[Path, str]], variants_dir: Path, overwrite: bool) -> None:
    """Rename every staged variant into place (replacing old ones only with overwrite)."""
    for stage, name in staged:
        final = variants_dir / name
        old = None
        if final.exists() and overwrite:
            old = variants_dir / f".old-{name}-{stage.name[-8:]}"
            final.rename(old)
        stage.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def plain(value: Any) -> Any:
    """YAML-safe plain types (numpy scalars -> Python, floats rounded to 6 significant)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value
