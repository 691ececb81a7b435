"""API keys with scopes: a key file of salted hashes, and the Authenticator the server uses.

A key reads `ssk_<id>_<secret>`: `id` is 12 hex digits (the record to look up, no scan),
`secret` 43 URL-safe base64 characters (32 random bytes, 256 bits). The file stores, per key,
a random 16-byte salt and SHA-256(salt || secret), never the secret.

Why a fast salted hash and not a slow KDF (scrypt, pbkdf2): a slow KDF protects low-entropy
passwords against guessing once the hashes leak; a 256-bit random secret cannot be guessed at
any speed, so slowness would add nothing but latency (tens of ms of CPU per request, and a
cheap way to burn the server's CPU with bad keys). The salt keeps equal secrets from
hashing equally; comparison uses `hmac.compare_digest` (constant time), and an unknown id is
hashed and compared against a dummy record so it takes the same path as a wrong secret.

The key file is JSON, written atomically (temp file + rename) with mode 0600, under a lock so
two `slimserve keys` commands do not lose each other's changes. A running server re-reads it
when its (inode, mtime, size) changes, one `stat` per request, so `keys revoke` takes effect
without a restart.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from hmac import compare_digest
from pathlib import Path
from typing import Any

from slimserve.errors import (
    ConfigError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from slimserve.repository.store import VARIANT_SEPARATOR, check_name

log = logging.getLogger(__name__)

SCOPES = ("infer", "manage", "metrics")
PREFIX = "ssk_"
FILE_FORMAT = 1
_TOKEN = re.compile(r"^ssk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
_SALT_BYTES = 16

# One message for an unknown id, a wrong secret and a revoked key: which one it was would
# tell an attacker whether an id exists.
INVALID_KEY = "invalid API key; fix: send a current key as 'Authorization: Bearer ssk_...'"
MISSING_KEY = (
    "missing API key; fix: send 'Authorization: Bearer ssk_...' (a key from "
    "`slimserve keys create`)"
)
MALFORMED_KEY = (
    "malformed API key; fix: send the whole key as printed by "
    "`slimserve keys create` (ssk_<12 hex digits>_<43 characters>)"
)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: the key's id and name (for rate limits and audit); never the secret."""

    key_id: str
    name: str
    scopes: frozenset[str]
    models: frozenset[str] | None = None  # None: every model

    def may_use(self, model: str) -> bool:
        """Whether the key's model allow-list (if any) holds `model` (a model name)."""
        return self.models is None or model in self.models

    @property
    def client(self) -> str:
        """A stable client identity for rate limits and logs: 'name/id'."""
        return f"{self.name}/{self.key_id}" if self.key_id else self.name


