"""Models resident under a byte budget: load on demand, single flight, eviction, pinning."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import pytest

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.errors import ResourceExhausted, Unavailable
from slimserve.repository import Repository
from slimserve.runtimes.base import Runtime
from slimserve.serving.engine import Engine
from slimserve.testing import FakeClock
from slimserve.types import InferRequest

YAML = """\
backend: python
inputs:  [{name: x, datatype: FP32, shape: [-1, 1]}]
outputs: [{name: y, datatype: FP32, shape: [-1, 1]}]
batching: {max_batch_size: 4, max_queue_delay_ms: 1}
"""
LOADS: list[str] = []
GATES: dict[str, threading.Event] = {}


class SizedRuntime(Runtime):
    """Holds `size` bytes (from its artifact); y = x + size. Loads are counted."""

    def load(self) -> None:
        LOADS.append(self.target.model)
        self.size = int((self.target.path / "weights.txt").read_text().strip())

    def infer(self, inputs):
        gate = GATES.get(self.target.model)
        if gate is not None:
            gate.wait(5)
        return {"y": inputs["x"] + self.size}

    def unload(self) -> None:
        self.size = 0

    def memory_bytes(self) -> int:
        return self.size

    def warmup(self) -> None:
        pass


def repo(root: Path, sizes: dict[str, int]) -> Path:
    for name, size in sizes.items():
        (root / name / "1").mkdir(parents=True)
        (root / name / "model.yaml").write_text(YAML)
        # The artifact's size on disk is the pre-load estimate, so make it match.
        (root / name / "1" / "weights.txt").write_text(str(size).ljust(size))
    return root


def run(root: Path, body, **settings):
    LOADS.clear()

    async def main():
        s = Settings(repository=root, load_models=[], **settings)
        # A clock that ticks once per reading: every load costs the same (GDSF weighs load
        # time, which a loaded machine makes random) and recency stays strictly ordered.
        engine = build_engine(
            s,
            repository=Repository(root),
            runtime_factory=lambda t, o: SizedRuntime(t, o),
            clock=FakeClock(tick=1.0),
        )
        await engine.start(wait=True)
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


def req(name: str) -> InferRequest:
    return InferRequest(name, {"x": np.zeros((1, 1), np.float32)})


def resident(engine: Engine) -> set[str]:
    return {u.target.model for u in engine.models.resident_units()}


def test_loads_on_first_request_and_concurrent_requests_share_one_load(tmp_path):
    root = repo(tmp_path, {"a": 40})

    async def body(engine: Engine):
        assert resident(engine) == set()
        outs = await asyncio.gather(*(engine.infer(req("a")) for _ in range(20)))
        return outs

    outs = run(root, body, memory_budget_bytes=100)
    assert LOADS == ["a"]
    assert all(o.outputs["y"][0, 0] == 40 for o in outs)


@pytest.mark.parametrize("policy", ["lru", "lfu", "gdsf"])
def test_eviction_keeps_resident_bytes_under_the_budget(tmp_path, policy):
    root = repo(tmp_path, {"a": 40, "b": 40, "c": 40})

    async def body(engine: Engine):
        for name in ["a", "a", "b", "a", "c"]:
            await engine.infer(req(name))
            assert engine.models.used_bytes <= 100
        return resident(engine), engine.models.evictions

    held, evictions = run(root, body, memory_budget_bytes=100, eviction_policy=policy)
    assert evictions == 1 and "c" in held and len(held) == 2
    assert "a" in held  # used most, and most recently before c, under every policy


def test_pinned_models_stay_and_a_model_in_use_is_not_evicted(tmp_path):
    root = repo(tmp_path, {"pinned": 40, "busy": 40, "new": 40})
    GATES["busy"] = threading.Event()

    async def body(engine: Engine):
        await engine.infer(req("pinned"))
        in_flight = asyncio.ensure_future(engine.infer(req("busy")))
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="pinned, serving requests"):
            await engine.infer(req("new"))  # nothing evictable
        GATES["busy"].set()
        await in_flight
        await engine.infer(req("new"))  # now "busy" can go
        return resident(engine)

    try:
        held = run(root, body, memory_budget_bytes=100, pin_models=["pinned"])
    finally:
        GATES.pop("busy")
    assert held == {"pinned", "new"}


def test_a_model_larger_than_the_budget_is_refused_with_figures(tmp_path):
    root = repo(tmp_path, {"huge": 500, "small": 10})

    async def body(engine: Engine):
        with pytest.raises(Unavailable, match=r"needs about .* MiB but the memory budget"):
            await engine.infer(req("huge"))
        return await engine.infer(req("small"))

    assert run(root, body, memory_budget_bytes=100).outputs["y"][0, 0] == 10


def test_evicted_model_reloads_on_its_next_request(tmp_path):
    root = repo(tmp_path, {"a": 60, "b": 60})

    async def body(engine: Engine):
        for name in ["a", "b", "a"]:
            await engine.infer(req(name))
        index = {r.name: r.state for r in engine.repository_index()}
        return index

    index = run(root, body, memory_budget_bytes=100, eviction_policy="lru")
    assert LOADS == ["a", "b", "a"]
    assert index == {"a": "READY", "b": "UNLOADED"}
