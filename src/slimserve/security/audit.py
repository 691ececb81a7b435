"""The audit log: one JSON line per management action (who, what, which model, when, outcome).

Lines go to a file (appended, mode 0600, one `write` per line so concurrent writers do not
interleave) and to the `slimserve.audit` logger. They carry the key's name and id, never a
secret: `record` takes an `Identity`, which holds none, and `detail` is the caller's text,
which must not hold one either (the engine passes model names and error messages).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from slimserve.security.keys import Identity

logger = logging.getLogger("slimserve.audit")

# Actions the engine and transports record.
# "authorize": a management call refused for its key (missing, invalid, or without the scope).
ACTIONS = frozenset(
    {"load", "unload", "repository_index", "repository_change", "keys_change", "authorize"}
)


def utc_now() -> datetime:
    return datetime.now(UTC)


class AuditLog:
    """Appends audit lines; `path=None` logs to the `slimserve.audit` logger only."""

    def __init__(self, path: Path | None = None, clock: Callable[[], datetime] = utc_now) -> None:
        self.path = None if path is None else Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._fd: int | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
            self._fd = os.open(self.path, flags, 0o600)

    def record(
        self,
        identity: Identity | None,
        action: str,
        model: str | None = None,
        *,
        outcome: str = "ok",
        detail: str | None = None,
        version: int | None = None,
    ) -> dict[str, Any]:
        """Write one line and return it as a dict. `identity=None` is 'anonymous'."""
        entry = self._entry(identity, action, model, outcome, detail, version)
        line = orjson.dumps(entry) + b"\n"
        with self._lock:
            if self._fd is not None:
                os.write(self._fd, line)
        logger.info("%s", line[:-1].decode())
        return entry

    def _entry(
        self,
        identity: Identity | None,
        action: str,
        model: str | None,
        outcome: str,
        detail: str | None,
        version: int | None,
    ) -> dict[str, Any]:
        if action not in ACTIONS:
            raise ValueError(f"unknown audit action {action!r}; one of {sorted(ACTIONS)}")
        who = (
            {"name": "anonymous", "key_id": None}
            if identity is None or not identity.key_id
            else {"name": identity.name, "key_id": identity.key_id}
        )
        entry: dict[str, Any] = {
            "time": self._clock().isoformat(timespec="milliseconds"),
            "who": who,
            "action": action,
            "model": model,
            "outcome": outcome,
        }
        if version is not None:
            entry["version"] = version
        if detail:
            entry["detail"] = detail
        return entry

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