# The caller when no key file is configured: every scope, every model.
ANONYMOUS = Identity(key_id="", name="anonymous", scopes=frozenset(SCOPES))


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One key as stored: no secret, only its salt and salted hash (hex)."""

    key_id: str
    name: str
    scopes: tuple[str, ...]
    models: tuple[str, ...] | None
    salt: str
    hash: str
    created: str
    revoked: str | None = None

    def identity(self) -> Identity:
        models = None if self.models is None else frozenset(self.models)
        return Identity(self.key_id, self.name, frozenset(self.scopes), models)

    def public(self) -> dict[str, Any]:
        """What `keys list` shows: everything but the salt and the hash."""
        return {
            "id": self.key_id,
            "name": self.name,
            "scopes": list(self.scopes),
            "models": None if self.models is None else list(self.models),
            "created": self.created,
            "revoked": self.revoked,
        }


def hash_secret(salt: bytes, secret: str) -> bytes:
    """SHA-256(salt || secret): 32 bytes."""
    return hashlib.sha256(salt + secret.encode("ascii")).digest()


def bearer_token(header: str | None) -> str | None:
    """The token of an 'Authorization: Bearer <token>' value (HTTP header or gRPC metadata
    'authorization'); None when absent. Another scheme gives the whole value, which then
    fails as malformed."""
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else header.strip()


def parse_token(token: str) -> tuple[str, str]:
    """'ssk_<id>_<secret>' -> (id, secret); Unauthenticated when malformed."""
    match = _TOKEN.match(token)
    if match is None:
        raise Unauthenticated(MALFORMED_KEY)
    return match.group(1), match.group(2)


def check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise InvalidArgument(
            f"scopes {list(scopes)}: use one or more of {', '.join(SCOPES)} (comma-separated)"
        )
    return tuple(s for s in SCOPES if s in scopes)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# The key file.


class KeyStore:
    """The key file: read, create, list and revoke keys (used by the CLI and the server)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> dict[str, KeyRecord]:
        """{key id: record}; an absent file holds no keys. ConfigError when unreadable."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise ConfigError(f"{self.path}: cannot read the key file ({exc.strerror})") from None
        return _parse_file(self.path, text)

    def create(
        self, name: str, scopes: Sequence[str], models: Sequence[str] | None = None
    ) -> tuple[KeyRecord, str]:
        """Add a key; return its record and the token (the only time the secret exists)."""
        check_name(name, "key name")
        scope_tuple = check_scopes(scopes)
        model_tuple = None if models is None else tuple(check_name(m) for m in models)
        secret = secrets.token_urlsafe(32)  # 32 bytes -> 43 characters
        salt = secrets.token_bytes(_SALT_BYTES)
        with self._locked():
            records = self.read()
            key_id = _new_id(records)
            record = KeyRecord(
                key_id,
                name,
                scope_tuple,
                model_tuple,
                salt.hex(),
                hash_secret(salt, secret).hex(),
                _now(),
            )
            records[key_id] = record
            self._write(records)
        return record, f"{PREFIX}{key_id}_{secret}"

    def revoke(self, key_id: str) -> KeyRecord:
        """Mark a key revoked (kept in the file so audit lines still name it)."""
        with self._locked():
            records = self.read()
            record = records.get(key_id)
            if record is None:
                raise NotFound(f"no key with id {key_id!r} in {self.path}; see `keys list`")
            if record.revoked is None:
                record = replace(record, revoked=_now())
                records[key_id] = record
                self._write(records)
        return record

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on a side file, so read-modify-write cycles do not interleave."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, records: dict[str, KeyRecord]) -> None:
        data = {"format": FILE_FORMAT, "keys": [_record_dict(r) for r in records.values()]}
        write_private(self.path, (json.dumps(data, indent=2) + "\n").encode())


def write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically with mode 0600 (created so, never widened)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _new_id(records: dict[str, KeyRecord]) -> str:
    while True:
        key_id = secrets.token_hex(6)
        if key_id not in records:
            return key_id


def _record_dict(record: KeyRecord) -> dict[str, Any]:
    """What the key file holds: the public fields, and the salt and hash."""
    return {**record.public(), "salt": record.salt, "hash": record.hash}


def _parse_file(path: Path, text: str) -> dict[str, KeyRecord]:
    try:
        data = json.loads(text)
        if data.get("format") != FILE_FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FILE_FORMAT}")
        records = [_parse_record(item) for item in data["keys"]]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{path}: not a valid key file ({exc}); fix: restore it from a backup, or create "
            "a new one with `slimserve keys create`"
        ) from None
    return {r.key_id: r for r in records}


def _parse_record(item: dict[str, Any]) -> KeyRecord:
    models = item.get("models")
    salt, digest = str(item["salt"]), str(item["hash"])
    bytes.fromhex(salt), bytes.fromhex(digest)  # ValueError when not hex
    return KeyRecord(
        key_id=str(item["id"]),
        name=str(item["name"]),
        scopes=check_scopes([str(s) for s in item["scopes"]]),
        models=None if models is None else tuple(str(m) for m in models),
        salt=salt,
        hash=digest,
        created=str(item.get("created", "")),
        revoked=item.get("revoked"),
    )


# ---------------------------------------------------------------------------------------------
# The server side.

# Compared against when the id is unknown, so that path costs the same as a wrong secret.
_DUMMY_SALT = secrets.token_bytes(_SALT_BYTES)
_DUMMY_HASH = hash_secret(_DUMMY_SALT, "x" * 43)


@dataclass(frozen=True, slots=True)
class _Entry:
    """A key record decoded once per file read, so a request pays one hash and one compare."""

    salt: bytes
    digest: bytes
    identity: Identity
    revoked: bool

    @classmethod
    def of(cls, record: KeyRecord) -> _Entry:
        salt, digest = bytes.fromhex(record.salt), bytes.fromhex(record.hash)
        return cls(salt, digest, record.identity(), record.revoked is not None)


class Authenticator:
    """Checks bearer tokens against a key file, re-read when it changes.

    Thread-safe: transports call it from the event loop and from worker threads.
    """

    def __init__(self, path: Path) -> None:
        self.store = KeyStore(path)
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int] | None = None
        self._entries: dict[str, _Entry] = {}
        self._refresh(initial=True)

    @property
    def path(self) -> Path:
        return self.store.path

    def authenticate(self, bearer_token: str | None) -> Identity:
        """The identity behind a token (without 'Bearer '); Unauthenticated otherwise."""
        if not bearer_token:
            raise Unauthenticated(MISSING_KEY)
        key_id, secret = parse_token(bearer_token)
        self._refresh()
        entry = self._entries.get(key_id)
        salt, expected = (entry.salt, entry.digest) if entry else (_DUMMY_SALT, _DUMMY_HASH)
        matches = compare_digest(hash_secret(salt, secret), expected)
        if entry is None or not matches or entry.revoked:
            raise Unauthenticated(INVALID_KEY)
        return entry.identity

    def authorize(self, identity: Identity, scope: str, model: str | None = None) -> None:
        """PermissionDenied unless the identity has `scope` (and may use `model`)."""
        authorize(identity, scope, model)

    def _refresh(self, *, initial: bool = False) -> None:
        """Re-read the key file when its (inode, mtime, size) changed since the last read."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if initial:
                raise ConfigError(
                    f"{self.path}: the API key file does not exist; fix: create a key with "
                    f"`slimserve keys create NAME --scopes infer --keys-file {self.path}`"
                ) from None
            st = None
        signature = None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)
        if signature == self._signature and not initial:
            return
        with self._lock:
            if signature != self._signature or initial:
                self._load(signature, initial=initial, mode=None if st is None else st.st_mode)

    def _load(
        self, signature: tuple[int, int, int] | None, *, initial: bool, mode: int | None
    ) -> None:
        try:
            records = self.store.read()
        except ConfigError:
            if initial:
                raise
            # Keep the last good keys: the CLI writes atomically, so this is a hand edit in
            # progress; refusing every request meanwhile would be an outage.
            log.error("API key file %s is invalid; keeping the keys read before", self.path)
            self._signature = signature
            return
        if mode is not None and mode & 0o077:
            log.warning(
                "API key file %s is readable by others (mode %o); chmod 600 it",
                self.path,
                mode & 0o777,
            )
        self._entries = {k: _Entry.of(r) for k, r in records.items()}
        self._signature = signature
        if not initial:
            log.info("API key file %s re-read: %d keys", self.path, len(records))


def authorize(identity: Identity, scope: str, model: str | None = None) -> None:
    """PermissionDenied unless `identity` has `scope` and, when given, may use `model`.

    `model` may be a served name 'NAME:VARIANT'; the allow-list holds model names.
    """
    if scope not in identity.scopes:
        raise PermissionDenied(
            f"API key '{identity.name}' ({identity.key_id}) lacks the '{scope}' scope; fix: "
            f"use a key created with --scopes {scope}"
        )
    if model is not None and identity.models is not None:
        name = model.partition(VARIANT_SEPARATOR)[0]
        if name not in identity.models:
            raise PermissionDenied(
                f"API key '{identity.name}' ({identity.key_id}) may not use model '{name}'; "
                "fix: use a key whose --models list includes it"
            )
