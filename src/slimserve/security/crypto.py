"""Encrypted artifacts at rest: AES-256-GCM per file, decrypted in memory at load.

File format (`NAME.enc` beside where `NAME` was):

    magic b"SLIMENC" (7 bytes) | format version (1 byte, 1) | nonce (12 random bytes)
    | ciphertext || 16-byte GCM tag

The associated data is the magic, the version and the file's path relative to its unit
folder (version or variant folder), as POSIX text: a file renamed or swapped with another
fails authentication, like a modified byte or a wrong key. GCM with a random 96-bit nonce is
safe for far more files than one key will ever encrypt (2^32 messages per key).

A unit is encrypted whole except MANIFEST.json (rewritten over the encrypted files) and
variant.yaml (read before loading to describe the variant; it holds no weights).
Whole files are processed in memory: a model of N bytes needs about 2N while loading.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from slimserve.errors import ConfigError, ModelLoadError, UnsafeArtifact
from slimserve.repository.manifest import MANIFEST, verify_manifest, write_manifest
from slimserve.repository.store import (
    PICKLE_SUFFIXES,
    VARIANT_YAML,
    VARIANTS_DIR,
    refuse_pickles,
)
from slimserve.security.paths import confine_tree

MAGIC = b"SLIMENC"
FORMAT_VERSION = 1
SUFFIX = ".enc"
KEY_BYTES = 32  # AES-256
NONCE_BYTES = 12
_HEADER = MAGIC + bytes([FORMAT_VERSION])
_CLEAR_NAMES = frozenset({MANIFEST, VARIANT_YAML})


# ---------------------------------------------------------------------------------------------
# Keys.


def generate_data_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def parse_data_key(data: bytes | str, source: str) -> bytes:
    """A 32-byte key from raw bytes, 64 hex digits or base64 text; `source` names it in errors."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) == KEY_BYTES:
        return raw
    text = raw.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return binascii.unhexlify(text)
        except binascii.Error:
            pass
    try:
        key = base64.b64decode(text, validate=True)
    except binascii.Error:
        key = b""
    if len(key) == KEY_BYTES:
        return key
    raise ConfigError(
        f"{source}: not a 32-byte key (raw, 64 hex digits or base64); fix: generate one with "
        "`slimserve keys gen-data-key --out FILE`"
    )


