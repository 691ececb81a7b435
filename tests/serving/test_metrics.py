"""Prometheus metrics and health, read from a running engine."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.errors import InvalidArgument
from slimserve.repository import Repository
from slimserve.types import InferRequest
from tests.serving.test_engine import factory, make_repo, x


def samples(text: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_requests_outcomes_batches_and_state_are_exported(tmp_path):
    root = make_repo(tmp_path)

    async def main():
        engine = build_engine(
            Settings(repository=root), repository=Repository(root), runtime_factory=factory
        )
        await engine.start(wait=True)
        await asyncio.gather(*(engine.infer(InferRequest("scale", x(1))) for _ in range(3)))
        await engine.infer(InferRequest("scale:half", x(2)))
        with pytest.raises(InvalidArgument):
            await engine.infer(InferRequest("scale", x(9)))
        with pytest.raises(InvalidArgument):
            await engine.infer(InferRequest("x" * 5000, x(1)))
        text, content_type = engine.metrics_text()
        health = engine.health()
        await engine.stop()
        return samples(text), content_type, health

    s, content_type, health = asyncio.run(main())
    assert content_type.startswith("text/plain")
    ok = ("model", "scale"), ("outcome", "success"), ("variant", "")
    assert s[("slimserve_requests_total", ok)] == 3
    half = ("model", "scale"), ("outcome", "success"), ("variant", "half")
    assert s[("slimserve_requests_total", half)] == 1
    bad = ("model", "scale"), ("outcome", "invalid_argument"), ("variant", "")
    assert s[("slimserve_requests_total", bad)] == 1
    # An unknown or hostile name never becomes a label of its own.
    assert not any(len(dict(labels).get("model", "")) > 100 for _, labels in s)
    rows = sum(v for (n, _labels), v in s.items() if n == "slimserve_batch_size_rows_sum")
    assert rows == 5
    assert s[("slimserve_resident_models", ())] == 3  # scale 1, 2, 2:half; bad/1 failed
    assert s[("slimserve_resident_bytes", ())] > 0
    assert health.status == "degraded" and health.failed_units == ("bad/1",)


def test_the_grafana_dashboard_queries_only_exported_metrics(tmp_path):
    import json
    import re
    from pathlib import Path

    root = make_repo(tmp_path)
    yaml_path = root / "scale" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text() + "cache: {max_bytes: 10000}\n")

    async def main():
        engine = build_engine(
            Settings(repository=root), repository=Repository(root), runtime_factory=factory
        )
        await engine.start(wait=True)
        await engine.infer(InferRequest("scale", x(1)))
        text = engine.metrics_text()[0].decode()
        await engine.stop()
        return text

    exported = {f.name for f in text_string_to_metric_families(asyncio.run(main()))}
    dashboard = Path(__file__).parents[2] / "deploy" / "grafana-dashboard.json"
    panels = json.loads(dashboard.read_text())["panels"]
    assert len(panels) >= 8
    for panel in panels:
        for target in panel["targets"]:
            for name in re.findall(r"slimserve_[a-z_]+", target["expr"]):
                base = re.sub(r"_(total|bucket|sum|count)$", "", name)
                assert base in exported, f"panel {panel['title']!r} uses unknown metric {name}"
