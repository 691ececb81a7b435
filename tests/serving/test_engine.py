"""The engine over a real repository folder, with a small in-test runtime."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.errors import (
    DeadlineExceeded,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from slimserve.repository import Repository
from slimserve.repository.store import Target
from slimserve.runtimes.base import Runtime, RuntimeOptions
from slimserve.serving.engine import Engine
from slimserve.types import InferRequest, RequestControls, TensorSpec

YAML = """\
backend: python
inputs:  [{name: x, datatype: FP32, shape: [-1, 2]}]
outputs: [{name: y, datatype: FP32, shape: [-1, 2]}, {name: s, datatype: FP32, shape: [-1]}]
batching: {max_batch_size: 4, max_queue_delay_ms: 1}
"""


class ScaleRuntime(Runtime):
    """y = x * factor, where factor is read from the artifact file `factor.txt`."""

    def load(self) -> None:
        text = (self.target.path / "factor.txt").read_text()
        if text == "fail":
            raise ModelLoadError("factor.txt says fail")
        self.factor = float(text)

    def infer(self, inputs):
        x = inputs["x"]
        return {"y": x * self.factor, "s": x.sum(axis=1)}

    def unload(self) -> None:
        self.factor = None

    def memory_bytes(self) -> int:
        return 8


def factory(target: Target, options: RuntimeOptions) -> Runtime:
    return ScaleRuntime(target, options)


def make_repo(root: Path) -> Path:
    for name, versions in {"scale": {"1": "2", "2": "3"}, "bad": {"1": "fail"}}.items():
        (root / name).mkdir(parents=True)
        (root / name / "model.yaml").write_text(YAML)
        for v, factor in versions.items():
            (root / name / v).mkdir()
            (root / name / v / "factor.txt").write_text(factor)
    variant = root / "scale" / "2" / "variants" / "half"
    variant.mkdir(parents=True)
    (variant / "factor.txt").write_text("0.5")
    return root


def run(root: Path, body, **settings):
    async def main():
        engine = build_engine(
            Settings(repository=root, **settings),
            repository=Repository(root),
            runtime_factory=factory,
        )
        await engine.start(wait=True)
        try:
            return await body(engine)
        finally:
            await engine.stop()

    return asyncio.run(main())


def x(rows: int) -> dict[str, np.ndarray]:
    return {"x": np.arange(rows * 2, dtype=np.float32).reshape(rows, 2)}


def test_default_version_is_the_highest_and_versions_and_variants_are_addressable(tmp_path):
    root = make_repo(tmp_path)

    async def body(engine: Engine):
        default = await engine.infer(InferRequest("scale", x(2)))
        v1 = await engine.infer(InferRequest("scale", x(2), version="1"))
        half = await engine.infer(InferRequest("scale:half", x(2)))
        half_param = await engine.infer(InferRequest("scale", x(1), variant="half"))
        return default, v1, half, half_param

    default, v1, half, half_param = run(root, body)
    np.testing.assert_array_equal(default.outputs["y"], x(2)["x"] * 3)
    assert default.version == "2" and default.variant is None
    np.testing.assert_array_equal(v1.outputs["y"], x(2)["x"] * 2)
    np.testing.assert_array_equal(half.outputs["y"], x(2)["x"] * 0.5)
    assert half.served_name == "scale:half" and half_param.variant == "half"


def test_a_failing_model_is_reported_while_the_others_serve(tmp_path):
    root = make_repo(tmp_path)

    async def body(engine: Engine):
        assert engine.ready()
        meta = engine.model_metadata("bad")
        assert meta.state == "UNAVAILABLE" and "factor.txt says fail" in meta.reason
        assert engine.model_ready("bad") is False
        with pytest.raises(Unavailable, match="says fail"):
            await engine.infer(InferRequest("bad", x(1)))
        return await engine.infer(InferRequest("scale", x(1)))

    assert run(root, body).outputs["y"].shape == (1, 2)


@pytest.mark.parametrize(
    ("request_", "error", "text"),
    [
        (InferRequest("nope", x(1)), NotFound, "not in the repository"),
        (InferRequest("../etc", x(1)), InvalidArgument, "invalid model name"),
        (
            InferRequest("scale", {"z": np.zeros((1, 2), np.float32)}),
            InvalidArgument,
            "no input 'z'",
        ),
        (
            InferRequest("scale", {"x": np.zeros((1, 2), np.int32)}),
            InvalidArgument,
            "expects datatype FP32",
        ),
        (
            InferRequest("scale", {"x": np.zeros((1, 3), np.float32)}),
            InvalidArgument,
            "expects shape",
        ),
        (InferRequest("scale", x(5)), InvalidArgument, "max_batch_size is 4"),
        (InferRequest("scale", x(0)), InvalidArgument, "0 rows"),
        (InferRequest("scale", x(1), outputs=("q",)), InvalidArgument, "no output 'q'"),
        (InferRequest("scale", x(1), version="7"), NotFound, "no version 7"),
        (InferRequest("scale", x(1), version="abc"), InvalidArgument, "not a positive integer"),
        (InferRequest("scale:nope", x(1)), NotFound, "no version 2 variant 'nope'"),
        (
            InferRequest("scale", x(1), controls=RequestControls(timeout_s=0.0)),
            DeadlineExceeded,
            "timeout passed",
        ),
    ],
)
def test_bad_requests_get_clear_errors_and_the_next_good_one_succeeds(
    tmp_path, request_, error, text
):
    root = make_repo(tmp_path)

    async def body(engine: Engine):
        with pytest.raises(error, match=text):
            await engine.infer(request_)
        return await engine.infer(InferRequest("scale", x(1), outputs=("s",)))

    good = run(root, body)
    assert list(good.outputs) == ["s"]


def test_model_control_is_off_by_default_and_loads_and_unloads_when_on(tmp_path):
    root = make_repo(tmp_path)

    async def refused(engine: Engine):
        with pytest.raises(PermissionDenied, match="--model-control"):
            await engine.unload_model("scale")

    run(root, refused)

    async def control(engine: Engine):
        await engine.unload_model("scale")
        with pytest.raises(Unavailable, match="unloaded"):
            await engine.infer(InferRequest("scale", x(1)))
        states = {r.name: r.state for r in engine.repository_index()}
        assert states["scale"] == "UNAVAILABLE"
        (root / "scale" / "3").mkdir()
        (root / "scale" / "3" / "factor.txt").write_text("10")
        await engine.load_model("scale")
        return await engine.infer(InferRequest("scale", x(1)))

    out = run(root, control, model_control=True)
    assert out.version == "3"
    np.testing.assert_array_equal(out.outputs["y"], x(1)["x"] * 10)


def test_metadata_config_and_statistics(tmp_path):
    root = make_repo(tmp_path)

    async def body(engine: Engine):
        await asyncio.gather(*(engine.infer(InferRequest("scale", x(1))) for _ in range(5)))
        return (
            engine.model_metadata("scale"),
            engine.model_config("scale"),
            engine.model_statistics("scale"),
            engine.repository_index(ready_only=True),
        )

    meta, config, stats, index = run(root, body)
    assert meta.versions == ("1", "2") and meta.variants == ("half",)
    assert meta.inputs == (TensorSpec("x", "FP32", (-1, 2)),)
    assert config.max_batch_size == 4 and config.batched
    assert config.inputs == (TensorSpec("x", "FP32", (-1, 2)),)
    (v2,) = [s for s in stats if s.version == "2"]
    assert v2.inference_count == 5 and v2.success.count == 5
    assert {(r.name, r.version) for r in index} == {
        ("scale", "1"),
        ("scale", "2"),
        ("scale:half", "2"),
    }


def test_a_slow_load_blocks_neither_liveness_nor_other_models(tmp_path):
    import threading

    root = make_repo(tmp_path)
    (root / "slow" / "1").mkdir(parents=True)
    (root / "slow" / "model.yaml").write_text(YAML)
    (root / "slow" / "1" / "factor.txt").write_text("4")
    gate = threading.Event()

    class Gated(ScaleRuntime):
        def load(self) -> None:
            if self.target.model == "slow":
                gate.wait(10)
            super().load()

    async def main():
        settings = Settings(repository=root, model_control=True, load_models=["scale"])
        engine = build_engine(
            settings, repository=Repository(root), runtime_factory=lambda t, o: Gated(t, o)
        )
        await engine.start(wait=True)
        loading = asyncio.ensure_future(engine.load_model("slow"))
        await asyncio.sleep(0.05)
        assert engine.live() and engine.ready()
        assert engine.model_metadata("slow").state == "LOADING"
        waiting = asyncio.ensure_future(engine.infer(InferRequest("slow", x(1))))
        served = await engine.infer(InferRequest("scale", x(1)))  # not blocked by the load
        await asyncio.sleep(0.05)
        assert not waiting.done()  # joined the load in progress
        gate.set()
        await loading
        slow = await waiting
        await engine.stop()
        return served, slow

    served, slow = asyncio.run(main())
    np.testing.assert_array_equal(served.outputs["y"], x(1)["x"] * 3)
    np.testing.assert_array_equal(slow.outputs["y"], x(1)["x"] * 4)


def test_response_cache_answers_repeats_without_the_model(tmp_path):
    root = make_repo(tmp_path)
    yaml_path = root / "scale" / "model.yaml"
    yaml_path.write_text(yaml_path.read_text() + "cache: {policy: lru, max_bytes: 100000}\n")
    calls: list[int] = []

    class Counting(ScaleRuntime):
        def infer(self, inputs):
            calls.append(len(inputs["x"]))
            return super().infer(inputs)

    async def main():
        settings = Settings(repository=root)
        engine = build_engine(
            settings, repository=Repository(root), runtime_factory=lambda t, o: Counting(t, o)
        )
        await engine.start(wait=True)
        calls.clear()  # warm-up calls do not count
        first = await engine.infer(InferRequest("scale", x(2)))
        again = await engine.infer(
            InferRequest("scale", x(2), controls=RequestControls(timeout_s=5))
        )
        other = await engine.infer(InferRequest("scale", x(1)))
        v1 = await engine.infer(InferRequest("scale", x(2), version="1"))
        cache = engine.caches["scale"]
        await engine.stop()
        return first, again, other, v1, cache

    first, again, _other, v1, cache = asyncio.run(main())
    assert len(calls) == 3  # the repeat came from the cache
    np.testing.assert_array_equal(first.outputs["y"], again.outputs["y"])
    assert cache.hits == 1 and cache.misses == 3
    np.testing.assert_array_equal(v1.outputs["y"], x(2)["x"] * 2)  # versions keyed apart


class ThreadRecording(ScaleRuntime):
    """Records the thread of its warm-up and of every batch."""

    seen: ClassVar[dict[str, set[str]]] = {}

    def _note(self) -> None:
        import threading

        key = f"{self.target.model}/{self.target.version}/{self.target.variant}"
        self.seen.setdefault(key, set()).add(threading.current_thread().name)

    def warmup(self) -> None:
        self._note()

    def infer(self, inputs):
        self._note()
        return super().infer(inputs)


def test_each_unit_runs_its_warmup_and_batches_on_one_thread(tmp_path):
    """serving/threads.py: a unit keeps one inference thread (one OpenMP team for torch), and
    units spread over the threads."""
    root = make_repo(tmp_path)
    ThreadRecording.seen = {}

    async def main():
        settings = Settings(repository=root, inference_threads=2, load_models=["scale"])
        engine = build_engine(
            settings,
            repository=Repository(root),
            runtime_factory=lambda t, o: ThreadRecording(t, o),
        )
        await engine.start(wait=True)
        try:
            for _ in range(3):
                await asyncio.gather(
                    *(engine.infer(InferRequest("scale", x(1), version=v)) for v in "12" * 10),
                    *(engine.infer(InferRequest("scale:half", x(1))) for _ in range(10)),
                )
        finally:
            await engine.stop()

    asyncio.run(main())
    seen = ThreadRecording.seen
    assert set(seen) == {"scale/1/None", "scale/2/None", "scale/2/half"}
    assert all(len(names) == 1 for names in seen.values()), seen
    used = set().union(*seen.values())
    assert used == {"slimserve-infer-0_0", "slimserve-infer-1_0"}, used


def test_inference_threads_balance_profiled_cost_and_release():
    from slimserve.serving.threads import InferenceThreads

    threads = InferenceThreads(2)
    try:
        a, b, c = threads.assign("a"), threads.assign("b"), threads.assign("c")
        assert a is not b and c is a  # no costs known: by count
        threads.release("b")
        assert threads.assign("b2") is b
    finally:
        threads.shutdown()
    threads = InferenceThreads(2)
    try:
        # An original (4.3 ms a batch), its bf16 variant (3.7 ms), a pruned one (0.13 ms):
        # by count the pruned one would share the original's thread; by cost it goes beside
        # the bf16 variant, and an unprofiled unit counts as the costliest so far.
        original, bf16 = threads.assign("o", 4.3), threads.assign("h", 3.7)
        assert threads.assign("p", 0.13) is bf16 is not original
        threads.assign("u", None)  # counted as 4.3 ms, on the 3.83 ms thread
        assert threads.assign("q", 0.5) is original  # 4.3 < 8.13
    finally:
        threads.shutdown()
