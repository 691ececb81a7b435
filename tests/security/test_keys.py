"""API keys: create, verify, revoke, scopes, model allow-lists, the key file, reloads."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from slimserve.errors import (
    ConfigError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from slimserve.security import keys
from slimserve.security.keys import (
    ANONYMOUS,
    Authenticator,
    Identity,
    KeyStore,
    authorize,
    bearer_token,
)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "keys.json"


@pytest.fixture
def infer_token(key_file: Path) -> str:
    return KeyStore(key_file).create("alice", ["infer"], ["mlp"])[1]


def test_token_format_and_identity(key_file: Path) -> None:
    record, token = KeyStore(key_file).create("alice", ["manage", "infer"])
    assert token.startswith(f"ssk_{record.key_id}_") and len(token) == 4 + 12 + 1 + 43
    identity = Authenticator(key_file).authenticate(token)
    assert identity == Identity(record.key_id, "alice", frozenset({"infer", "manage"}), None)
    assert identity.client == f"alice/{record.key_id}"
    assert record.scopes == ("infer", "manage")  # canonical order


def test_file_holds_only_salted_hashes_mode_0600(key_file: Path) -> None:
    store = KeyStore(key_file)
    _, token_a = store.create("a", ["infer"])
    _, token_b = store.create("b", ["infer"])
    text = key_file.read_text()
    secret_a, secret_b = token_a[17:], token_b[17:]  # after "ssk_<12 hex>_"
    assert secret_a not in text and secret_b not in text
    entries = json.loads(text)["keys"]
    assert len({e["salt"] for e in entries}) == 2 and all(len(e["hash"]) == 64 for e in entries)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # No temp files left beside it (only the lock file).
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["keys.json", "keys.json.lock"]


def test_missing_malformed_unknown_forged(key_file: Path, infer_token: str) -> None:
    auth = Authenticator(key_file)
    for token in (None, ""):
        with pytest.raises(Unauthenticated, match="missing API key"):
            auth.authenticate(token)
    for token in ("Bearer " + infer_token, infer_token + "x", "ssk_zz", "hunter2"):
        with pytest.raises(Unauthenticated, match="malformed API key") as info:
            auth.authenticate(token)
        assert infer_token not in info.value.message
    key_id, secret = infer_token[4:16], infer_token[17:]
    forged = f"ssk_{key_id}_{'A' * 43}"  # a known id with a wrong secret
    unknown = f"ssk_{'0' * 12}_{secret}"  # a real secret under an unknown id
    messages = set()
    for token in (forged, unknown):
        with pytest.raises(Unauthenticated) as info:
            auth.authenticate(token)
        messages.add(info.value.message)
        assert secret not in info.value.message and key_id not in info.value.message
    assert messages == {keys.INVALID_KEY}  # one message: nothing tells the cases apart


def test_compare_digest_used_for_known_and_unknown_ids(
    key_file: Path, infer_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = keys.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys, "compare_digest", spy)
    auth = Authenticator(key_file)
    auth.authenticate(infer_token)
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"ssk_{'0' * 12}_{'B' * 43}")
    assert len(calls) == 2 and all(len(a) == len(b) == 32 for a, b in calls)


def test_revoke_takes_effect_on_running_authenticator(key_file: Path, infer_token: str) -> None:
    auth = Authenticator(key_file)
    key_id = auth.authenticate(infer_token).key_id
    record = KeyStore(key_file).revoke(key_id)
    assert record.revoked is not None
    with pytest.raises(Unauthenticated) as info:
        auth.authenticate(infer_token)
    assert info.value.message == keys.INVALID_KEY
    with pytest.raises(NotFound, match="no key with id"):
        KeyStore(key_file).revoke("000000000000")


def test_new_key_seen_without_restart(key_file: Path, infer_token: str) -> None:
    auth = Authenticator(key_file)
    _, token = KeyStore(key_file).create("bob", ["metrics"])
    assert auth.authenticate(token).name == "bob"


def test_deleted_key_file_refuses_everything(key_file: Path, infer_token: str) -> None:
    auth = Authenticator(key_file)
    key_file.unlink()
    with pytest.raises(Unauthenticated):
        auth.authenticate(infer_token)


def test_invalid_file_keeps_last_keys_and_logs(
    key_file: Path, infer_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    auth = Authenticator(key_file)
    key_file.write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="slimserve.security.keys"):
        assert auth.authenticate(infer_token).name == "alice"
    assert "invalid" in caplog.text


def test_startup_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"does not exist.*keys create"):
        Authenticator(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 1, "keys": [{"id": "x"}]}))
    with pytest.raises(ConfigError, match="not a valid key file"):
        Authenticator(bad)


def test_scopes_and_model_allow_list(key_file: Path, infer_token: str) -> None:
    auth = Authenticator(key_file)
    alice = auth.authenticate(infer_token)
    auth.authorize(alice, "infer", "mlp")
    auth.authorize(alice, "infer", "mlp:int8")  # a variant of an allowed model
    auth.authorize(alice, "infer")
    with pytest.raises(PermissionDenied, match="lacks the 'manage' scope"):
        auth.authorize(alice, "manage")
    with pytest.raises(PermissionDenied, match="may not use model 'other'"):
        auth.authorize(alice, "infer", "other")
    authorize(ANONYMOUS, "manage", "anything")  # no key file: open access


def test_create_validates(key_file: Path) -> None:
    store = KeyStore(key_file)
    with pytest.raises(InvalidArgument, match="scopes"):
        store.create("a", ["admin"])
    with pytest.raises(InvalidArgument, match="scopes"):
        store.create("a", [])
    with pytest.raises(InvalidArgument, match="key name"):
        store.create("../a", ["infer"])
    with pytest.raises(InvalidArgument, match="model name"):
        store.create("a", ["infer"], ["../etc"])
    assert not key_file.exists()


def test_group_readable_file_warns(
    key_file: Path, infer_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    os.chmod(key_file, 0o644)
    with caplog.at_level(logging.WARNING, logger="slimserve.security.keys"):
        Authenticator(key_file)
    assert "chmod 600" in caplog.text


def test_secret_never_logged(
    key_file: Path, infer_token: str, caplog: pytest.LogCaptureFixture
) -> None:
    secret = infer_token[17:]
    with caplog.at_level(logging.DEBUG):
        auth = Authenticator(key_file)
        identity = auth.authenticate(infer_token)
        KeyStore(key_file).create("other", ["infer"])
        auth.authenticate(infer_token)  # re-reads the changed file, logs it
        wrong_last = "B" if infer_token.endswith("A") else "A"
        for bad in (infer_token[:-1] + wrong_last, infer_token + "A"):
            with pytest.raises(Unauthenticated):
                auth.authenticate(bad)
    assert caplog.records  # the reload was logged
    assert secret not in caplog.text and secret not in repr(identity)


def test_bearer_header_parsing(key_file: Path, infer_token: str) -> None:
    auth = Authenticator(key_file)
    for header in (f"Bearer {infer_token}", f"bearer  {infer_token} ", f"BEARER {infer_token}"):
        assert auth.authenticate(bearer_token(header)).name == "alice"
    assert bearer_token(None) is None
    with pytest.raises(Unauthenticated, match="missing"):
        auth.authenticate(bearer_token("Bearer "))
    with pytest.raises(Unauthenticated, match="malformed"):
        auth.authenticate(bearer_token(f"Basic {infer_token}"))


def test_security_package_imports_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, slimserve.security, slimserve.security.cli, slimserve.security.audit, "
        "slimserve.security.paths, slimserve.security.crypto; "
        "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'cryptography') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
