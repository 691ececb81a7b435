"""GET /v1/models and /v1/models/{id}: every servable name of the embedding and language models.

A model is listed as 'NAME' and each variant of its default version as 'NAME:VARIANT' (the
repository's variant addressing, usable as `model` in any request), with `parent`: NAME (as
vLLM marks adapters); `created` is when the unit's folder was written. Models of other tasks
are left out: no OpenAI route serves them (they stay on the v2 API). A key restricted to some
models sees only those.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from slimserve.errors import NotFound, SlimserveError
from slimserve.security.keys import Identity, authorize
from slimserve.serving.engine import Engine
from slimserve.serving.llm import EMBEDDING, TEXT_GENERATION
from slimserve.serving.models import ModelEntry


def models_reply(engine: Engine, token: str | None, wanted: str | None) -> dict[str, Any]:
    """The list (wanted None) or one model's row; an unknown one is NOT_FOUND."""
    identity = engine.authorize(token, "infer", wanted)
    rows = [
        m
        for m in listing(engine)
        if (wanted is None or m["id"] == wanted) and _may_use(identity, m["id"])
    ]
    if wanted is None:
        return {"object": "list", "data": rows}
    if not rows:
        raise NotFound(f"model '{wanted}' is not an embedding or language model here")
    return rows[0]


def listing(engine: Engine) -> list[dict[str, Any]]:
    rows = []
    for name in engine.repository.model_names():
        with contextlib.suppress(SlimserveError):
            entry = engine.models.entry(name)
            config = entry.config
            if config is not None and config.task in (EMBEDDING, TEXT_GENERATION):
                rows += _model_rows(entry)
    return rows


def _model_rows(entry: ModelEntry) -> list[dict[str, Any]]:
    version = entry.default_version()
    units = [u for (v, _), u in entry.units.items() if v == version]
    rows = []
    for unit in sorted(units, key=lambda u: u.target.variant or ""):
        variant = unit.target.variant
        rows.append(
            {
                "id": entry.name if variant is None else f"{entry.name}:{variant}",
                "object": "model",
                "created": _created(unit.target.path),
                "owned_by": "slimserve",
                "parent": None if variant is None else entry.name,
            }
        )
    return rows


def _created(path: Path) -> int:
    """When the unit's folder was written (Unix seconds; 0 if unreadable)."""
    try:
        return int(path.stat().st_mtime)
    except OSError:
        return 0


def _may_use(identity: Identity, model: str) -> bool:
    """Whether a key restricted to some models may see `model` in the listing."""
    try:
        authorize(identity, "infer", model)
    except SlimserveError:
        return False
    return True
