"""Admission through the engine: rate limits, concurrency, breakers, degradation."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.errors import ResourceExhausted, Unavailable
from slimserve.repository import Repository
from slimserve.runtimes.base import Runtime
from slimserve.serving.engine import Engine
from slimserve.testing import FakeClock
from slimserve.types import InferRequest, RequestControls

BASE = """\
backend: python
inputs:  [{name: x, datatype: FP32, shape: [-1, 1]}]
outputs: [{name: y, datatype: FP32, shape: [-1, 1]}]
batching: {max_batch_size: 4, max_queue_delay_ms: 0}
"""
FAULTY: set[str] = set()  # units (keys) that fail while listed
GATE = threading.Event()


class TagRuntime(Runtime):
    """y = x + tag, the tag read from the artifact; fails while its key is in FAULTY."""

    def load(self) -> None:
        self.tag = float((self.target.path / "tag.txt").read_text())

    def infer(self, inputs):
        if self.target.key in FAULTY:
            raise RuntimeError("injected fault")
        if self.tag == 99:
            GATE.wait(5)
        return {"y": inputs["x"] + self.tag}

    def unload(self) -> None:
        pass

    def memory_bytes(self) -> int:
        return 1

    def warmup(self) -> None:
        pass


def repo(root: Path, extra: str = "", variant_profile: str | None = None) -> Path:
    (root / "m" / "1").mkdir(parents=True)
    (root / "m" / "model.yaml").write_text(BASE + extra)
    (root / "m" / "1" / "tag.txt").write_text("1")
    if variant_profile is not None:
        v = root / "m" / "1" / "variants" / "cheap"
        v.mkdir(parents=True)
        (v / "tag.txt").write_text("2")
        (v / "variant.yaml").write_text(variant_profile)
    return root


def run(root: Path, body, clock: FakeClock | None = None, **settings):
    async def main():
        s = Settings(repository=root, **settings)
        engine = build_engine(
            s,
            repository=Repository(root),
            runtime_factory=lambda t, o: TagRuntime(t, o),
            clock=clock or FakeClock(),
        )
        await engine.start(wait=True)
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


def req(client: str | None = None, **controls: Any) -> InferRequest:
    x = {"x": np.zeros((1, 1), np.float32)}
    return InferRequest("m", x, client=client, controls=RequestControls(**controls))


def test_model_rate_limit_answers_429_with_retry_after(tmp_path):
    root = repo(tmp_path, "limits: {rate: 2, burst: 2}\n")
    clock = FakeClock()

    async def body(engine: Engine):
        await engine.infer(req())
        await engine.infer(req())
        with pytest.raises(ResourceExhausted) as info:
            await engine.infer(req())
        clock.advance(0.5)  # one token back at 2/s
        await engine.infer(req())
        return info.value

    error = run(root, body, clock)
    assert "rate limit" in error.message and error.retry_after_s == pytest.approx(0.5)


def test_client_rate_limits_are_per_identity(tmp_path):
    root = repo(tmp_path)

    async def body(engine: Engine):
        await engine.infer(req(client="alice"))
        with pytest.raises(ResourceExhausted, match="client 'alice'"):
            await engine.infer(req(client="alice"))
        return await engine.infer(req(client="bob"))

    assert run(root, body, client_rate_limit=1, client_burst=1).outputs["y"][0, 0] == 1


def test_concurrency_limit_sheds_fast_with_503(tmp_path):
    root = repo(tmp_path, "limits: {max_concurrency: 1}\n")
    (root / "m" / "1" / "tag.txt").write_text("99")  # blocks on GATE
    GATE.clear()

    async def body(engine: Engine):
        first = asyncio.ensure_future(engine.infer(req()))
        await asyncio.sleep(0.05)
        with pytest.raises(Unavailable, match="in flight") as info:
            await engine.infer(req())
        GATE.set()
        await first
        return info.value

    assert run(root, body).retry_after_s


def test_breaker_opens_fails_fast_and_recovers_through_half_open(tmp_path):
    root = repo(tmp_path, "breaker: {consecutive_failures: 2, open_s: 10, probe_calls: 1}\n")
    clock = FakeClock()

    async def body(engine: Engine):
        FAULTY.add("m/1")
        for _ in range(2):
            with pytest.raises(Exception, match="injected fault"):
                await engine.infer(req())
        with pytest.raises(Unavailable, match="circuit breaker is open"):
            await engine.infer(req())  # fails fast, the model is not called
        FAULTY.discard("m/1")
        clock.advance(11)  # half-open: one probe goes through and closes it
        ok = await engine.infer(req())
        return ok, engine.admission.breaker_state(engine.models.find("m", None, None))

    try:
        ok, state = run(root, body, clock)
    finally:
        FAULTY.clear()
    assert ok.outputs["y"][0, 0] == 1 and state.value == "closed"


PROFILE = "profile: {latency_ms_batch1: 0.1, agreement: 0.995}\n"


def test_open_breaker_degrades_to_a_cheaper_variant_when_allowed_and_returns(tmp_path):
    root = repo(
        tmp_path,
        "breaker: {consecutive_failures: 1, open_s: 5, probe_calls: 1}\n"
        "degrade: {allow: true, max_quality_loss: 1.0, recover_s: 3}\n",
        PROFILE,
    )
    clock = FakeClock()

    async def body(engine: Engine):
        FAULTY.add("m/1")
        with pytest.raises(Exception, match="injected fault"):
            await engine.infer(req())
        degraded = await engine.infer(req())
        refused = None
        try:
            await engine.infer(req(degrade=False))
        except Unavailable as exc:
            refused = exc
        FAULTY.discard("m/1")
        clock.advance(6)  # breaker may probe again; pressure is gone
        still = await engine.infer(req())  # hysteresis: calm has only begun
        clock.advance(4)
        back = await engine.infer(req())
        return degraded, refused, still, back

    try:
        degraded, refused, still, back = run(root, body, clock)
    finally:
        FAULTY.clear()
    assert degraded.variant == "cheap" and degraded.parameters["degraded"] is True
    assert degraded.outputs["y"][0, 0] == 2
    assert refused is not None  # a request that does not allow it fails fast instead
    assert still.variant == "cheap"
    assert back.variant is None and back.outputs["y"][0, 0] == 1


def test_a_variant_beyond_the_quality_budget_is_not_used(tmp_path):
    root = repo(
        tmp_path,
        "breaker: {consecutive_failures: 1}\ndegrade: {allow: true, max_quality_loss: 0.1}\n",
        PROFILE,  # 0.5 points lost > 0.1 allowed
    )

    async def body(engine: Engine):
        FAULTY.add("m/1")
        with pytest.raises(Exception, match="injected fault"):
            await engine.infer(req())
        with pytest.raises(Unavailable, match="circuit breaker"):
            await engine.infer(req())

    try:
        run(root, body)
    finally:
        FAULTY.clear()


def test_priority_requests_go_first(tmp_path):
    root = repo(tmp_path)
    yaml_path = root / "m" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("max_batch_size: 4", "max_batch_size: 1"))
    order: list[str] = []

    async def body(engine: Engine):
        async def call(tag: str, priority: int):
            await engine.infer(req(priority=priority))
            order.append(tag)

        tasks = [asyncio.ensure_future(call(f"low{i}", 0)) for i in range(4)]
        tasks.append(asyncio.ensure_future(call("high", 5)))
        await asyncio.gather(*tasks)

    run(root, body)
    assert order.index("high") < order.index("low3")


def test_a_failing_original_falls_back_even_to_a_variant_slower_than_it_was(tmp_path):
    # The original measured ~microseconds per row; the variant's profile says 1 s. Broken,
    # the original costs "infinitely" much: the variant beats a 503.
    slow_profile = "profile: {latency_ms_batch1: 1000, agreement: 0.99}\n"
    root = repo(
        tmp_path,
        "breaker: {consecutive_failures: 1, open_s: 5, probe_calls: 1}\n"
        "degrade: {allow: true, max_quality_loss: 1.0, recover_s: 3}\n",
        slow_profile,
    )

    async def body(engine: Engine):
        for _ in range(4):  # the original's cost is now measured
            assert (await engine.infer(req())).variant is None
        FAULTY.add("m/1")
        with pytest.raises(Exception, match="injected fault"):
            await engine.infer(req())
        return await engine.infer(req())

    try:
        fallback = run(root, body)
    finally:
        FAULTY.clear()
    assert fallback.variant == "cheap" and fallback.parameters["degraded"] is True


def test_half_open_breaker_with_its_probe_out_sends_degradable_requests_to_the_variant(
    tmp_path,
):
    root = repo(
        tmp_path,
        "breaker: {consecutive_failures: 1, open_s: 5, probe_calls: 1}\n"
        "degrade: {allow: false, max_quality_loss: 1.0, recover_s: 0}\n",
        PROFILE,
    )
    (tmp_path / "m" / "1" / "tag.txt").write_text("99")  # the original waits for GATE
    clock = FakeClock()

    async def body(engine: Engine):
        FAULTY.add("m/1")
        with pytest.raises(Exception, match="injected fault"):
            await engine.infer(req())
        FAULTY.discard("m/1")
        clock.advance(6)  # due for a probe
        GATE.clear()
        probe = asyncio.ensure_future(engine.infer(req()))  # the one probe, held in the model
        await asyncio.sleep(0)
        refused = None
        try:
            await engine.infer(req())
        except Unavailable as exc:
            refused = exc
        fallback = await engine.infer(req(degrade=True))
        GATE.set()
        return refused, fallback, await probe

    try:
        refused, fallback, probed = run(root, body, clock)
    finally:
        FAULTY.clear()
        GATE.set()
    assert refused is not None  # no degradation asked: fail fast while the probe is out
    assert fallback.variant == "cheap" and fallback.parameters["degraded"] is True
    assert probed.variant is None and probed.outputs["y"][0, 0] == 99
