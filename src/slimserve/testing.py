"""Test support: toy runtimes, toy model targets and folders, and the runtime contract suite.

Imports no framework (torch, onnxruntime, transformers). Needs pytest (the `dev` extra) for
the contract suite's fixtures.

Toy runtimes build from a Target like the real ones (`EchoRuntime(target, options)`), so the
engine can be tested with them through the same factory signature; extra knobs are keyword
arguments (use functools.partial to pass them through a factory):

    target = toy_target("echo", width=4, max_batch_size=8)
    runtime = EchoRuntime(target, scale=2.0)       # output = input * 2, row by row
    slow = SlowRuntime(target, delay_s=0.05)        # sleeps in every infer
    flaky = FailingRuntime(target, fail_after=3)    # 3 good calls, then RuntimeError

A FakeClock stands in for the server's one clock (`build_engine(settings, clock=clock)`):

    clock = FakeClock()                             # 1000.0 until told otherwise
    clock.advance(2.5)                              # deadlines, windows and breakers move
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from slimserve.errors import ModelLoadError, SlimserveError, Unavailable
from slimserve.repository.schema import ModelConfig, dump_model_config
from slimserve.repository.store import MODEL_YAML, VARIANT_YAML, VARIANTS_DIR, Target
from slimserve.runtimes import Runtime, RuntimeOptions, create_runtime
from slimserve.types import TensorSpec, numpy_dtype

# ---------------------------------------------------------------------------------------------
# A clock for tests.


class FakeClock:
    """Monotonic seconds that move only when told: `advance`, or `tick` at every reading.

    A ticking clock keeps readings strictly ordered and every measured duration the same,
    whatever the machine's load (e.g. residency tests that weigh load time).
    """

    def __init__(self, start: float = 1000.0, tick: float = 0.0) -> None:
        self.now = start
        self.tick = tick

    def __call__(self) -> float:
        now = self.now
        self.now += self.tick
        return now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------------------------------------
# Toy models: configs, targets and repository folders without real artifacts.


def toy_config(
    *, width: int = 4, max_batch_size: int = 8, datatype: str = "FP32", **fields: Any
) -> ModelConfig:
    """model.yaml for a toy: input `input` [-1, width] -> output `output` [-1, width]."""
    data: dict[str, Any] = {
        "backend": "python",
        "inputs": [{"name": "input", "datatype": datatype, "shape": [-1, width]}],
        "outputs": [{"name": "output", "datatype": datatype, "shape": [-1, width]}],
        "batching": {"max_batch_size": max_batch_size, "max_queue_delay_ms": 2},
    }
    data.update(fields)
    if max_batch_size == 0:  # an unbatched model has no -1 batch dimension
        for key in ("inputs", "outputs"):
            data[key][0]["shape"] = [width]
    return ModelConfig.model_validate(data)


def toy_target(
    name: str = "toy",
    *,
    version: int = 1,
    path: Path | None = None,
    config: ModelConfig | None = None,
    **config_fields: Any,
) -> Target:
    """A Target for a toy runtime; no files needed (path is only shown in messages)."""
    config = config or toy_config(**config_fields)
    return Target(name, version, None, path or Path(f"/toy/{name}/{version}"), config)


def write_model(
    root: Path,
    name: str,
    config: ModelConfig,
    version: int = 1,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Write ROOT/NAME/model.yaml and the version folder (with `files`); return that folder."""
    model_dir = Path(root) / name
    version_dir = model_dir / str(version)
    write_files(version_dir, files or {})
    (model_dir / MODEL_YAML).write_text(dump_model_config(config))
    return version_dir


def write_files(folder: Path, files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


ECHO_ROW = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}]}


def echo_model(root: Path, name: str, variants: dict[str, float] | None = None) -> Path:
    """ROOT/NAME: EchoRuntime, width 2 (a request: ECHO_ROW); `variants`: name -> agreement."""
    echo, args = "slimserve.testing:EchoRuntime", {"memory": 4096}
    config = toy_config(width=2, max_batch_size=4, model_class=echo, model_args=args)
    version = write_model(root, name, config, files={"README": b"served by model_class\n"})
    for variant, agreement in (variants or {}).items():
        profile = {"latency_ms_batch1": 0.01, "agreement": agreement}
        doc = yaml.safe_dump({"recipe": {"text": "int8"}, "profile": profile})
        files = {VARIANT_YAML: doc.encode(), "README": b"served by model_class\n"}
        write_files(version / VARIANTS_DIR / variant, files)
    return version