def load_data_key_file(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the data key file ({exc.strerror})") from None
    return parse_data_key(data, str(path))


def resolve_data_key(
    key_file: Path | None, key_env: str | None, environ: Mapping[str, str]
) -> bytes | None:
    """The server's data key from settings: a file, or the environment variable named
    `key_env` looked up in `environ` (config.py passes os.environ); None when neither is set."""
    if key_file is not None and key_env is not None:
        raise ConfigError("set data_key_file or data_key_env, not both")
    if key_file is not None:
        return load_data_key_file(key_file)
    if key_env is None:
        return None
    value = environ.get(key_env)
    if not value:
        raise ConfigError(f"data_key_env {key_env}: the environment variable is not set or empty")
    return parse_data_key(value, f"environment variable {key_env}")


# ---------------------------------------------------------------------------------------------
# One file.


def _aad(rel: str) -> bytes:
    return _HEADER + rel.encode("utf-8")


def encrypt_bytes(clear: bytes, key: bytes, rel: str) -> bytes:
    """The encrypted file's bytes for `clear`, bound to its relative path `rel`."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = secrets.token_bytes(NONCE_BYTES)
    return _HEADER + nonce + AESGCM(key).encrypt(nonce, clear, _aad(rel))


def decrypt_bytes(blob: bytes, key: bytes, rel: str, shown: Path) -> bytes:
    """The clear bytes of an encrypted file; ModelLoadError naming `shown` when refused."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if not blob.startswith(MAGIC):
        raise ModelLoadError(f"{shown}: not a slimserve encrypted file (no {MAGIC!r} header)")
    if blob[len(MAGIC)] != FORMAT_VERSION:
        raise ModelLoadError(
            f"{shown}: encrypted with format version {blob[len(MAGIC)]}, this slimserve reads "
            f"version {FORMAT_VERSION}; fix: upgrade slimserve"
        )
    start = len(_HEADER)
    nonce, body = blob[start : start + NONCE_BYTES], blob[start + NONCE_BYTES :]
    try:
        return AESGCM(key).decrypt(nonce, body, _aad(rel))
    except (InvalidTag, ValueError):
        raise ModelLoadError(
            f"{shown}: cannot decrypt: wrong key or the file was modified (or renamed); fix: "
            "use the data key it was encrypted with, or restore the file"
        ) from None


def encrypted_path(path: Path) -> Path:
    return path.with_name(path.name + SUFFIX)


def is_encrypted(path: Path) -> bool:
    """True when only the encrypted form `path.enc` of `path` exists."""
    return not path.exists() and encrypted_path(path).is_file()


def artifact_exists(path: Path) -> bool:
    """`path` exists in clear or encrypted."""
    return path.is_file() or encrypted_path(path).is_file()


def read_artifact(path: Path, key: bytes | None, root: Path | None = None) -> bytes:
    """The clear bytes of `path`, read as is or decrypted in memory from `path.enc`.

    `root` is the unit folder the relative path (the associated data) is taken from; by
    default the file's own folder. Nothing clear is written to disk.
    """
    path = Path(path)
    if path.is_file():
        return path.read_bytes()
    enc = encrypted_path(path)
    if not enc.is_file():
        raise ModelLoadError(f"{path}: no such file (nor {enc.name})")
    if key is None:
        raise ModelLoadError(
            f"{enc}: the artifact is encrypted and no data key is configured; fix: start the "
            "server with the data key (data_key_file or data_key_env setting)"
        )
    rel = path.relative_to(root if root is not None else path.parent).as_posix()
    return decrypt_bytes(enc.read_bytes(), key, rel, enc)


# ---------------------------------------------------------------------------------------------
# Whole units (a version or variant folder).


def _unit_files(unit: Path) -> list[Path]:
    """Every file of the unit but its manifest, variant.yaml and nested variants."""
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(unit):
        here = Path(dirpath)
        if here == unit:
            dirnames[:] = [d for d in dirnames if d != VARIANTS_DIR]
        dirnames.sort()
        out.extend(
            here / name for name in sorted(filenames) if not (here == unit and name in _CLEAR_NAMES)
        )
    return out


def refuse_encrypted_pickles(unit: Path) -> None:
    """Refuse `x.pt.enc` and the like: a pickle stays a pickle once decrypted.

    `refuse_pickles` judges a file by its last suffix, which for these is '.enc'.
    """
    for path in _unit_files(unit):
        inner = Path(path.name.removesuffix(SUFFIX)).suffix.lower()
        if path.name.endswith(SUFFIX) and inner in PICKLE_SUFFIXES:
            raise UnsafeArtifact(
                f"{path}: an encrypted pickle file; pickle files can run arbitrary code when "
                "loaded and are refused; decrypt it, convert it to safetensors, and encrypt that"
            )


def _check_manifest(unit: Path) -> None:
    """Refuse to (re)write the manifest of a unit whose files no longer match it."""
    verify_manifest(unit)  # ModelLoadError naming the file when modified


def encrypt_unit(unit: Path, key: bytes) -> list[Path]:
    """Encrypt every clear file of a unit in place; return the files written.

    Each `x` becomes `x.enc` (written atomically) and `x` is removed; then MANIFEST.json is
    rewritten. The manifest, when present, is checked first: a tampered file is never
    laundered into a fresh manifest. Pickle files are refused, as at load.
    """
    _check_manifest(unit)
    refuse_pickles(unit)
    confine_tree(unit)  # a symlink out of the folder would encrypt (and drop) a foreign file
    written = []
    for path in _unit_files(unit):
        if path.name.endswith(SUFFIX):
            continue  # already encrypted
        rel = path.relative_to(unit).as_posix()
        target = encrypted_path(path)
        _write_atomic(target, encrypt_bytes(path.read_bytes(), key, rel))
        path.unlink()
        written.append(target)
    write_manifest(unit)
    return written


def decrypt_unit(unit: Path, key: bytes) -> list[Path]:
    """Write the clear files of an encrypted unit back and remove the `.enc` files.

    Every file is decrypted (and so authenticated) in memory before any is written, so a
    wrong key or a tampered file leaves the unit as it was.
    """
    _check_manifest(unit)
    clear = []
    for enc in _unit_files(unit):
        if not enc.name.endswith(SUFFIX):
            continue
        path = enc.with_name(enc.name[: -len(SUFFIX)])
        rel = path.relative_to(unit).as_posix()
        clear.append((enc, path, decrypt_bytes(enc.read_bytes(), key, rel, enc)))
    for enc, path, data in clear:
        _write_atomic(path, data)
        enc.unlink()
    write_manifest(unit)
    return [path for _, path, _ in clear]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
