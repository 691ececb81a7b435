"""Recipes: `prune:0.9+finetune:epochs=3+int8` -> validated steps, before any work is done.

Grammar: steps joined by '+'; a step is `NAME` or `NAME:ARGS`, ARGS comma-separated `key=value`
pairs, the first of which may be a bare value for the step's main argument (`prune:0.9` is
`prune:amount=0.9`). Values are YAML scalars (0.9, 3, true, minmax). A recipe may also be a
YAML file:

    name: pruned-int8          # the variant's name (default: derived from the steps)
    steps:
      - prune:0.9
      - finetune: {epochs: 3, lr: 0.0001}
      - int8

Every step's arguments are turned into its config object while parsing, so an impossible value
(sparsity 1.5, 3 bits of int8) fails before anything is read or written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slimserve.errors import InvalidArgument
from slimserve.optimize.steps import STEPS, StepSpec
from slimserve.repository.store import check_name


@dataclass(frozen=True)
class Step:
    spec: StepSpec
    args: dict[str, Any]
    config: Any
    text: str


@dataclass(frozen=True)
class Recipe:
    name: str
    steps: tuple[Step, ...]
    text: str
    source: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> list[dict[str, Any]]:
        return [{"step": s.spec.name, **s.args} for s in self.steps]


def _scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text else True
    except yaml.YAMLError:
        return text


def _parse_args(spec: StepSpec, text: str) -> dict[str, Any]:
    args: dict[str, Any] = {}
    for i, part in enumerate(p.strip() for p in text.split(",") if p.strip()):
        key, eq, value = part.partition("=")
        if not eq:
            if i or spec.main_arg is None:
                raise InvalidArgument(
                    f"step '{spec.name}': argument {part!r} needs a name (key=value)"
                    + (
                        f"; only the first may be bare (it sets {spec.main_arg})"
                        if spec.main_arg
                        else ""
                    )
                )
            key, value = spec.main_arg, part
        args[key.strip()] = _scalar(value.strip())
    return args


def _unknown_step(name: str) -> InvalidArgument:
    known = ", ".join(sorted(STEPS))
    return InvalidArgument(f"unknown recipe step {name!r}; known steps: {known}")


def build_step(name: str, args: dict[str, Any], text: str) -> Step:
    spec = STEPS.get(name)
    if spec is None:
        raise _unknown_step(name)
    try:
        config = spec.build(dict(args))
    except TypeError as exc:
        raise InvalidArgument(f"step '{text}': {_type_error_message(exc)}; {spec.help}") from None
    except InvalidArgument as exc:
        raise InvalidArgument(f"step '{text}': {exc.message}") from None
    return Step(spec, args, config, text)


def _type_error_message(exc: TypeError) -> str:
    match = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
    return f"unknown argument {match.group(1)!r}" if match else str(exc)


def parse_step(text: str) -> Step:
    name, _, rest = text.strip().partition(":")
    spec = STEPS.get(name.strip())
    if spec is None:
        raise _unknown_step(name.strip())
    return build_step(spec.name, _parse_args(spec, rest), text.strip())


def default_name(text: str) -> str:
    """A variant name from the recipe text: prune:0.9+int8 -> prune0.9_int8."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "", text.replace("+", "_").replace(",", "-"))
    return name[:128].strip("._-") or "variant"


def parse_recipe(text: str) -> Recipe:
    """A recipe from `a+b:x=1` text, or from a YAML file when `text` names one."""
    if text.endswith((".yaml", ".yml")):
        return _recipe_file(Path(text))
    if not text.strip():
        raise InvalidArgument("empty recipe; give steps like int8 or prune:0.9+finetune+int8")
    steps = tuple(parse_step(part) for part in text.split("+"))
    return Recipe(check_name(default_name(text), "variant name"), steps, text)


def _recipe_file(path: Path) -> Recipe:
    if not path.is_file():
        raise InvalidArgument(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
        raise InvalidArgument(f"{path}: a recipe file needs 'steps:', a non-empty list")
    steps = tuple(_file_step(item, path) for item in data["steps"])
    text = "+".join(s.text for s in steps)
    name = str(data.get("name") or default_name(path.stem))
    return Recipe(check_name(name, "variant name"), steps, text, data)


def _file_step(item: Any, path: Path) -> Step:
    if isinstance(item, str):
        return parse_step(item)
    if isinstance(item, dict) and len(item) == 1:
        ((name, args),) = item.items()
        if args is not None and not isinstance(args, dict):
            spec = STEPS.get(str(name))
            if spec is None or spec.main_arg is None:
                raise InvalidArgument(f"{path}: step {name!r}: give its arguments as a mapping")
            args = {spec.main_arg: args}
        text = f"{name}:" + ",".join(f"{k}={v}" for k, v in (args or {}).items())
        return build_step(str(name), dict(args or {}), text.rstrip(":"))
    raise InvalidArgument(f"{path}: each step is a string (int8) or a mapping {{int8: {{...}}}}")
