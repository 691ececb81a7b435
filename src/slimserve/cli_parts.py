"""What every `slimserve` subcommand's parser is made of: the command itself, from one text.

A command's text is written once, as a constant beside its handler: its first line is the
one-line help `slimserve --help` lists, and the whole text (lines joined) the description
`slimserve COMMAND --help` shows.
"""

from __future__ import annotations

import argparse
from typing import Any


def command(subparsers: Any, name: str, handler: Any, about: str) -> argparse.ArgumentParser:
    """Add subcommand `name` that runs `handler` (a function of the parsed arguments, or a
    "module:function" string imported when it runs; None for a group of subcommands)."""
    summary = about.strip().splitlines()[0].strip()
    parser: argparse.ArgumentParser = subparsers.add_parser(
        name, help=summary, description=" ".join(about.split())
    )
    if handler is not None:
        parser.set_defaults(handler=handler)
    return parser
