"""TorchRuntime: safetensors + model class, refusals, output mapping, per-thread threads."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slimserve.errors import FailedPrecondition, ModelLoadError, UnsafeArtifact
from slimserve.repository.store import Repository, Target
from slimserve.runtimes import RuntimeOptions, create_runtime
from slimserve.runtimes.torch import TorchRuntime, map_outputs, use_threads
from slimserve.testing import write_model
from slimserve.types import TensorSpec

from .conftest import SIZES, mlp_config

ZOO_MLP = {"model_class": "slimserve.zoo:MLP", "model_args": {"sizes": SIZES}}


def make_model(root: Path, weights: Path | None, **fields: Any) -> Target:
    """Model 'm' version 1 with `weights` copied in as model.safetensors (if given)."""
    folder = write_model(root, "m", mlp_config("torch", **fields))
    if weights is not None:
        shutil.copy(weights, folder / "model.safetensors")
    return Repository(root).target("m", 1)


def test_create_runtime_picks_torch(torch_target: Target) -> None:
    assert isinstance(create_runtime(torch_target), TorchRuntime)


def test_outputs_match_the_module(torch_target: Target, mlp: Any) -> None:
    x = np.random.default_rng(0).standard_normal((5, SIZES[0])).astype(np.float32)
    runtime = TorchRuntime(torch_target)
    runtime.load()
    got = runtime.infer({"input": x})["logits"]
    with torch.no_grad():
        want = mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert runtime.memory_bytes() == sum(p.numel() * 4 for p in mlp.parameters())


def test_loaded_module_is_in_eval_mode(torch_target: Target) -> None:
    runtime = TorchRuntime(torch_target)
    runtime.load()
    assert runtime._model is not None and not runtime._model.training


def test_pickle_refused_with_conversion_hint(torch_target: Target, tmp_path: Path) -> None:
    target = make_model(tmp_path, torch_target.path / "model.safetensors", **ZOO_MLP)
    torch.save({"w": torch.zeros(1)}, target.path / "model.pt")
    with pytest.raises(UnsafeArtifact, match=r"model.pt: pickle.*already beside it: delete"):
        TorchRuntime(target).load()


def test_export_program_refused(torch_target: Target, tmp_path: Path) -> None:
    target = make_model(tmp_path, None, **ZOO_MLP)
    (target.path / "model.pt2").write_bytes(b"PK\x03\x04")
    with pytest.raises(UnsafeArtifact, match=r"model.pt2: torch.export programs are refused"):
        TorchRuntime(target).load()


def test_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no model.safetensors.*save_file"):
        TorchRuntime(make_model(tmp_path, None, **ZOO_MLP)).load()


def test_missing_model_class(torch_target: Target, tmp_path: Path) -> None:
    target = make_model(tmp_path, torch_target.path / "model.safetensors")
    with pytest.raises(ModelLoadError, match="needs model_class"):
        TorchRuntime(target).load()


def test_unimportable_model_class(torch_target: Target, tmp_path: Path) -> None:
    target = make_model(
        tmp_path, torch_target.path / "model.safetensors", model_class="slimserve.zoo:NoSuchNet"
    )
    with pytest.raises(ModelLoadError, match=r"'slimserve.zoo:NoSuchNet' cannot be imported"):
        TorchRuntime(target).load()


def test_model_class_must_be_a_module(torch_target: Target, tmp_path: Path) -> None:
    target = make_model(
        tmp_path, torch_target.path / "model.safetensors", model_class="slimserve.errors:Code"
    )
    with pytest.raises(ModelLoadError, match=r"not a torch.nn.Module class"):
        TorchRuntime(target).load()


def test_bad_model_args(torch_target: Target, tmp_path: Path) -> None:
    target = make_model(
        tmp_path,
        torch_target.path / "model.safetensors",
        model_class="slimserve.zoo:MLP",
        model_args={"widths": SIZES},
    )
    with pytest.raises(ModelLoadError, match=r"slimserve.zoo:MLP\(\*\*model_args\) failed"):
        TorchRuntime(target).load()


def test_weights_of_another_shape_fail_strictly(torch_target: Target, tmp_path: Path) -> None:
    target = make_model(
        tmp_path,
        torch_target.path / "model.safetensors",
        model_class="slimserve.zoo:MLP",
        model_args={"sizes": [8, 32, 4]},
    )
    with pytest.raises(ModelLoadError, match=r"(?s)do not fit MLP.*size mismatch.*model_args"):
        TorchRuntime(target).load()


def test_missing_keys_fail_strictly(torch_target: Target, tmp_path: Path) -> None:
    target = make_model(
        tmp_path,
        torch_target.path / "model.safetensors",
        model_class="slimserve.zoo:MLP",
        model_args={"sizes": [8, 16, 4, 4]},  # one more layer than the weights hold
    )
    with pytest.raises(ModelLoadError, match=r"(?s)Missing key\(s\).*net.4.weight"):
        TorchRuntime(target).load()


def test_threads_applied_in_the_worker_thread(torch_target: Target) -> None:
    runtime = TorchRuntime(torch_target, RuntimeOptions(intra_op_threads=1))
    runtime.load()
    x = np.zeros((1, SIZES[0]), np.float32)

    def in_worker() -> tuple[int, int]:
        torch.set_num_threads(2)  # what a fresh thread may have: not what we asked
        before = torch.get_num_threads()
        runtime.infer({"input": x})
        return before, torch.get_num_threads()

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(in_worker).result() == (2, 1)


def test_two_thread_counts_in_one_worker(torch_target: Target) -> None:
    one = TorchRuntime(torch_target, RuntimeOptions(intra_op_threads=1))
    two = TorchRuntime(torch_target, RuntimeOptions(intra_op_threads=2))
    one.load()
    two.load()
    x = {"input": np.zeros((1, SIZES[0]), np.float32)}

    def in_worker() -> list[int]:
        seen = []
        for runtime in (one, two, one):
            runtime.infer(x)
            seen.append(torch.get_num_threads())
        return seen

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(in_worker).result() == [1, 2, 1]


def test_use_threads_sets_once_per_thread() -> None:
    def in_worker() -> int:
        use_threads(1)
        torch.set_num_threads(2)  # changed behind its back: the cached count wins (by design)
        use_threads(1)
        return torch.get_num_threads()

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(in_worker).result() == 2


SPECS = [TensorSpec("a", "FP32", (-1, 2)), TensorSpec("b", "FP32", (-1, 3))]


def test_map_outputs_tensor_to_single_output() -> None:
    t = torch.zeros(1, 2)
    assert map_outputs(t, SPECS[:1])["a"] is t


def test_map_outputs_tuple_in_order_and_dict_by_name() -> None:
    a, b, extra = torch.zeros(1, 2), torch.zeros(1, 3), torch.zeros(1)
    assert map_outputs((a, b, extra), SPECS) == {"a": a, "b": b}
    assert map_outputs({"b": b, "a": a}, SPECS) == {"a": a, "b": b}


def test_map_outputs_mismatches_say_how_to_fix() -> None:
    with pytest.raises(FailedPrecondition, match=r"one tensor but model.yaml declares 2"):
        map_outputs(torch.zeros(1), SPECS)
    with pytest.raises(FailedPrecondition, match=r"not \['b'\]"):
        map_outputs({"a": torch.zeros(1)}, SPECS)
    with pytest.raises(FailedPrecondition, match="tuple of 2 tensors"):
        map_outputs((torch.zeros(1),), SPECS)