# ---------------------------------------------------------------------------------------------
# Toy runtimes.


class ToyRuntime(Runtime):
    """Shared bookkeeping: loaded flag, fixed memory size, and call statistics.

    `batch_sizes` lists the batch size of every infer call, in order, so engine tests can
    check what the batcher formed; `loads` / `unloads` count lifecycle calls.
    """

    def __init__(
        self, target: Target, options: RuntimeOptions | None = None, *, memory: int = 1 << 20
    ) -> None:
        super().__init__(target, options)
        self.memory = memory
        self.loaded = False
        self.loads = 0
        self.unloads = 0
        self.batch_sizes: list[int] = []
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        return len(self.batch_sizes)

    def load(self) -> None:
        self.loaded = True
        self.loads += 1

    def unload(self) -> None:
        self.loaded = False
        self.unloads += 1

    def memory_bytes(self) -> int:
        return self.memory if self.loaded else 0

    def _record(self, inputs: dict[str, np.ndarray]) -> None:
        if not self.loaded:
            raise Unavailable(f"model {self.target.key} is not loaded; load it and retry")
        first = next(iter(inputs.values()), None)
        size = int(first.shape[0]) if first is not None and first.ndim else 1
        with self._lock:
            self.batch_sizes.append(size)


class EchoRuntime(ToyRuntime):
    """output[i] = input[i] * scale + offset, in the declared output datatype.

    Outputs pair with inputs by position (extra outputs reuse the first input). Each row
    depends only on itself, so a test that sends each request its own values (e.g. its
    request number) can check that every response got its own rows back, however batched.
    """

    def __init__(
        self,
        target: Target,
        options: RuntimeOptions | None = None,
        *,
        scale: float = 2.0,
        offset: float = 0.0,
        memory: int = 1 << 20,
    ) -> None:
        super().__init__(target, options, memory=memory)
        self.scale = scale
        self.offset = offset

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._record(inputs)
        arrays = [inputs[s.name] for s in self.inputs]
        out = {}
        for i, spec in enumerate(self.outputs):
            source = arrays[i] if i < len(arrays) else arrays[0]
            out[spec.name] = (source * self.scale + self.offset).astype(numpy_dtype(spec.datatype))
        return out


class SlowRuntime(EchoRuntime):
    """An EchoRuntime whose infer sleeps `delay_s`, and first waits for `gate` if given.

    `gate` (a threading.Event) holds every batch until the test sets it, for ordering tests
    without timing; `entered` is set as soon as a batch is inside infer, and `entered_file`
    (a path) is written then with the count of batches entered, for tests that drive a server
    in another process. `sleep` is injectable.
    """

    def __init__(
        self,
        target: Target,
        options: RuntimeOptions | None = None,
        *,
        delay_s: float = 0.05,
        gate: threading.Event | None = None,
        sleep: Callable[[float], None] = time.sleep,
        entered_file: str | None = None,
        **echo: Any,
    ) -> None:
        super().__init__(target, options, **echo)
        self.delay_s = delay_s
        self.entered_file = Path(entered_file) if entered_file else None
        self.batches_entered = 0
        self.gate = gate
        self.sleep = sleep
        self.entered = threading.Event()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.entered.set()
        self.batches_entered += 1
        if self.entered_file is not None:
            self.entered_file.write_text(str(self.batches_entered))
        if self.gate is not None and not self.gate.wait(timeout=30):
            raise TimeoutError("SlowRuntime: the test never set the gate")
        if self.delay_s > 0:
            self.sleep(self.delay_s)
        return super().infer(inputs)


