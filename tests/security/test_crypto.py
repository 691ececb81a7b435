"""Encrypted artifacts: the file format, keys, whole units, read_artifact, the CLI."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from slimserve.cli import main
from slimserve.errors import ConfigError, ModelLoadError, UnsafeArtifact
from slimserve.repository.manifest import MANIFEST, verify_manifest, write_manifest
from slimserve.security import crypto
from slimserve.security.crypto import (
    decrypt_bytes,
    decrypt_unit,
    encrypt_bytes,
    encrypt_unit,
    generate_data_key,
    parse_data_key,
    read_artifact,
)

WRONG = "wrong key or the file was modified"


def test_round_trip_and_format(data_key: bytes) -> None:
    clear = os.urandom(1000)
    blob = encrypt_bytes(clear, data_key, "model.onnx")
    assert blob.startswith(b"SLIMENC\x01") and len(blob) == 8 + 12 + len(clear) + 16
    assert clear not in blob
    assert decrypt_bytes(blob, data_key, "model.onnx", Path("x")) == clear
    # A fresh nonce each time: the same file never encrypts to the same bytes.
    assert encrypt_bytes(clear, data_key, "model.onnx") != blob


@pytest.mark.parametrize("where", [8, 8 + 12, -1])  # nonce, ciphertext, tag
def test_tampered_byte_refused(data_key: bytes, where: int) -> None:
    blob = bytearray(encrypt_bytes(b"weights" * 100, data_key, "w.safetensors"))
    blob[where] ^= 0x01
    with pytest.raises(ModelLoadError, match=f"shown.bin: cannot decrypt: {WRONG}"):
        decrypt_bytes(bytes(blob), data_key, "w.safetensors", Path("shown.bin"))


def test_wrong_key_renamed_file_bad_header(data_key: bytes) -> None:
    blob = encrypt_bytes(b"abc", data_key, "a.onnx")
    with pytest.raises(ModelLoadError, match=WRONG):
        decrypt_bytes(blob, generate_data_key(), "a.onnx", Path("a.onnx.enc"))
    with pytest.raises(ModelLoadError, match=WRONG):  # same bytes under another name
        decrypt_bytes(blob, data_key, "b.onnx", Path("b.onnx.enc"))
    with pytest.raises(ModelLoadError, match="not a slimserve encrypted file"):
        decrypt_bytes(b"PK\x03\x04" + blob, data_key, "a.onnx", Path("a.onnx.enc"))
    with pytest.raises(ModelLoadError, match="format version 9"):
        decrypt_bytes(b"SLIMENC\x09" + blob[8:], data_key, "a.onnx", Path("a.onnx.enc"))


def test_parse_data_key_forms(tmp_path: Path) -> None:
    key = generate_data_key()
    assert parse_data_key(key, "raw") == key
    assert parse_data_key(key.hex() + "\n", "hex") == key
    assert parse_data_key(base64.b64encode(key).decode(), "b64") == key
    for bad in (b"short", key.hex()[:-2], "z" * 64):
        with pytest.raises(ConfigError, match=r"not a 32-byte key.*gen-data-key"):
            parse_data_key(bad, "the key")
    with pytest.raises(ConfigError, match="cannot read the data key file"):
        crypto.load_data_key_file(tmp_path / "missing.key")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def test_encrypt_unit_leaves_no_clear_text(light_repo: Path, data_key: bytes) -> None:
    unit = light_repo / "m" / "1"
    write_manifest(unit)
    before = _snapshot(unit)
    written = encrypt_unit(unit, data_key)
    after = _snapshot(unit)
    expected = {f"{name}.enc" for name in before if name != MANIFEST} | {MANIFEST}
    assert set(after) == expected and len(written) == len(before) - 1
    for name, clear in before.items():
        if name == MANIFEST:
            continue
        probe = clear[len(clear) // 2 : len(clear) // 2 + 32]  # a slice of the clear bytes
        assert not any(probe in data for data in after.values()), name
    assert verify_manifest(unit)  # the manifest covers the encrypted files
    assert set(json.loads((unit / MANIFEST).read_text())["files"]) == expected - {MANIFEST}

    decrypt_unit(unit, data_key)
    assert {k: v for k, v in _snapshot(unit).items() if k != MANIFEST} == {
        k: v for k, v in before.items() if k != MANIFEST
    }
    assert verify_manifest(unit)


def test_swapped_encrypted_files_refused(light_repo: Path, data_key: bytes) -> None:
    unit = light_repo / "m" / "1"
    encrypt_unit(unit, data_key)
    a, b = unit / "vocab.txt.enc", unit / "config.json.enc"
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)
    b.write_bytes(data_a)
    with pytest.raises(ModelLoadError, match=f"config.json.enc: cannot decrypt: {WRONG}"):
        read_artifact(unit / "config.json", data_key)


def test_decrypt_with_wrong_key_changes_nothing(light_repo: Path, data_key: bytes) -> None:
    unit = light_repo / "m" / "1"
    encrypt_unit(unit, data_key)
    before = _snapshot(unit)
    with pytest.raises(ModelLoadError, match=WRONG):
        decrypt_unit(unit, generate_data_key())
    assert _snapshot(unit) == before


def test_encrypt_refuses_modified_files_pickles_and_symlinks(
    light_repo: Path, data_key: bytes, tmp_path: Path
) -> None:
    unit = light_repo / "m" / "1"
    write_manifest(unit)
    (unit / "vocab.txt").write_bytes(b"tampered")
    with pytest.raises(ModelLoadError, match=r"does not match MANIFEST.json"):
        encrypt_unit(unit, data_key)  # a tampered file is never laundered into a manifest
    (unit / MANIFEST).unlink()
    (unit / "extra.pkl").write_bytes(b"\x80\x04")
    with pytest.raises(UnsafeArtifact, match="pickle"):
        encrypt_unit(unit, data_key)
    (unit / "extra.pkl").unlink()
    outside = tmp_path / "secret.txt"
    outside.write_text("not the model's")
    (unit / "notes.txt").symlink_to(outside)
    with pytest.raises(UnsafeArtifact, match="resolves outside"):
        encrypt_unit(unit, data_key)
    assert outside.read_text() == "not the model's"


def test_read_artifact(light_repo: Path, data_key: bytes) -> None:
    unit = light_repo / "m" / "1"
    clear = (unit / "config.json").read_bytes()
    assert read_artifact(unit / "config.json", None) == clear
    encrypt_unit(unit, data_key)
    assert read_artifact(unit / "config.json", data_key) == clear
    assert read_artifact(unit / "config.json", data_key, root=unit) == clear
    with pytest.raises(ModelLoadError, match="encrypted and no data key is configured"):
        read_artifact(unit / "config.json", None)
    with pytest.raises(ModelLoadError, match="no such file"):
        read_artifact(unit / "absent.json", data_key)


def test_nested_files_bound_to_relative_path(tmp_path: Path, data_key: bytes) -> None:
    unit = tmp_path / "1"
    (unit / "sub").mkdir(parents=True)
    (unit / "sub" / "a.json").write_text("{}")
    encrypt_unit(unit, data_key)
    assert read_artifact(unit / "sub" / "a.json", data_key, root=unit) == b"{}"
    with pytest.raises(ModelLoadError, match=WRONG):  # bound to 'sub/a.json', not 'a.json'
        read_artifact(unit / "sub" / "a.json", data_key)


def test_cli_encrypt_decrypt(
    light_repo: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = generate_data_key()
    key_file = tmp_path / "data.key"
    key_file.write_text(key.hex())
    (light_repo / "m" / "1" / "variants" / "int8").mkdir(parents=True)
    (light_repo / "m" / "1" / "variants" / "int8" / "model.onnx").write_bytes(b"variant")
    argv = ["repo", "encrypt", "m", "--repository", str(light_repo)]
    assert main([*argv, "--key-file", str(key_file)]) == 0
    out = capsys.readouterr().out
    assert "encrypted 4 files" in out and "encrypted 1 files" in out
    names = {p.name for p in (light_repo / "m").rglob("*") if p.is_file()}
    assert {n for n in names if not n.endswith(".enc")} == {"model.yaml", MANIFEST}
    assert "model.onnx.enc" in names and "vocab.txt.enc" in names
    monkeypatch.setenv("SLIMSERVE_TEST_DATA_KEY", base64.b64encode(key).decode())
    argv[1] = "decrypt"
    assert main([*argv, "--key-env", "SLIMSERVE_TEST_DATA_KEY"]) == 0
    assert (light_repo / "m" / "1" / "variants" / "int8" / "model.onnx").read_bytes() == b"variant"
    monkeypatch.delenv("SLIMSERVE_TEST_DATA_KEY")
    assert main([*argv, "--key-env", "SLIMSERVE_TEST_DATA_KEY"]) == 2
    assert "not set" in capsys.readouterr().err


def test_resolve_data_key(tmp_path: Path) -> None:
    key = generate_data_key()
    (tmp_path / "k").write_bytes(key)
    assert crypto.resolve_data_key(None, None, {}) is None
    assert crypto.resolve_data_key(tmp_path / "k", None, {}) == key
    assert crypto.resolve_data_key(None, "K", {"K": key.hex()}) == key
    with pytest.raises(ConfigError, match="not both"):
        crypto.resolve_data_key(tmp_path / "k", "K", {"K": key.hex()})
    with pytest.raises(ConfigError, match="data_key_env K: the environment variable is not set"):
        crypto.resolve_data_key(None, "K", {})
    with pytest.raises(ConfigError, match="environment variable K: not a 32-byte key") as info:
        crypto.resolve_data_key(None, "K", {"K": "secret-ish-but-short"})
    assert "secret-ish" not in info.value.message  # the value is never echoed
