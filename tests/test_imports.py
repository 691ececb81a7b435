"""Importing slimserve loads no framework and starts nothing; imports run one way.

The import graph is read from the source (every import, also those inside functions, which
Python runs later but which are dependencies all the same): no cycles between modules, no
import against DESIGN.md's layers, and an import inside a function only where it keeps a
heavy framework from loading before it is needed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import slimserve

HEAVY = ("torch", "onnxruntime", "transformers", "tritonclient")
ROOT = Path(slimserve.__file__).parent

# DESIGN.md: cli -> app -> transport -> serving -> {runtimes, policies} -> {types, errors,
# config}. A module imports modules of its own layer or below, never above. Packages not in
# DESIGN.md's line sit where what they import and what imports them put them.
LAYERS = {
    "slimserve": 0,  # the package root: the public names of types and errors
    "types": 0,
    "fields": 0,
    "errors": 0,
    "config": 1,
    "logs": 1,
    "cli_parts": 1,
    "repository": 2,  # the on-disk format
    "policies": 2,  # pure decisions
    "security": 3,  # keys, audit, encryption at rest (of repository files)
    "runtimes": 4,
    "zoo": 4,  # model classes the runtimes and optimize build
    "serving": 5,
    "optimize": 5,
    "train": 5,
    "transport": 6,
    "app": 7,  # the composition root
    "cluster": 8,  # replicas: each runs a server app.py builds
    "planning": 9,  # `slimserve plan`: reads the repository, decides with policies/planning
    "launch": 9,
    "cli": 9,
    "serve_cli": 9,
    "bench": 9,
    "demo": 9,
    "testing": 9,
    "__main__": 9,
}
# Same or lower layer, and still not allowed: optimize and train never import serving or
# transport (nor serving them); transports speak through serving, not to runtimes.
BANNED = {
    ("optimize", "serving"),
    ("train", "serving"),
    ("serving", "optimize"),
    ("serving", "train"),
    ("transport", "runtimes"),
}


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


# -- the import graph ------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    importer: str
    imported: str  # a slimserve module, or a third-party top-level package
    line: int
    deferred: bool  # inside a function: runs when the function does
    type_only: bool  # under `if TYPE_CHECKING:`: never runs


@cache
def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _resolve(name: str) -> str | None:
    """The slimserve module an imported name lives in (a package's __init__ for a name in
    it), or None for a third-party name."""
    if name != "slimserve" and not name.startswith("slimserve."):
        return None
    while name not in _modules():
        name = name.rpartition(".")[0]
    return name


def _marked(tree: ast.AST, kind: type | tuple[type, ...], test: str | None = None) -> set[int]:
    """ids of the import statements inside nodes of `kind` (with `test` in an If's test)."""
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, kind) and (test is None or test in ast.unparse(node.test)):
            imports = (s for s in ast.walk(node) if isinstance(s, ast.Import | ast.ImportFrom))
            inside.update(id(sub) for sub in imports)
    return inside


@cache
def _edges(module: str) -> tuple[Edge, ...]:
    tree = ast.parse(_modules()[module].read_text())
    deferred = _marked(tree, (ast.FunctionDef, ast.AsyncFunctionDef))
    type_only = _marked(tree, ast.If, "TYPE_CHECKING")
    edges = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = {_from_target(node.module, alias.name) for alias in node.names}
        elif isinstance(node, ast.Import):
            targets = {_resolve(alias.name) or alias.name.partition(".")[0] for alias in node.names}
        else:
            continue
        for target in sorted(targets - {module}):
            edges.append(
                Edge(module, target, node.lineno, id(node) in deferred, id(node) in type_only)
            )
    return tuple(edges)


def _from_target(package: str, name: str) -> str:
    """What `from package import name` depends on: the submodule `name` where it is one
    (as import-linter counts it), else the module `package`."""
    if _resolve(package) is None:
        return package.partition(".")[0]
    submodule = f"{package}.{name}"
    return submodule if submodule in _modules() else str(_resolve(package))


def _internal_edges() -> list[Edge]:
    return [e for m in sorted(_modules()) for e in _edges(m) if e.imported in _modules()]


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "slimserve"


FRAMEWORKS = (*HEAVY, "onnx", "grpc", "google", "uvicorn", "safetensors", "cryptography", "ray")


@cache
def _loads_heavy(module: str) -> bool:
    """Whether importing `module` (its top-level imports, followed) loads a framework."""
    seen, todo = {module}, [module]
    while todo:
        for e in _edges(todo.pop()):
            if e.deferred or e.type_only:
                continue
            if e.imported in FRAMEWORKS:
                return True
            if e.imported in _modules() and e.imported not in seen:
                seen.add(e.imported)
                todo.append(e.imported)
    return False


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for e in _internal_edges():
        if not e.type_only:
            graph.setdefault(e.importer, set()).add(e.imported)
    cycles = [sorted(c) for c in _strongly_connected(graph) if len(c) > 1]
    assert not cycles, f"import cycles (deferred imports count): {cycles}"


def test_every_package_has_a_layer():
    missing = sorted({_package(m) for m in _modules()} - set(LAYERS))
    assert not missing, f"add {missing} to LAYERS in tests/test_imports.py (DESIGN.md's order)"


def test_imports_run_one_way():
    wrong = [
        f"{e.importer}:{e.line} imports {e.imported}"
        for e in _internal_edges()
        if not e.type_only and _against_layers(_package(e.importer), _package(e.imported))
    ]
    assert not wrong, wrong


def _against_layers(importer: str, imported: str) -> bool:
    if importer == imported:
        return False
    above = LAYERS.get(imported, 0) > LAYERS.get(importer, 0)  # unknown: the test above says
    return above or (importer, imported) in BANNED


def test_deferred_imports_only_keep_frameworks_from_loading():
    """An import inside a function is for a heavy framework (or a slimserve module that loads
    one), never a way around a cycle or the layers."""
    wrong = [
        f"{e.importer}:{e.line} imports {e.imported} inside a function"
        for e in _internal_edges()
        if e.deferred and not _loads_heavy(e.imported)
    ]
    assert not wrong, wrong


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                found.append(component)
    return found
