"""PythonRuntime: predictor classes and Runtime classes named in model.yaml."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slimserve.errors import FailedPrecondition, ModelLoadError, UnsafeArtifact
from slimserve.repository.store import Repository, Target
from slimserve.runtimes import create_runtime
from slimserve.runtimes.python import PythonRuntime
from slimserve.testing import RuntimeContract, toy_config, write_model


def python_target(root: Path, name: str, **fields: object) -> Target:
    write_model(root, name, toy_config(**fields), files={"weights.txt": b"0123456789"})
    return Repository(root).target(name, 1)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("python-models")


class TestPredictorContract(RuntimeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def target(cls, root: Path) -> Target:
        return python_target(root, "scale", model_class="slimserve.testing:ScalePredictor")


class TestDelegateContract(RuntimeContract):
    @pytest.fixture(scope="class")
    @classmethod
    def target(cls, root: Path) -> Target:
        fields = {"model_class": "slimserve.testing:SlowRuntime", "model_args": {"delay_s": 0}}
        return python_target(root, "slow", **fields)


def test_predictor_gets_args_and_folder(tmp_path: Path) -> None:
    target = python_target(
        tmp_path, "m", model_class="slimserve.testing:ScalePredictor", model_args={"scale": 3}
    )
    runtime = create_runtime(target)
    assert isinstance(runtime, PythonRuntime)
    runtime.load()
    assert runtime._impl.folder == target.path
    out = runtime.infer({"input": np.ones((2, 4), np.float32)})["output"]
    np.testing.assert_array_equal(out, np.full((2, 4), 3.0, np.float32))
    assert runtime.memory_bytes() == 10  # the folder's files: weights.txt


def test_delegate_runtime_gets_model_args(tmp_path: Path) -> None:
    fields = {"model_class": "slimserve.testing:EchoRuntime", "model_args": {"offset": 1.0}}
    runtime = PythonRuntime(python_target(tmp_path, "m", **fields))
    runtime.load()
    out = runtime.infer({"input": np.zeros((1, 4), np.float32)})["output"]
    assert (out == 1.0).all() and runtime.memory_bytes() == 1 << 20


def test_missing_output_says_which(tmp_path: Path) -> None:
    fields = {"model_class": "slimserve.testing:ScalePredictor", "model_args": {"output": "y"}}
    runtime = PythonRuntime(python_target(tmp_path, "m", **fields))
    runtime.load()
    with pytest.raises(FailedPrecondition, match=r"without the declared outputs \['output'\]"):
        runtime.infer({"input": np.zeros((1, 4), np.float32)})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "needs model_class"),
        ({"model_class": "slimserve.testing:NoSuch"}, "cannot be imported"),
        ({"model_class": "slimserve.errors:Code"}, "has no predict method"),
        (
            {"model_class": "slimserve.testing:ScalePredictor", "model_args": {"bad": 1}},
            r"ScalePredictor\(\*\*model_args\) failed",
        ),
    ],
)
def test_load_errors(tmp_path: Path, fields: dict[str, object], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        PythonRuntime(python_target(tmp_path, "m", **fields)).load()


def test_pickle_in_folder_refused(tmp_path: Path) -> None:
    target = python_target(tmp_path, "m", model_class="slimserve.testing:ScalePredictor")
    (target.path / "model.joblib").write_bytes(b"x")
    with pytest.raises(UnsafeArtifact, match=r"model.joblib: pickle"):
        PythonRuntime(target).load()
