"""`slimserve serve`: one flag per Settings field, help from its description.

Registering the command loads only the settings; its handler, `slimserve.launch:serve_command`,
is imported by the command line (cli.py) when `serve` runs, so other commands start without
loading the server's transports.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any

from slimserve.cli_parts import command
from slimserve.config import Settings

HANDLER = "slimserve.launch:serve_command"


ABOUT = """serve a model repository over HTTP and gRPC
Serve every model in a repository (KServe v2 over HTTP and gRPC). Options also come from
SLIMSERVE_<OPTION> environment variables and --config FILE; flags win over the environment,
which wins over the file.
"""


def register(sub: Any) -> None:
    parser = command(sub, "serve", HANDLER, ABOUT)
    parser.add_argument("--config", type=Path, help="YAML file of settings (keys as below).")
    for name, field in Settings.model_fields.items():
        _add_flag(parser, name, field)


def settings_from(args: argparse.Namespace) -> Settings:
    """The Settings the parsed flags, the environment and --config give."""
    flags = {name: getattr(args, name) for name in Settings.model_fields}
    return Settings.load(args.config, **flags)


def _add_flag(parser: argparse.ArgumentParser, name: str, field: Any) -> None:
    flag = "--" + name.replace("_", "-")
    default = field.default_factory() if field.default_factory else field.default
    help_text = f"{field.description} (default: {default})"
    annotation = field.annotation
    optional = [a for a in typing.get_args(annotation) if a is not type(None)]
    if type(None) in typing.get_args(annotation) and len(optional) == 1:
        annotation = optional[0]  # `X | None`: the flag takes an X
    if annotation is bool:
        parser.add_argument(
            flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
        )
    elif typing.get_origin(annotation) is typing.Literal:
        parser.add_argument(flag, choices=typing.get_args(annotation), default=None, help=help_text)
    elif typing.get_origin(annotation) is list:
        parser.add_argument(
            flag,
            type=lambda s: [x for x in s.split(",") if x],
            default=None,
            help=help_text + "; comma-separated",
        )
    else:
        parser.add_argument(flag, type=annotation, default=None, help=help_text)
