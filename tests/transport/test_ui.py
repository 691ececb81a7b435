"""The console's JSON endpoints and static files in process (httpx.ASGITransport over the real
Engine and app): scopes and model allow-lists, the live sample's figures moving with requests,
reports, and refusals that name what was wrong."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.security.keys import KeyStore
from slimserve.testing import ECHO_ROW, echo_model
from slimserve.transport.asgi import create_app
from slimserve.transport.ui.routes import _STATIC, CSP

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a: an echo model with variants cheap (a degrade target) and lossy (over budget);
    b: another echo model; a/reports/1/report.json (no plot)."""
    root = tmp_path_factory.mktemp("ui") / "models"
    echo_model(root, "a", {"cheap": 0.995, "lossy": 0.9})
    echo_model(root, "b")
    report = {"model": "a", "version": 1, "original": {"latency_ms_batch1": 0.02}, "variants": []}
    (root / "a" / "reports" / "1").mkdir(parents=True)
    (root / "a" / "reports" / "1" / "report.json").write_text(json.dumps(report))
    return root


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    store = KeyStore(tmp_path_factory.mktemp("ui-keys") / "keys.json")
    return {
        "path": str(store.path),
        "all": store.create("all", ["infer", "metrics", "manage"])[1],
        "infer_a": store.create("infer-a", ["infer"], models=["a"])[1],
        "metrics": store.create("metrics", ["metrics"])[1],
    }


def run(repo: Path, body: Any, **options: Any) -> Any:
    async def main() -> Any:
        settings = Settings(repository=repo, **options)
        engine = build_engine(settings)
        await engine.start(wait=True)
        transport = httpx.ASGITransport(app=create_app(engine, settings))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                return await body(client)
        finally:
            await engine.stop()

    return asyncio.run(main())


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_static_files_are_shipped_and_served_with_a_strict_csp(repo: Path):
    async def body(client: httpx.AsyncClient) -> None:
        for name in _STATIC:
            r = await client.get(f"/ui/static/{name}")
            assert r.status_code == 200, name
            assert r.headers["content-security-policy"] == CSP.decode()
        page = await client.get("/ui")
        assert page.status_code == 200 and "<h1>slimserve</h1>" in page.text
        for path in ("/ui/static/nope.js", "/ui/static/%2e%2e%2fkeys.json", "/ui/x", "/ui/api/x"):
            r = await client.get(path)
            assert r.status_code == 404 and "console" in r.json()["error"], path
        r = await client.post("/ui/api/models")
        assert r.status_code == 405 and r.headers["allow"] == "GET"

    run(repo, body)


def test_scopes_and_model_lists_apply_to_every_endpoint(repo: Path, keys: dict[str, str]):
    async def body(client: httpx.AsyncClient) -> None:
        for path in ("session", "models", "live", "reports", "reports/a/1/plot"):
            r = await client.get(f"/ui/api/{path}")
            assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
        session = (await client.get("/ui/api/session", headers=bearer(keys["infer_a"]))).json()
        assert session["scopes"] == ["infer"] and session["models"] == ["a"]
        assert session["keys_required"] is True
        models = await client.get("/ui/api/models", headers=bearer(keys["infer_a"]))
        assert [m["name"] for m in models.json()] == ["a"]
        for path in ("live", "reports", "reports/a/1/plot"):
            r = await client.get(f"/ui/api/{path}", headers=bearer(keys["infer_a"]))
            assert r.status_code == 403 and "metrics" in r.json()["error"], path
        r = await client.get("/ui/api/models", headers=bearer(keys["metrics"]))
        assert r.status_code == 403 and "infer" in r.json()["error"]
        live = await client.get("/ui/api/live", headers=bearer(keys["metrics"]))
        assert live.status_code == 200 and live.headers["cache-control"] == "no-store"

    run(repo, body, api_keys_file=Path(keys["path"]))


def test_models_show_state_profiles_and_degrade_targets(repo: Path):
    async def body(client: httpx.AsyncClient) -> list[dict[str, Any]]:
        session = (await client.get("/ui/api/session")).json()
        assert session["keys_required"] is False and "manage" in session["scopes"]
        return (await client.get("/ui/api/models")).json()

    models = run(repo, body)
    a = models[0]
    assert a["name"] == "a" and a["state"] == "READY" and a["default_version"] == 1
    assert a["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 2]}]
    units = {u["variant"]: u for u in a["units"]}
    assert set(units) == {None, "cheap", "lossy"}
    assert units["cheap"]["degrade_target"] and not units["lossy"]["degrade_target"]
    assert units["cheap"]["recipe"] == "int8"
    assert units["cheap"]["profile"] == {"latency_ms_batch1": 0.01, "agreement": 0.995}
    assert all(u["state"] == "READY" and u["resident"] for u in units.values())
    assert units[None]["resident_bytes"] == 4096 and units[None]["breaker"] == "closed"


def test_live_counters_move_with_requests(repo: Path):
    async def body(client: httpx.AsyncClient) -> tuple[dict[str, Any], dict[str, Any]]:
        before = (await client.get("/ui/api/live")).json()
        for _ in range(3):
            assert (await client.post("/v2/models/a/infer", json=ECHO_ROW)).status_code == 200
        bad = {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]
        }
        assert (await client.post("/v2/models/a/infer", json=bad)).status_code == 400
        return before, (await client.get("/ui/api/live")).json()

    before, after = run(repo, body)
    assert after["time_s"] >= before["time_s"]
    assert after["memory_budget_bytes"] > 0 and after["resident_bytes"] >= 3 * 4096
    unit = next(u for u in after["units"] if (u["model"], u["variant"]) == ("a", ""))
    assert unit["requests"] == 4 and unit["errors"] == 1  # the 400 is counted, not timed
    latency = unit["histograms"]["latency"]
    assert latency["count"] == 3 and latency["le"][-1] is None  # +Inf
    assert latency["counts"][-1] == 3 and unit["histograms"]["batch"]["count"] >= 1


def test_reports_are_listed_and_a_missing_plot_is_a_404(repo: Path):
    async def body(client: httpx.AsyncClient) -> list[dict[str, Any]]:
        for path in ("reports/a/1/plot", "reports/a/x/plot", "reports/..%2F..%2Fetc/1/plot"):
            r = await client.get(f"/ui/api/{path}")
            assert r.status_code in (400, 404), path
            assert "report" in r.json()["error"] or "model" in r.json()["error"]
        return (await client.get("/ui/api/reports")).json()

    reports = run(repo, body)
    assert reports == [
        {
            "model": "a",
            "version": "1",
            "plot": False,
            "original": {"latency_ms_batch1": 0.02},
            "variants": [],
            "earlier_variants": None,
        }
    ]
