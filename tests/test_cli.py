"""The command line: every command and option explains itself; errors exit cleanly."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from slimserve.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for sub_name, nested in _subparsers(sub):
                    yield f"{name} {sub_name}", nested


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    commands = dict(_subparsers(parser))
    assert "serve" in commands
    for name, sub in commands.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
                continue
            assert action.help, (
                f"`slimserve {name}` option {action.option_strings or action.dest} has no help"
            )


def test_serve_help_lists_settings_with_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "slimserve", "serve", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    for flag in ("--repository", "--host", "--http-port", "--grpc-port", "--model-control"):
        assert flag in out.stdout
    assert "127.0.0.1" in out.stdout


def test_serve_with_a_missing_repository_fails_with_a_message(tmp_path, capsys):
    code = main(
        ["serve", "--repository", str(tmp_path / "nope"), "--http-port", "0", "--grpc-port", "0"]
    )
    assert code == 2
    assert "no such folder" in capsys.readouterr().err


def test_serve_with_a_bad_flag_value_names_it(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--http-port", "many"])
    assert "--http-port" in capsys.readouterr().err
