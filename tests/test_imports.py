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
