"""`slimserve keys create | list | revoke | gen-data-key`; `repo encrypt | decrypt`.

`slimserve repo-crypt encrypt|decrypt` until `repository/cli.py` calls
`register_repo_commands(repo_subparsers)`, which adds them as `repo encrypt|decrypt` (then
`repo-crypt` is not registered).
Importing this module loads no framework (cryptography is imported when a command runs).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from slimserve.cli_parts import command
from slimserve.errors import AlreadyExists, ConfigError, InvalidArgument
from slimserve.repository.cli import repository_option, unit_version_option
from slimserve.repository.store import Repository
from slimserve.security.crypto import (
    decrypt_unit,
    encrypt_unit,
    generate_data_key,
    load_data_key_file,
    parse_data_key,
)
from slimserve.security.keys import SCOPES, KeyStore, write_private


def register(subparsers: Any) -> None:
    """Add `keys`, and `repo encrypt|decrypt` to the `repo` command that repository/cli.py
    registered before (cli.COMMAND_MODULES' order), or `repo-crypt encrypt|decrypt` without
    it."""
    _register_keys(subparsers)
    repo_sub = _subcommands_of(subparsers.choices.get("repo"))
    if repo_sub is not None:
        register_repo_commands(repo_sub)
        return
    about = "Encrypt or decrypt a model's artifacts at rest (AES-256-GCM)."
    group = command(subparsers, "repo-crypt", None, about)
    register_repo_commands(
        group.add_subparsers(dest="repo_command", metavar="SUBCOMMAND", required=True)
    )


def _subcommands_of(parser: argparse.ArgumentParser | None) -> Any:
    """The sub-parser group of an existing parser (argparse offers no public accessor)."""
    if parser is None:
        return None
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


# --------------------------------------------------------------------------- keys


KEYS_ABOUT = """Create, list and revoke API keys; generate data keys.
API keys are stored as salted hashes in a key file (mode 0600); the server reads it with
--api-keys-file and notices changes without a restart.
"""


def _register_keys(subparsers: Any) -> None:
    keys = command(subparsers, "keys", None, KEYS_ABOUT)
    sub = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND", required=True)
    p = command(sub, "create", _create, "Create a key; its secret is printed once.")
    p.add_argument("name", metavar="NAME", help="Who uses the key (shown in logs and audit).")
    p.add_argument(
        "--scopes",
        required=True,
        type=_csv,
        metavar="S1,S2",
        help=f"Comma-separated scopes: {', '.join(SCOPES)}.",
    )
    p.add_argument(
        "--models",
        type=_csv,
        default=None,
        metavar="M1,M2",
        help="Only these models (default: every model).",
    )
    _keys_file_option(p)
    p = command(sub, "list", _list, "List keys (ids, names, scopes; never secrets).")
    _keys_file_option(p)
    p = command(sub, "revoke", _revoke, "Revoke a key; a running server refuses it at once.")
    p.add_argument("key_id", metavar="ID", help="The key's id (see `keys list`).")
    _keys_file_option(p)
    about = "Generate a 32-byte data key for `repo encrypt`."
    p = command(sub, "gen-data-key", _gen_data_key, about)
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="Write it (hex) to FILE with mode 0600 (default: print it).",
    )


def _keys_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keys-file",
        "--api-keys-file",
        dest="keys_file",
        type=Path,
        required=True,
        metavar="FILE",
        help="The API key file (JSON).",
    )


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _create(args: argparse.Namespace) -> int:
    record, token = KeyStore(args.keys_file).create(args.name, args.scopes, args.models)
    print(token)
    print(
        f"created key {record.key_id} '{record.name}' scopes={','.join(record.scopes)}; the "
        "secret above is shown only this once: store it now",
        file=sys.stderr,
    )
    return 0


def _list(args: argparse.Namespace) -> int:
    rows = [("ID", "NAME", "SCOPES", "MODELS", "CREATED", "REVOKED")]
    for rec in KeyStore(args.keys_file).read().values():
        models = "*" if rec.models is None else ",".join(rec.models)
        rows.append(
            (rec.key_id, rec.name, ",".join(rec.scopes), models, rec.created, rec.revoked or "-")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _revoke(args: argparse.Namespace) -> int:
    record = KeyStore(args.keys_file).revoke(args.key_id)
    print(f"revoked key {record.key_id} '{record.name}' at {record.revoked}")
    return 0


def _gen_data_key(args: argparse.Namespace) -> int:
    text = generate_data_key().hex() + "\n"
    if args.out is None:
        print(text, end="")
        return 0
    if args.out.exists():
        raise AlreadyExists(
            f"{args.out} exists; a data key is never overwritten (data "
            "encrypted with it would be lost): choose another path"
        )
    write_private(args.out, text.encode())
    print(f"wrote a 32-byte data key to {args.out} (mode 0600); keep a copy somewhere safe")
    return 0


# --------------------------------------------------------------------------- repo encrypt


def register_repo_commands(repo_subparsers: Any) -> None:
    """Add `encrypt` and `decrypt` to a `repo` sub-parser group."""
    for verb, text in (
        ("encrypt", "Encrypt a model's files at rest (AES-256-GCM)."),
        ("decrypt", "Decrypt a model's files back to clear text on disk."),
    ):
        p = repo_subparsers.add_parser(verb, help=text, description=text)
        p.add_argument("name", metavar="NAME", help="Model name.")
        repository_option(p)
        unit_version_option(p)
        key = p.add_mutually_exclusive_group(required=True)
        key.add_argument(
            "--key-file", type=Path, metavar="FILE", help="32-byte data key: raw, hex or base64."
        )
        key.add_argument(
            "--key-env", metavar="VAR", help="Environment variable holding the key (hex or base64)."
        )
        p.set_defaults(handler=_crypt, crypt_verb=verb)


def data_key_from_args(key_file: Path | None, key_env: str | None) -> bytes:
    """The data key named on the command line (a file, or an environment variable)."""
    if key_file is not None:
        return load_data_key_file(key_file)
    assert key_env is not None  # argparse requires one of the two
    # The user names the variable explicitly, as with --key-file, so reading it here (and not
    # through Settings) is the command's own input.
    value = os.environ.get(key_env)
    if not value:
        raise ConfigError(f"--key-env {key_env}: the environment variable is not set or empty")
    return parse_data_key(value, f"environment variable {key_env}")


def _crypt(args: argparse.Namespace) -> int:

    if not args.repository.is_dir():
        raise InvalidArgument(f"--repository {args.repository}: no such folder")
    key = data_key_from_args(args.key_file, args.key_env)
    repo = Repository(args.repository)
    versions = [args.version] if args.version is not None else repo.versions(args.name)
    action = encrypt_unit if args.crypt_verb == "encrypt" else decrypt_unit
    for version in versions:
        for unit in _units(repo, args.name, version):
            files = action(unit, key)
            print(f"{args.crypt_verb}ed {len(files)} files in {unit}")
    return 0


def _units(repo: Any, name: str, version: int) -> list[Path]:
    """The version folder and its variants' folders, each confined by the Repository."""
    units = [repo.version_dir(name, version)]
    units += [repo.variant_dir(name, version, v) for v in repo.variants(name, version)]
    return units
