"""`slimserve serve | repo ... | optimize | bench`.

Each command group lives beside what it drives and registers its own sub-parser through a
`register(subparsers)` function; this module only assembles them. Importing it loads no
framework.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from slimserve.errors import SlimserveError

# Modules that each define `register(subparsers) -> None`; their handlers are stored by
# `cli_parts.command` (as `handler`) and take the parsed namespace, returning an exit code.
# A handler may be named 'package.module:function' instead: that module is imported only
# when its command runs (`serve` loads the transports; other commands should not).
COMMAND_MODULES = (
    "slimserve.serve_cli",  # serve
    "slimserve.repository.cli",  # repo add | list | manifest
    "slimserve.optimize.cli",  # optimize
    "slimserve.bench",  # bench
    "slimserve.bench.profile_command",  # profile
    "slimserve.planning.cli",  # plan
    "slimserve.security.cli",  # keys create | list | revoke; repo encrypt | decrypt
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slimserve",
        description="Serve machine-learning models fast and safely; make them cheaper to serve.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command group is not part of this build
                continue
            raise
        module.register(sub)
    return parser


# Optional dependencies -> the extra that installs them (pyproject.toml optional-dependencies).
EXTRAS = {
    "torch": "torch",
    "matplotlib": "optimize",
    "sklearn": "optimize",
    "onnxscript": "optimize",
    "transformers": "transformers",
    "tokenizers": "transformers",
    "gguf": "transformers",
    "accelerate": "transformers",
}


def missing_extra(exc: ModuleNotFoundError, command: str) -> str | None:
    """One line saying what to install for a missing optional dependency, or None."""
    top = (exc.name or "").split(".")[0]
    extra = EXTRAS.get(top)
    if extra is None:
        return None
    if command == "optimize" and extra == "torch":
        extra = "optimize"  # optimize's extra brings torch with the rest of what it uses
    package = {"sklearn": "scikit-learn"}.get(top, top)  # the name pip knows it by
    return f"{package} is not installed; pip install 'slimserve[{extra}]'"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = args.handler
    if isinstance(handler, str):
        module, _, function = handler.partition(":")
        handler = getattr(importlib.import_module(module), function)
    try:
        return int(handler(args) or 0)
    except SlimserveError as exc:
        print(f"slimserve {args.command}: error: {exc.message}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        hint = missing_extra(exc, args.command)
        if hint is None:
            raise
        print(f"slimserve {args.command}: error: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
