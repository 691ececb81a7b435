"""slimserve.testing: the toy runtimes behave as documented, and the contract catches bugs."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slimserve.errors import ModelLoadError, Unavailable
from slimserve.repository.store import Repository, Target
from slimserve.runtimes import Runtime
from slimserve.testing import (
    EchoRuntime,
    FailingRuntime,
    RuntimeContract,
    SlowRuntime,
    sample_inputs,
    toy_config,
    toy_target,
    write_model,
)


def rows(n: int, width: int = 4) -> dict[str, np.ndarray]:
    """Row i holds the value i everywhere: which request a row came from is visible."""
    return {"input": np.repeat(np.arange(n, dtype=np.float32)[:, None], width, axis=1)}


def test_echo_scales_each_row_and_records_batches() -> None:
    runtime = EchoRuntime(toy_target(), scale=2.0, offset=1.0)
    runtime.load()
    out = runtime.infer(rows(3))["output"]
    np.testing.assert_array_equal(out[:, 0], [1.0, 3.0, 5.0])
    runtime.infer(rows(1))
    assert runtime.batch_sizes == [3, 1] and runtime.calls == 2


def test_echo_casts_to_the_declared_datatype() -> None:
    runtime = EchoRuntime(toy_target(datatype="INT32"), scale=3)
    runtime.load()
    out = runtime.infer({"input": np.ones((2, 4), np.int32)})["output"]
    assert out.dtype == np.int32 and (out == 3).all()


def test_toy_memory_and_lifecycle_counts() -> None:
    runtime = EchoRuntime(toy_target(), memory=123)
    assert runtime.memory_bytes() == 0
    runtime.load()
    assert runtime.memory_bytes() == 123
    runtime.unload()
    with pytest.raises(Unavailable):
        runtime.infer(rows(1))
    assert (runtime.loads, runtime.unloads) == (1, 1)


def test_slow_runtime_waits_for_its_gate() -> None:
    gate = threading.Event()
    slept: list[float] = []
    runtime = SlowRuntime(toy_target(), delay_s=0.5, gate=gate, sleep=slept.append)
    runtime.load()
    result: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: result.update(runtime.infer(rows(2))))
    worker.start()
    assert runtime.entered.wait(5)
    assert not result  # held at the gate
    gate.set()
    worker.join(5)
    assert result["output"].shape == (2, 4) and slept == [0.5]


def test_failing_runtime_after_n_calls_and_toggle() -> None:
    runtime = FailingRuntime(toy_target(), fail_after=2)
    runtime.load()
    runtime.infer(rows(1))
    runtime.infer(rows(1))
    with pytest.raises(RuntimeError, match="injected failure"):
        runtime.infer(rows(1))
    runtime.failing = False
    assert runtime.infer(rows(1))["output"].shape == (1, 4)


def test_failing_runtime_custom_error_and_failed_load() -> None:
    runtime = FailingRuntime(toy_target(), error=lambda: MemoryError("oom"))
    runtime.load()
    with pytest.raises(MemoryError):
        runtime.infer(rows(1))
    with pytest.raises(ModelLoadError, match="refuses to load"):
        FailingRuntime(toy_target(), fail_load=True).load()


def test_write_model_round_trips_through_the_repository(tmp_path: Path) -> None:
    config = toy_config(width=3, max_batch_size=4)
    folder = write_model(tmp_path, "toy", config, version=2, files={"sub/a.txt": b"x"})
    target = Repository(tmp_path).target("toy", 2)
    assert target.path == folder.resolve() and target.config == config
    assert (folder / "sub" / "a.txt").read_bytes() == b"x"


def test_sample_inputs_follow_the_specs() -> None:
    config = toy_config(width=5)
    inputs = sample_inputs(config.input_specs(), batch=3)
    assert inputs["input"].shape == (3, 5) and inputs["input"].dtype == np.float32


class MixingRuntime(EchoRuntime):
    """A broken runtime: each row's output depends on the whole batch (mean removed)."""

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._record(inputs)
        x = inputs["input"]
        return {"output": x - x.mean(axis=0, keepdims=True)}


class TestContractCatchesMixedRows(RuntimeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def target(cls) -> Target:
        return toy_target("mixing")

    @classmethod
    def make_runtime(cls, target: Target) -> Runtime:
        return MixingRuntime(target)

    def test_rows_are_independent(self, loaded: Runtime, target: Target) -> None:
        with pytest.raises(AssertionError):
            super().test_rows_are_independent(loaded, target)