class FailingRuntime(EchoRuntime):
    """An EchoRuntime that raises in infer: after `fail_after` good calls, while `failing`.

    `failing` can be toggled by the test at any time (e.g. to make a circuit breaker close
    again). `error` builds the exception (default: RuntimeError, like a framework crash).
    `fail_load=True` makes load raise ModelLoadError instead. With `fail_file` (a path, e.g.
    from model.yaml `model_args` when served by a real server process), `failing` is whether
    that file exists, checked at every call: create or delete it to inject or clear a fault.
    """

    def __init__(
        self,
        target: Target,
        options: RuntimeOptions | None = None,
        *,
        fail_after: int = 0,
        error: Callable[[], Exception] | None = None,
        fail_load: bool = False,
        fail_file: str | None = None,
        **echo: Any,
    ) -> None:
        super().__init__(target, options, **echo)
        self.fail_after = fail_after
        self.failing = True
        self.fail_load = fail_load
        self.error = error or (lambda: RuntimeError("FailingRuntime: injected failure"))
        self._good = 0
        self.fail_file = Path(fail_file) if fail_file else None

    def load(self) -> None:
        if self.fail_load:
            raise ModelLoadError(f"model {self.target.key}: FailingRuntime refuses to load")
        super().load()

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.fail_file is not None:
            self.failing = self.fail_file.exists()
        with self._lock:
            fail = self.failing and self._good >= self.fail_after
            self._good += 0 if fail else 1
        if fail:
            raise self.error()
        return super().infer(inputs)


class ScalePredictor:
    """A predictor for the python backend (`model_class: slimserve.testing:ScalePredictor`):
    every declared output is the first input times `scale`; `setup` reads nothing."""

    def __init__(self, scale: float = 2.0, output: str = "output") -> None:
        self.scale = scale
        self.output = output
        self.folder: Path | None = None

    def setup(self, folder: Path) -> None:
        self.folder = folder

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        first = next(iter(inputs.values()))
        return {self.output: first * self.scale}


# ---------------------------------------------------------------------------------------------
# Inputs for any declared interface.


