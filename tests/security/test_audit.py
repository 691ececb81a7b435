"""The audit log: one JSON line per management action, to a file and a logger, no secrets."""

from __future__ import annotations

import json
import logging
import stat
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from slimserve.security.audit import AuditLog
from slimserve.security.keys import ANONYMOUS, Authenticator, KeyStore

WHEN = datetime(2026, 11, 22, 5, 30, 0, 123000, tzinfo=UTC)


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lines_name_who_what_when_outcome(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    keys_file = tmp_path / "keys.json"
    _, token = KeyStore(keys_file).create("ops", ["manage"])
    identity = Authenticator(keys_file).authenticate(token)
    path = tmp_path / "audit" / "audit.log"
    audit = AuditLog(path, clock=lambda: WHEN)
    with caplog.at_level(logging.INFO, logger="slimserve.audit"):
        audit.record(identity, "load", "mlp", version=2)
        audit.record(None, "unload", "mlp", outcome="denied", detail="model control is off")
        audit.record(ANONYMOUS, "repository_index")
    audit.close()
    first, second, third = _lines(path)
    assert first == {
        "time": "2026-11-22T05:30:00.123+00:00",
        "who": {"name": "ops", "key_id": identity.key_id},
        "action": "load",
        "model": "mlp",
        "outcome": "ok",
        "version": 2,
    }
    assert second["who"] == {"name": "anonymous", "key_id": None}
    assert second["outcome"] == "denied" and second["detail"] == "model control is off"
    assert third["who"]["name"] == "anonymous" and third["model"] is None
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == "slimserve.audit"]
    assert logged == [first, second, third]
    secret = token[17:]
    assert secret not in path.read_text() and secret not in caplog.text


def test_appends_across_instances_and_threads(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    AuditLog(path).record(None, "load", "a")
    audit = AuditLog(path)
    threads = [
        threading.Thread(target=lambda i=i: audit.record(None, "unload", f"m{i}")) for i in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = _lines(path)  # every line whole JSON: no interleaving
    assert len(lines) == 9 and lines[0]["model"] == "a"
    assert {line["model"] for line in lines[1:]} == {f"m{i}" for i in range(8)}


def test_logger_only_and_unknown_action(caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog()
    with caplog.at_level(logging.INFO, logger="slimserve.audit"):
        entry = audit.record(None, "repository_change", "m", outcome="error")
    assert json.loads(caplog.records[-1].getMessage()) == entry
    with pytest.raises(ValueError, match="unknown audit action 'delete_all'"):
        audit.record(None, "delete_all")
