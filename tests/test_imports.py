"""Importing slimserve loads no framework and starts nothing."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "onnxruntime", "transformers", "tritonclient")


def _loaded_after(statement: str) -> set[str]:
    code = f"{statement}\nimport sys\nprint(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_slimserve_loads_no_framework():
    loaded = _loaded_after("import slimserve")
    assert not {m for m in HEAVY if m in loaded}


def test_cli_parser_loads_no_framework():
    loaded = _loaded_after("from slimserve.cli import build_parser; build_parser()")
    assert not {m for m in HEAVY if m in loaded}


def _slimserve_imports(path) -> set[str]:
    """Every slimserve module a source file imports (at any depth of the file)."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("slimserve.")}


def test_imports_run_one_way():
    # DESIGN.md: cli -> app -> transport -> serving -> {runtimes, policies} -> {types, errors,
    # config}; optimize and train never import serving or transport.
    from pathlib import Path

    import slimserve

    root = Path(slimserve.__file__).parent
    forbidden = {
        "runtimes": ("slimserve.serving", "slimserve.transport", "slimserve.app"),
        "policies": ("slimserve.serving", "slimserve.transport", "slimserve.runtimes"),
        "optimize": ("slimserve.serving", "slimserve.transport", "slimserve.app"),
        "train": ("slimserve.serving", "slimserve.transport", "slimserve.app"),
        "serving": ("slimserve.transport", "slimserve.app"),
    }
    wrong = [
        f"{path.relative_to(root)} imports {module}"
        for package, banned in forbidden.items()
        for path in sorted((root / package).rglob("*.py"))
        for module in sorted(_slimserve_imports(path))
        if module.startswith(banned)
    ]
    assert not wrong, wrong