def sample_inputs(specs: list[TensorSpec], batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for declared specs: the first -1 is `batch`, other -1 dims are 3.

    BYTES inputs are short English sentences of different lengths (so text models pad).
    """
    rng = np.random.default_rng(seed)
    out = {}
    for spec in specs:
        shape = _concrete_shape(spec.shape, batch)
        out[spec.name] = _sample(spec.datatype, shape, rng)
    return out


def _concrete_shape(shape: tuple[int, ...], batch: int) -> tuple[int, ...]:
    dims = list(shape)
    if dims and dims[0] == -1:
        dims[0] = batch
    return tuple(3 if d == -1 else d for d in dims)


_WORDS = ("the", "a", "model", "serves", "fast", "small", "cheap", "text", "on", "one", "batch")


def _sample(datatype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if datatype == "BYTES":
        n = int(np.prod(shape))
        texts = [" ".join(rng.choice(_WORDS, size=int(rng.integers(1, 12)))) for _ in range(n)]
        return np.array([t.encode() for t in texts], dtype=object).reshape(shape)
    dtype = numpy_dtype(datatype)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(dtype)
    if dtype.kind in "iu":
        return rng.integers(0, 10, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------------------------------------
# The runtime contract: one suite every runtime passes.


def _cyclic_garbage() -> list[Any]:
    """What the cyclic collector would free now (and frees)."""
    flags = gc.get_debug()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(flags)


def _holds_weights(obj: Any) -> bool:
    """An array or tensor over 64 KiB, a torch module or an ONNX Runtime session."""
    if isinstance(getattr(obj, "nbytes", None), int) and obj.nbytes > 64 * 1024:
        return True
    return hasattr(obj, "named_parameters") or type(obj).__name__ == "InferenceSession"


class RuntimeContract:
    """Tests every Runtime must pass. Subclass it as `TestXxx(RuntimeContract)` and give it a
    fixture `target` (scope "class" or wider; a classmethod under @pytest.fixture) returning a
    Target; override the classmethods `make_runtime` for runtimes not built by
    `create_runtime`, and `make_inputs` for models that need special inputs. `rtol`/`atol`
    bound the difference between a row computed in a batch and the same row alone.
    """

    rtol: float = 1e-4
    atol: float = 1e-5
    batch: int = 5

    @classmethod
    def make_runtime(cls, target: Target) -> Runtime:
        return create_runtime(target, RuntimeOptions(intra_op_threads=1))

    @classmethod
    def make_inputs(cls, target: Target, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
        return sample_inputs(target.config.input_specs(), batch, seed)

    @pytest.fixture(scope="class")
    @classmethod
    def loaded(cls, target: Target) -> Iterator[Runtime]:
        runtime = cls.make_runtime(target)
        runtime.load()
        yield runtime
        runtime.unload()

    def _batch_size(self, target: Target) -> int:
        if not target.config.batched:
            pytest.skip("the model has no batch dimension")
        return min(self.batch, target.config.batching.max_batch_size)

    def check_outputs(self, runtime: Runtime, out: dict[str, np.ndarray], batch: int) -> None:
        """Every declared output is there, with the batch size, datatype and fixed dims."""
        for spec in runtime.outputs:
            assert spec.name in out, f"output {spec.name!r} missing from {sorted(out)}"
            array = out[spec.name]
            assert array.dtype == numpy_dtype(spec.datatype), (spec.name, array.dtype)
            expected = _concrete_shape(spec.shape, batch)
            assert array.ndim == len(expected), (spec.name, array.shape, spec.shape)
            for got, want, declared in zip(array.shape, expected, spec.shape, strict=True):
                assert (declared == -1 and got > 0) or got == want, (spec.name, array.shape)
            if runtime.target.config.batched:
                assert array.shape[0] == batch, (spec.name, array.shape, batch)

    def test_memory_bytes_positive_when_loaded(self, loaded: Runtime) -> None:
        assert loaded.memory_bytes() > 0

    def test_batch_of_one(self, loaded: Runtime, target: Target) -> None:
        out = loaded.infer(self.make_inputs(target, 1))
        self.check_outputs(loaded, out, 1)

    def test_batch_of_n(self, loaded: Runtime, target: Target) -> None:
        n = self._batch_size(target)
        out = loaded.infer(self.make_inputs(target, n, seed=1))
        self.check_outputs(loaded, out, n)

    def test_rows_are_independent(self, loaded: Runtime, target: Target) -> None:
        n = self._batch_size(target)
        inputs = self.make_inputs(target, n, seed=2)
        batched = loaded.infer(inputs)
        rows = [loaded.infer({k: v[i : i + 1] for k, v in inputs.items()}) for i in range(n)]
        for spec in loaded.outputs:
            alone = np.concatenate([r[spec.name] for r in rows])
            np.testing.assert_allclose(
                batched[spec.name], alone, rtol=self.rtol, atol=self.atol, err_msg=spec.name
            )

    def test_read_only_inputs(self, loaded: Runtime, target: Target) -> None:
        # Transports hand over np.frombuffer views of the request body, which are read-only.
        inputs = self.make_inputs(target, 1, seed=3)
        for array in inputs.values():
            array.flags.writeable = False
        self.check_outputs(loaded, loaded.infer(inputs), 1)

    def test_warmup(self, loaded: Runtime) -> None:
        loaded.warmup()

    def test_unload_then_load_again(self, target: Target) -> None:
        runtime = self.make_runtime(target)
        inputs = self.make_inputs(target, 1, seed=4)
        runtime.load()
        first = runtime.infer(inputs)
        runtime.unload()
        assert runtime.memory_bytes() == 0
        with pytest.raises(Unavailable):
            runtime.infer(inputs)
        runtime.load()
        try:
            again = runtime.infer(inputs)
        finally:
            runtime.unload()
        for name in first:
            np.testing.assert_allclose(again[name], first[name], rtol=self.rtol, atol=self.atol)

    def test_unload_frees_the_model_without_the_cyclic_collector(self, target: Target) -> None:
        # The server freezes the heap after each load (serving/models.py): a model that only
        # the cyclic collector could free would stay in memory after its unload. A few small
        # objects from a framework's first call (type caches) are no concern; weights are.
        runtime = self.make_runtime(target)
        gc.unfreeze()  # what earlier loads froze (the server's habit) is no part of this test
        gc.collect()
        runtime.load()
        runtime.infer(self.make_inputs(target, 1, seed=5))
        gc.freeze()
        try:
            runtime.unload()
            del runtime
        finally:
            gc.unfreeze()
        left = _cyclic_garbage()
        held = [x for o in left for x in (o, *gc.get_referents(o))]  # arrays are not tracked
        heavy = [type(o).__name__ for o in held if _holds_weights(o)]
        assert not heavy, f"unload() leaves {heavy} for the cyclic collector"
        assert len(left) < 1000, f"unload() leaves {len(left)} objects in reference cycles"

    def test_infer_before_load_is_unavailable(self, target: Target) -> None:
        runtime = self.make_runtime(target)
        with pytest.raises(Unavailable) as info:
            runtime.infer(self.make_inputs(target, 1))
        assert isinstance(info.value, SlimserveError)
        assert target.key in info.value.message
