"""OnnxRuntime: graph checks against model.yaml, artifact rules, options, memory estimate."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from slimserve.errors import ConfigError, ModelLoadError, UnsafeArtifact
from slimserve.repository.store import Repository, Target
from slimserve.runtimes import RuntimeOptions, create_runtime
from slimserve.runtimes.onnx import OnnxRuntime
from slimserve.testing import write_model

from .conftest import SIZES, mlp_config


def make_model(root: Path, source: Path, name: str, **overrides: Any) -> Target:
    """A copy of the ONNX MLP under another model.yaml (`overrides` replace its fields)."""
    folder = write_model(root, name, mlp_config("onnx", **overrides))
    shutil.copy(source, folder / "model.onnx")
    return Repository(root).target(name, 1)


def io(name: str = "input", datatype: str = "FP32", width: int = SIZES[0]) -> dict[str, Any]:
    return {"name": name, "datatype": datatype, "shape": [-1, width]}


def test_create_runtime_picks_onnx(onnx_target: Target) -> None:
    assert isinstance(create_runtime(onnx_target), OnnxRuntime)


def test_outputs_match_torch(onnx_target: Target, mlp: Any) -> None:
    import torch

    x = np.random.default_rng(0).standard_normal((6, SIZES[0])).astype(np.float32)
    runtime = OnnxRuntime(onnx_target)
    runtime.load()
    got = runtime.infer({"input": x})["logits"]
    with torch.no_grad():
        want = mlp(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_memory_is_initializer_bytes(onnx_target: Target, mlp: Any) -> None:
    runtime = OnnxRuntime(onnx_target)
    runtime.load()
    weights = sum(p.numel() * p.element_size() for p in mlp.parameters())
    assert runtime.memory_bytes() == weights
    runtime.unload()
    assert runtime.memory_bytes() == 0


def test_unknown_input_name_names_the_graph_inputs(onnx_target: Target, tmp_path: Path) -> None:
    target = make_model(tmp_path, onnx_target.path / "model.onnx", "m", inputs=[io("pixels")])
    with pytest.raises(ModelLoadError, match=r"declares input 'pixels'.*\['input'\]"):
        OnnxRuntime(target).load()


def test_unknown_output_name(onnx_target: Target, tmp_path: Path) -> None:
    target = make_model(
        tmp_path, onnx_target.path / "model.onnx", "m", outputs=[io("scores", width=SIZES[-1])]
    )
    with pytest.raises(ModelLoadError, match=r"declares output 'scores'.*rename"):
        OnnxRuntime(target).load()


def test_wrong_datatype_says_the_graph_type(onnx_target: Target, tmp_path: Path) -> None:
    target = make_model(
        tmp_path, onnx_target.path / "model.onnx", "m", inputs=[io("input", "FP16")]
    )
    with pytest.raises(ModelLoadError, match=r"FP32 in the graph but FP16.*datatype: FP32"):
        OnnxRuntime(target).load()


def test_wrong_width(onnx_target: Target, tmp_path: Path) -> None:
    target = make_model(tmp_path, onnx_target.path / "model.onnx", "m", inputs=[io(width=9)])
    with pytest.raises(ModelLoadError, match=r"shape \[-1, 8\] in the graph but \[-1, 9\]"):
        OnnxRuntime(target).load()


def test_graph_input_missing_from_model_yaml(onnx_target: Target, tmp_path: Path) -> None:
    target = make_model(tmp_path, onnx_target.path / "model.onnx", "m", inputs=[])
    with pytest.raises(ModelLoadError, match=r"needs inputs \['input'\]"):
        OnnxRuntime(target).load()


def test_fixed_batch_graph_refused_when_batching(mlp: Any, tmp_path: Path) -> None:
    import torch

    folder = write_model(tmp_path, "m", mlp_config("onnx"))
    with pytest.warns(DeprecationWarning):
        torch.onnx.export(mlp, (torch.zeros(1, SIZES[0]),), str(folder / "model.onnx"),
                          input_names=["input"], output_names=["logits"], dynamo=False)  # fmt: skip
    with pytest.raises(ModelLoadError, match=r"fixed first dimension 1.*max_batch_size is 16"):
        OnnxRuntime(Repository(tmp_path).target("m", 1)).load()


def test_graph_without_shape_information_loads(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, None)  # rank unknown
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["logits"])], "relu", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    config = mlp_config("onnx", outputs=[io("logits")])
    onnx.save_model(model, str(write_model(tmp_path, "m", config) / "model.onnx"))
    runtime = OnnxRuntime(Repository(tmp_path).target("m", 1))
    runtime.load()
    out = runtime.infer({"input": np.full((2, SIZES[0]), -1.0, np.float32)})["logits"]
    np.testing.assert_array_equal(out, np.zeros((2, SIZES[0]), np.float32))


def test_missing_artifact(tmp_path: Path) -> None:
    write_model(tmp_path, "m", mlp_config("onnx"))
    with pytest.raises(ModelLoadError, match=r"no model.onnx.*torch.onnx.export"):
        OnnxRuntime(Repository(tmp_path).target("m", 1)).load()


def test_single_other_onnx_file_is_used(onnx_target: Target, tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", mlp_config("onnx"))
    shutil.copy(onnx_target.path / "model.onnx", folder / "mlp-v2.onnx")
    runtime = OnnxRuntime(Repository(tmp_path).target("m", 1))
    runtime.load()
    assert runtime.infer({"input": np.zeros((2, 8), np.float32)})["logits"].shape == (2, 4)


def test_several_onnx_files_are_ambiguous(onnx_target: Target, tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", mlp_config("onnx"))
    for name in ("a.onnx", "b.onnx"):
        shutil.copy(onnx_target.path / "model.onnx", folder / name)
    with pytest.raises(ModelLoadError, match=r"several \*.onnx files \(a.onnx, b.onnx\)"):
        OnnxRuntime(Repository(tmp_path).target("m", 1)).load()


def test_not_an_onnx_file(tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", mlp_config("onnx"))
    (folder / "model.onnx").write_bytes(b"\x00not a protobuf at all\xff" * 10)
    with pytest.raises(ModelLoadError, match=r"model.onnx"):
        OnnxRuntime(Repository(tmp_path).target("m", 1)).load()


def test_pickle_in_folder_refused_with_conversion_hint(onnx_target: Target, tmp_path: Path) -> None:
    target = make_model(tmp_path, onnx_target.path / "model.onnx", "m")
    (target.path / "extra.pkl").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UnsafeArtifact, match=r"extra.pkl: pickle.*convert it"):
        OnnxRuntime(target).load()


def test_options_reach_the_session(onnx_target: Target) -> None:
    options = RuntimeOptions(intra_op_threads=1, graph_optimization="disable")
    runtime = OnnxRuntime(onnx_target, options)
    runtime.load()
    assert runtime.session is not None
    session_options = runtime.session.get_session_options()
    assert session_options.intra_op_num_threads == 1
    assert session_options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL


def test_allow_spinning_parameter(onnx_target: Target, tmp_path: Path) -> None:
    target = make_model(
        tmp_path, onnx_target.path / "model.onnx", "m", parameters={"allow_spinning": False}
    )
    runtime = OnnxRuntime(target)
    runtime.load()
    assert runtime.session is not None
    entry = runtime.session.get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning"
    )
    assert entry == "0"


def _spinning(target: Target, options: RuntimeOptions) -> str:
    runtime = OnnxRuntime(target, options)
    runtime.load()
    assert runtime.session is not None
    options_now = runtime.session.get_session_options()
    return str(options_now.get_session_config_entry("session.intra_op.allow_spinning"))


def test_spin_wait_setting_is_the_default_and_the_model_parameter_wins(
    onnx_target: Target, tmp_path: Path
) -> None:
    assert _spinning(onnx_target, RuntimeOptions()) == "0"  # the server's default: sleep
    assert _spinning(onnx_target, RuntimeOptions(spin_wait=True)) == "1"
    spinning = make_model(
        tmp_path, onnx_target.path / "model.onnx", "m", parameters={"allow_spinning": True}
    )
    assert _spinning(spinning, RuntimeOptions(spin_wait=False)) == "1"


def test_bad_inter_op_threads_parameter(onnx_target: Target, tmp_path: Path) -> None:
    target = make_model(
        tmp_path, onnx_target.path / "model.onnx", "m", parameters={"inter_op_threads": "four"}
    )
    with pytest.raises(ConfigError, match=r"parameters.inter_op_threads = 'four'"):
        OnnxRuntime(target).load()


def external_data_model(source: Path, folder: Path, location: str) -> None:
    """Save `source` to folder/model.onnx with its weights in the external file `location`."""
    model = onnx.load(str(source))
    onnx.save_model(
        model,
        str(folder / "model.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=location,
        size_threshold=0,
    )


def test_external_data_inside_folder_loads(onnx_target: Target, mlp: Any, tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", mlp_config("onnx"))
    external_data_model(onnx_target.path / "model.onnx", folder, "model.onnx.data")
    runtime = OnnxRuntime(Repository(tmp_path).target("m", 1))
    runtime.load()
    x = np.ones((3, SIZES[0]), np.float32)
    reference = OnnxRuntime(onnx_target)
    reference.load()
    np.testing.assert_allclose(
        runtime.infer({"input": x})["logits"], reference.infer({"input": x})["logits"]
    )
    assert runtime.memory_bytes() == reference.memory_bytes()


def test_external_data_outside_folder_refused(onnx_target: Target, tmp_path: Path) -> None:
    folder = write_model(tmp_path, "m", mlp_config("onnx"))
    external_data_model(onnx_target.path / "model.onnx", folder, "weights.data")
    # Point the weights one level up, as a crafted model would, and move the data there.
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../weights.data"
    onnx.save_model(model, str(folder / "model.onnx"))
    (folder / "weights.data").rename(folder.parent / "weights.data")
    with pytest.raises(UnsafeArtifact, match=r"'\.\./weights\.data', outside the model folder"):
        OnnxRuntime(Repository(tmp_path).target("m", 1)).load()
