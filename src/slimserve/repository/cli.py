"""`slimserve repo add | list | manifest`: manage a model repository from the command line.

Importing this module loads no framework; `repo add` imports what the artifact needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimserve.cli_parts import command
from slimserve.config import Settings
from slimserve.errors import InvalidArgument, SlimserveError
from slimserve.fields import pick
from slimserve.repository.importer import add_model  # onnx/torch load when it runs
from slimserve.repository.manifest import MANIFEST, verify_manifest, write_manifest
from slimserve.repository.store import VARIANTS_DIR, Repository

# The CLI takes its default from Settings, so the default is written in one place.
DEFAULT_REPOSITORY = Settings.model_fields["repository"].default


def register(subparsers: Any) -> None:
    """Add `repo` and its sub-commands to the top-level parser."""
    about = """Import models into a repository, list it, refresh manifests.
    Manage a model repository folder (see README, 'The model repository')."""
    repo = command(subparsers, "repo", None, about)
    sub = repo.add_subparsers(dest="repo_command", metavar="SUBCOMMAND", required=True)
    _register_add(sub)
    _register_list(sub)
    _register_manifest(sub)  # security/cli.py adds `encrypt` and `decrypt`


def repository_option(parser: argparse.ArgumentParser) -> None:
    """`--repository DIR` (`-r`), defaulting to Settings' repository: every command's."""
    parser.add_argument(
        "--repository",
        "-r",
        type=Path,
        default=DEFAULT_REPOSITORY,
        metavar="DIR",
        help=f"Model repository folder (default: {DEFAULT_REPOSITORY}).",
    )


def _register_add(sub: Any) -> None:
    about = """Import an artifact as a new model version and write its model.yaml.
    Import an .onnx file, a .safetensors file with --model-class, or a transformers folder as
    NAME's next version; model.yaml is written from what the artifact declares (names,
    datatypes, shapes)."""
    p = command(sub, "add", _add, about)
    p.add_argument("name", metavar="NAME", help="Model name: letters, digits, '_', '-', '.'.")
    p.add_argument(
        "path",
        type=Path,
        metavar="PATH",
        help="The artifact: model.onnx, model.safetensors, or a transformers folder.",
    )
    repository_option(p)
    p.add_argument(
        "--model-class",
        metavar="PKG.MOD:CLASS",
        help="safetensors only: the torch.nn.Module class, e.g. slimserve.zoo:MLP.",
    )
    p.add_argument(
        "--model-args",
        type=_json_object,
        metavar="JSON",
        default=None,
        help="safetensors only: constructor arguments as a JSON object, "
        "e.g. '{\"sizes\": [784, 256, 10]}'.",
    )
    p.add_argument(
        "--input-shape",
        type=_shape,
        metavar="D1,D2,...",
        help="safetensors only: one example's input shape without the batch "
        "size, e.g. 1,28,28 (default: read from the first Linear layer).",
    )
    p.add_argument(
        "--task",
        choices=["embedding", "sequence-classification", "text-generation"],
        help="transformers only: what to compute (default: from config.json).",
    )
    p.add_argument(
        "--max-batch-size",
        type=int,
        metavar="N",
        help="Largest dynamic batch (default 32 when the model can batch; 0 turns batching off).",
    )
    p.add_argument(
        "--version",
        type=int,
        metavar="V",
        help="Version number to create (default: the next free one).",
    )


def _register_list(sub: Any) -> None:
    p = command(sub, "list", _list, "Show models, versions, variants, sizes and manifests.")
    repository_option(p)
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="Do not hash files against MANIFEST.json (faster for large models).",
    )


def _register_manifest(sub: Any) -> None:
    about = """Rewrite MANIFEST.json after a deliberate edit of a version's files.
    Hash the files of a version (and of its variants) and rewrite their MANIFEST.json,
    accepting their current contents."""
    p = command(sub, "manifest", _manifest, about)
    p.add_argument("name", metavar="NAME", help="Model name.")
    repository_option(p)
    unit_version_option(p)


def unit_version_option(parser: argparse.ArgumentParser) -> None:
    """`--version V`: a command that works on one version and its variants, or on all."""
    parser.add_argument(
        "--version",
        type=int,
        metavar="V",
        help="Only this version and its variants (default: every version).",
    )


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('give a JSON object, e.g. {"sizes": [784, 10]}')
    return value


def _shape(text: str) -> list[int]:
    try:
        dims = [int(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "give integers separated by commas, e.g. 1,28,28"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError("give positive sizes, e.g. 784 or 1,28,28")
    return dims


# --------------------------------------------------------------------------- handlers


def _add(args: argparse.Namespace) -> int:
    named = pick(args, "model_class model_args task input_shape max_batch_size version")
    path = add_model(args.repository, args.name, args.path, report=_note, **named)
    print(f"added {args.name} version {path.name} at {path}")
    print((path.parent / "model.yaml").read_text(), end="")
    return 0


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def _list(args: argparse.Namespace) -> int:
    repo = _open(args.repository)
    rows: list[tuple[str, ...]] = [("MODEL", "VERSION", "VARIANT", "BACKEND", "SIZE", "MANIFEST")]
    for name in repo.model_names():
        rows.extend(_model_rows(repo, name, verify=not args.no_verify))
    if len(rows) == 1:
        print(f"no models in {repo.root}; add one with `slimserve repo add NAME PATH`")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _open(root: Path) -> Repository:
    if not root.is_dir():
        raise InvalidArgument(f"--repository {root}: no such folder")
    return Repository(root)


def _model_rows(repo: Repository, name: str, *, verify: bool) -> Iterator[tuple[str, ...]]:
    try:
        backend = repo.config(name).backend
    except SlimserveError as exc:  # a broken model.yaml must not hide the other models
        yield (name, "-", "-", "?", "-", f"model.yaml invalid: {_first_line(exc.message)}")
        return
    versions = repo.versions(name)
    if not versions:
        yield (name, "-", "-", backend, "-", "no versions")
    for version in versions:
        try:
            yield from _version_rows(repo, name, version, backend, verify)
        except SlimserveError as exc:  # e.g. a link out of the repository: say so, go on
            yield (name, str(version), "-", backend, "-", f"refused: {_first_line(exc.message)}")


def _version_rows(
    repo: Repository, name: str, version: int, backend: str, verify: bool
) -> Iterator[tuple[str, ...]]:
    folder = repo.version_dir(name, version)
    yield (name, str(version), "-", backend, _size(folder), _manifest_status(folder, verify))
    for variant in repo.variants(name, version):
        target = repo.target(name, version, variant)
        yield (
            name,
            str(version),
            variant,
            target.backend,
            _size(target.path),
            _manifest_status(target.path, verify),
        )


def _first_line(text: str) -> str:
    return text.splitlines()[0] if text else ""


def _size(folder: Path) -> str:
    """Bytes on disk of the folder, not counting its variants (listed on their own rows)."""
    total = 0
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if rel.parts[0] != VARIANTS_DIR and path.is_file():
            total += path.stat().st_size
    return _human(total)


def _human(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    scaled, unit = float(size), "B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):  # noqa: B007  (the unit that fits is kept)
        scaled /= 1024
        if scaled < 1024:
            break
    return f"{scaled:.1f} {unit}"


def _manifest_status(folder: Path, verify: bool) -> str:
    if not verify:
        return "present" if (folder / MANIFEST).is_file() else "none"
    try:
        return "ok" if verify_manifest(folder) else "none (hashed at first load)"
    except SlimserveError as exc:
        return f"MISMATCH: {exc.message.split(':')[0]}"


def _manifest(args: argparse.Namespace) -> int:
    repo = _open(args.repository)
    versions = [args.version] if args.version is not None else repo.versions(args.name)
    for folder in _manifest_folders(repo, args.name, versions):
        path = write_manifest(folder)
        print(f"wrote {path}")
    return 0


def _manifest_folders(repo: Repository, name: str, versions: list[int]) -> Iterator[Path]:
    for version in versions:
        yield repo.version_dir(name, version)
        for variant in repo.variants(name, version):
            yield repo.variant_dir(name, version, variant)
