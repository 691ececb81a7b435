"""`slimserve keys ...` and `slimserve repo encrypt|decrypt` through the real command-line entry."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from slimserve.cli import main
from slimserve.security.crypto import parse_data_key
from slimserve.security.keys import Authenticator


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_create_list_revoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = str(tmp_path / "keys.json")
    code, out, err = _run(
        capsys,
        "keys",
        "create",
        "ci-bot",
        "--scopes",
        "infer,metrics",
        "--models",
        "a,b",
        "--keys-file",
        f,
    )
    token = out.strip()
    assert code == 0 and token.startswith("ssk_") and "shown only this once" in err
    identity = Authenticator(Path(f)).authenticate(token)
    assert identity.name == "ci-bot" and identity.models == frozenset({"a", "b"})

    code, out, _ = _run(capsys, "keys", "list", "--keys-file", f)
    secret = token[17:]
    assert code == 0 and identity.key_id in out and "infer,metrics" in out and "a,b" in out
    assert secret not in out and "hash" not in out.lower() and "salt" not in out.lower()
    assert Path(f).read_text().count(identity.key_id) == 1  # no secret, id only once

    code, out, _ = _run(capsys, "keys", "revoke", identity.key_id, "--keys-file", f)
    assert code == 0 and "revoked" in out
    code, out, _ = _run(capsys, "keys", "list", "--keys-file", f)
    row = next(line for line in out.splitlines() if identity.key_id in line)
    assert not row.rstrip().endswith("-")  # the REVOKED column holds a time


def test_bad_input_exits_2_with_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = str(tmp_path / "keys.json")
    code, _, err = _run(capsys, "keys", "create", "x", "--scopes", "root", "--keys-file", f)
    assert code == 2 and "use one or more of infer, manage, metrics" in err
    code, _, err = _run(capsys, "keys", "revoke", "abc", "--keys-file", f)
    assert code == 2 and "no key with id 'abc'" in err


def test_gen_data_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_file = tmp_path / "data.key"
    code, out, _ = _run(capsys, "keys", "gen-data-key", "--out", str(out_file))
    assert code == 0 and str(out_file) in out
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o600
    assert len(parse_data_key(out_file.read_bytes(), "f")) == 32
    code, _, err = _run(capsys, "keys", "gen-data-key", "--out", str(out_file))
    assert code == 2 and "never overwritten" in err
    code, out, _ = _run(capsys, "keys", "gen-data-key")
    assert code == 0 and len(bytes.fromhex(out.strip())) == 32
