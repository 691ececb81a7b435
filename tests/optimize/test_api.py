"""The public API of slimserve.optimize: lazy, torch-free at import, verbs stay verbs."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_loads_no_torch():
    assert _run("import sys, slimserve.optimize; print('torch' in sys.modules)") == "False"


def test_every_name_resolves_and_verbs_stay_functions_after_their_modules_load():
    code = (
        "import types\n"
        "import slimserve.optimize as o\n"
        "import slimserve.optimize.evaluation, slimserve.optimize.distillation\n"
        "from slimserve.optimize import evaluate, distill, quantize_\n"
        "names = [getattr(o, n) for n in o.__all__]\n"
        "print(isinstance(evaluate, types.FunctionType),"
        " isinstance(distill, types.FunctionType), len(names))"
    )
    first, second, count = _run(code).split()
    assert first == "True" and second == "True" and int(count) > 30
