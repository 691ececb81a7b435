"""The repository folder: models, integer versions, named variants, and safe paths into it.

Layout (see README):  ROOT/NAME/model.yaml, ROOT/NAME/VERSION/<artifact>,
ROOT/NAME/VERSION/variants/VARIANT/<artifact + variant.yaml>.
A served variant is addressed as `NAME:VARIANT` (or the request parameter `variant`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from slimserve.errors import InvalidArgument, NotFound, UnsafeArtifact
from slimserve.repository.schema import (
    ModelConfig,
    VariantInfo,
    VariantProfile,
    load_model_config,
    load_variant_info,
    load_version_profile,
)

MODEL_YAML = "model.yaml"
VARIANT_YAML = "variant.yaml"
PROFILE_YAML = "profile.yaml"  # an original version's measured profile (`slimserve profile`)
VARIANTS_DIR = "variants"
VARIANT_SEPARATOR = ":"

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")  # \Z: "$" accepts a final "\n"
# A version folder: a positive integer written plainly ("01" or Unicode digits would
# parse to a number whose folder, str(number), does not exist).
_VERSION = re.compile(r"^[1-9][0-9]{0,17}\Z")

# Suffixes of files that unpickle (run code) when loaded.
PICKLE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".joblib"})


def check_name(name: str, what: str = "model name") -> str:
    """Accept only plain names: letters, digits, '_', '-', '.'; no '..', at most 128 chars."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        text = str(name)  # a non-str (e.g. a YAML number) must still get this message
        shown = text if len(text) <= 64 else text[:64] + "..."
        raise InvalidArgument(
            f"invalid {what} {shown!r}: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit, without '..'"
        )
    return name


@functools.lru_cache(maxsize=4096)  # on every request: valid names are few, validate once
def split_served_name(served: str) -> tuple[str, str | None]:
    """'mlp:int8' -> ('mlp', 'int8'); 'mlp' -> ('mlp', None). Both parts validated."""
    name, sep, variant = served.partition(VARIANT_SEPARATOR)
    check_name(name)
    if sep:
        check_name(variant, "variant name")
        return name, variant
    return name, None


def refuse_pickles(folder: Path) -> None:
    """Refuse a unit's folder holding pickle artifacts, saying how to convert them.

    Variants below `variants/` are their own units and are checked when they load.
    """
    for path in sorted(_unit_files(folder)):
        if path.suffix.lower() not in PICKLE_SUFFIXES:
            continue
        if any(p.suffix == ".safetensors" for p in path.parent.iterdir()):
            fix = "safetensors weights are already beside it: delete the pickle file"
        else:
            fix = (
                "convert it: for a state dict, `safetensors.torch.save_file(torch.load(p, "
                "weights_only=True), 'model.safetensors')`; for a transformers model, "
                "`model.save_pretrained(dir, safe_serialization=True)`; or export to ONNX"
            )
        raise UnsafeArtifact(
            f"{path}: pickle files can run arbitrary code when loaded and are refused; {fix}"
        )


def _unit_files(folder: Path) -> list[Path]:
    out: list[Path] = []
    for path in folder.iterdir():
        if path.is_dir():
            if path.name != VARIANTS_DIR:
                out.extend(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            out.append(path)
    return out


@dataclass(frozen=True, slots=True)
class Target:
    """One loadable unit: a version, or a variant of it, with its folder and config."""

    model: str
    version: int
    variant: str | None
    path: Path
    config: ModelConfig
    info: VariantInfo | None = None
    # The original's profile (its profile.yaml); a variant's is `info.profile`.
    version_profile: VariantProfile | None = None

    @property
    def profile(self) -> VariantProfile | None:
        """The measured profile of this unit, variant or original; None if never measured."""
        return self.info.profile if self.info is not None else self.version_profile

    @property
    def key(self) -> str:
        v = f"{self.model}/{self.version}"
        return v if self.variant is None else f"{v}:{self.variant}"

    @property
    def backend(self) -> str:
        if self.info is not None and self.info.backend is not None:
            return self.info.backend
        return self.config.backend


class Repository:
    """Read access to a repository folder; every path it returns stays inside the root."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise UnsafeArtifact(f"{path}: resolves outside the repository {self.root}")
        return resolved

    def model_names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if (p / MODEL_YAML).is_file() and _NAME.match(p.name) and ".." not in p.name
        )

    def has_model(self, name: str) -> bool:
        """Whether `name` (a valid name) is a model folder with a model.yaml."""
        return (self.root / check_name(name) / MODEL_YAML).is_file()

    def model_dir(self, name: str) -> Path:
        check_name(name)
        path = self._inside(self.root / name)
        if not (path / MODEL_YAML).is_file():
            raise NotFound(f"model '{name}' is not in the repository {self.root}")
        return path

    def config(self, name: str) -> ModelConfig:
        return load_model_config(self.model_dir(name) / MODEL_YAML)

    def versions(self, name: str) -> list[int]:
        folder = self.model_dir(name)
        return sorted(
            int(p.name) for p in folder.iterdir() if p.is_dir() and _VERSION.match(p.name)
        )

    def version_dir(self, name: str, version: int) -> Path:
        path = self._inside(self.model_dir(name) / str(version))
        if not path.is_dir():
            raise NotFound(f"model '{name}' has no version {version}")
        return path

    def variants(self, name: str, version: int) -> list[str]:
        folder = self.version_dir(name, version) / VARIANTS_DIR
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name))

    def variant_dir(self, name: str, version: int, variant: str) -> Path:
        check_name(variant, "variant name")
        path = self._inside(self.version_dir(name, version) / VARIANTS_DIR / variant)
        if not path.is_dir():
            raise NotFound(f"model '{name}' version {version} has no variant '{variant}'")
        return path

    def target(self, name: str, version: int, variant: str | None = None) -> Target:
        config = self.config(name)
        if variant is None:
            folder = self.version_dir(name, version)
            profile = load_version_profile(folder / PROFILE_YAML)
            return Target(name, version, None, folder, config, version_profile=profile)
        path = self.variant_dir(name, version, variant)
        return Target(name, version, variant, path, config, load_variant_info(path / VARIANT_YAML))
