"""Scan slimserve's own source for loaders that run code from a file (pickle and friends).

Every call is resolved through the module's imports (`import numpy as np`, `from torch import
load`), so an alias does not hide it. Refused:
  pickle / _pickle / cPickle / dill / cloudpickle / joblib: imported at all (no use of them
      is needed; their load, loads and Unpickler are also caught through aliases)
  torch.load without weights_only=True; torch.export.load (unpickles parts of .pt2 files)
  numpy.load with allow_pickle anything but False; pandas.read_pickle
  yaml.load / full_load / unsafe_load (yaml.safe_load only)
  trust_remote_code given as anything but False (as a keyword or a dict entry)
The scanner is tested on a snippet holding each of these, so it cannot pass by finding none.
"""

from __future__ import annotations

import ast
from pathlib import Path

import slimserve

SRC = Path(slimserve.__file__).parent
PICKLE_MODULES = ("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib")
UNSAFE_CALLS = {
    "torch.export.load",
    "pandas.read_pickle",
    "yaml.load",
    "yaml.full_load",
    "yaml.unsafe_load",
    "yaml.unsafe_load_all",
    "yaml.load_all",
}


def _aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> dotted origin, from every import in the module (any nesting)."""
    names: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                names[alias.asname or alias.name.split(".")[0]] = (
                    alias.name if alias.asname else alias.name.split(".")[0]
                )
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                names[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return names


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(aliases.get(node.id, node.id))
    return ".".join(reversed(parts))


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_const(node: ast.expr | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _call_problem(call: ast.Call, aliases: dict[str, str]) -> str | None:
    name = _dotted(call.func, aliases)
    if name is None:
        return None
    root, _, leaf = name.rpartition(".")
    if root.split(".")[0] in PICKLE_MODULES and leaf in {"load", "loads", "Unpickler"}:
        return f"{name}: unpickles"
    if name == "torch.load" and not _is_const(_keyword(call, "weights_only"), True):
        return "torch.load without weights_only=True"
    allow = _keyword(call, "allow_pickle")
    if name == "numpy.load" and allow is not None and not _is_const(allow, False):
        return "numpy.load with allow_pickle"
    if name in UNSAFE_CALLS:
        return f"{name}: runs code from the file"
    value = _keyword(call, "trust_remote_code")
    if value is not None and not _is_const(value, False):
        return "trust_remote_code not False"
    return None


def _dict_problem(node: ast.Dict) -> str | None:
    for key, value in zip(node.keys, node.values, strict=True):
        if _is_const_str(key, "trust_remote_code") and not _is_const(value, False):
            return "trust_remote_code not False (dict entry)"
    return None


def _is_const_str(node: ast.expr | None, text: str) -> bool:
    return isinstance(node, ast.Constant) and node.value == text


def scan(source: str, filename: str = "<snippet>") -> list[str]:
    """'file:line: problem' for every unsafe loader in `source`."""
    tree = ast.parse(source, filename)
    aliases = _aliases(tree)
    problems = []
    for node in ast.walk(tree):
        problem = None
        if isinstance(node, ast.Call):
            problem = _call_problem(node, aliases)
        elif isinstance(node, ast.Dict):
            problem = _dict_problem(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            problem = _import_problem(node)
        if problem:
            problems.append(f"{filename}:{node.lineno}: {problem}")
    return problems


def _import_problem(node: ast.Import | ast.ImportFrom) -> str | None:
    modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    bad = [m for m in modules if m.split(".")[0] in PICKLE_MODULES]
    return f"imports {bad[0]}" if bad else None


BAD_SNIPPET = """
import pickle, dill
import numpy as np
import torch as T
import yaml
from pickle import loads as undo
from cloudpickle import load
import joblib
pickle.load(f)
undo(b)
dill.loads(b)
load(f)
joblib.load("m.joblib")
T.load("w.pt")
T.load("w.pt", weights_only=False)
np.load("a.npy", allow_pickle=True)
np.load("a.npy", allow_pickle=flag)
yaml.load(text, Loader=yaml.Loader)
T.export.load("p.pt2")
AutoModel.from_pretrained(d, trust_remote_code=True)
AutoModel.from_pretrained(d, trust_remote_code=flag)
SAFE = {"trust_remote_code": True}
pickle.Unpickler(f)
"""

GOOD_SNIPPET = """
import numpy as np
import torch
import yaml
from safetensors.torch import load
torch.load("w.pt", weights_only=True)
np.load("a.npy")
np.load("a.npy", allow_pickle=False)
yaml.safe_load(text)
load(blob)
AutoModel.from_pretrained(d, trust_remote_code=False)
SAFE = {"trust_remote_code": False}
"""


def test_scanner_finds_every_pattern() -> None:
    found = scan(BAD_SNIPPET)
    bad_lines = [i for i, line in enumerate(BAD_SNIPPET.splitlines(), 1) if line.strip()]
    flagged = {int(p.split(":")[1]) for p in found}
    expected = set(bad_lines) - {3, 4, 5}  # numpy, torch and yaml imports are fine
    assert flagged == expected, (sorted(expected - flagged), found)
    assert scan(GOOD_SNIPPET) == []


def test_slimserve_source_has_no_unsafe_loader() -> None:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 30 and SRC / "runtimes" / "torch.py" in files
    problems = [p for f in files for p in scan(f.read_text(), str(f.relative_to(SRC)))]
    assert problems == []
