"""`add_model`: ONNX files, safetensors + a model class, transformers folders, and the errors.

Imported versions are checked the way the server reads them (Repository, load_model_config,
verify_manifest) and, for one artifact of each kind, loaded and run by the real runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from slimserve.errors import AlreadyExists, InvalidArgument, UnsafeArtifact
from slimserve.repository import Repository, load_model_config, verify_manifest
from slimserve.repository.importer import add_model
from slimserve.runtimes import create_runtime

from .conftest import IN, OUT, identity_onnx, mlp_onnx


def _yaml(version_dir: Path) -> dict:
    return yaml.safe_load((version_dir.parent / "model.yaml").read_text())


def _tensors(config) -> list[tuple[str, str, list[int]]]:
    return [(t.name, t.datatype, t.shape) for t in config]


# --------------------------------------------------------------------------- ONNX


def test_onnx_with_dynamic_batch_gets_batching_and_a_manifest(tmp_path, dynamic_onnx):
    version = add_model(tmp_path, "mlp", dynamic_onnx)

    assert version == tmp_path / "mlp" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["MANIFEST.json", "model.onnx"]
    assert verify_manifest(version) is True
    config = load_model_config(tmp_path / "mlp" / "model.yaml")
    assert config.backend == "onnx"
    assert _tensors(config.inputs) == [("x", "FP32", [-1, IN])]
    assert _tensors(config.outputs) == [("y", "FP32", [-1, OUT])]
    assert config.batching.max_batch_size == 32
    # model.yaml stays short: only what the user might edit or needs to see.
    assert set(_yaml(version)) == {"backend", "inputs", "outputs", "batching"}


def test_imported_onnx_runs_in_the_onnx_runtime(tmp_path, dynamic_onnx):
    add_model(tmp_path, "mlp", dynamic_onnx)
    runtime = create_runtime(Repository(tmp_path).target("mlp", 1))
    runtime.load()
    try:
        out = runtime.infer({"x": np.ones((5, IN), np.float32)})
    finally:
        runtime.unload()
    assert out["y"].shape == (5, OUT)


def test_fixed_batch_of_one_turns_batching_off_and_says_so(tmp_path, fixed_onnx):
    notes: list[str] = []
    version = add_model(tmp_path, "fixed", fixed_onnx, report=notes.append)

    config = load_model_config(version.parent / "model.yaml")
    assert config.batching.max_batch_size == 0
    assert _tensors(config.inputs) == [("x", "FP32", [1, IN])]
    assert len(notes) == 1
    assert "batching is off" in notes[0] and "'x'" in notes[0] and "dynamic" in notes[0]


def test_asking_to_batch_a_fixed_batch_model_is_refused(tmp_path, fixed_onnx):
    with pytest.raises(InvalidArgument, match=r"cannot batch.*dynamic first axis"):
        add_model(tmp_path, "fixed", fixed_onnx, max_batch_size=8)
    assert not (tmp_path / "fixed").exists()


def test_max_batch_size_is_written(tmp_path, dynamic_onnx):
    version = add_model(tmp_path, "mlp", dynamic_onnx, max_batch_size=4)
    assert _yaml(version)["batching"]["max_batch_size"] == 4


def test_onnx_datatypes_and_free_inner_dims(tmp_path):
    path = identity_onnx(tmp_path / "src" / "ident.onnx")
    version = add_model(tmp_path / "repo", "ident", path)
    config = load_model_config(version.parent / "model.yaml")
    assert _tensors(config.inputs) == [("ids", "INT64", [-1, -1]), ("mask", "BOOL", [-1, -1])]
    assert _tensors(config.outputs) == [
        ("ids_out", "INT64", [-1, -1]),
        ("mask_out", "BOOL", [-1, -1]),
    ]


def test_onnx_external_weights_are_copied_and_hashed(tmp_path):
    path = mlp_onnx(tmp_path / "src" / "big.onnx", external=True)
    version = add_model(tmp_path / "repo", "big", path)

    assert (version / "big.onnx.data").is_file()
    manifest = json.loads((version / "MANIFEST.json").read_text())
    assert set(manifest["files"]) == {"model.onnx", "big.onnx.data"}
    runtime = create_runtime(Repository(tmp_path / "repo").target("big", 1))
    runtime.load()
    try:
        assert runtime.infer({"x": np.ones((2, IN), np.float32)})["y"].shape == (2, OUT)
    finally:
        runtime.unload()


def test_missing_external_weights_are_named(tmp_path):
    path = mlp_onnx(tmp_path / "src" / "big.onnx", external=True)
    (tmp_path / "src" / "big.onnx.data").unlink()
    with pytest.raises(InvalidArgument, match=r"big.onnx.data"):
        add_model(tmp_path / "repo", "big", path)


def test_a_file_that_is_not_onnx_is_refused(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\xffthis is not protobuf" * 10)
    with pytest.raises(InvalidArgument, match="not a readable ONNX model"):
        add_model(tmp_path / "repo", "bad", bad)


# --------------------------------------------------------------------------- versions


def test_versions_count_up_and_explicit_versions_are_honoured(tmp_path, dynamic_onnx):
    assert add_model(tmp_path, "m", dynamic_onnx).name == "1"
    assert add_model(tmp_path, "m", dynamic_onnx).name == "2"
    assert add_model(tmp_path, "m", dynamic_onnx, version=7).name == "7"
    assert add_model(tmp_path, "m", dynamic_onnx).name == "8"
    assert Repository(tmp_path).versions("m") == [1, 2, 7, 8]
    with pytest.raises(AlreadyExists, match="version 2 exists"):
        add_model(tmp_path, "m", dynamic_onnx, version=2)
    with pytest.raises(InvalidArgument, match="positive"):
        add_model(tmp_path, "m", dynamic_onnx, version=0)


def test_a_new_version_keeps_the_users_model_yaml(tmp_path, dynamic_onnx):
    add_model(tmp_path, "m", dynamic_onnx)
    yaml_path = tmp_path / "m" / "model.yaml"
    edited = yaml_path.read_text().replace("max_batch_size: 32", "max_batch_size: 8")
    yaml_path.write_text(edited)
    notes: list[str] = []
    add_model(tmp_path, "m", dynamic_onnx, max_batch_size=16, report=notes.append)
    assert yaml_path.read_text() == edited
    assert notes == [
        f"{yaml_path}: kept as it was (all versions share it); --max-batch-size 16 was not "
        "applied: edit its batching line (max_batch_size: 8) to change it"
    ]


def test_a_version_with_other_inputs_is_refused_and_leaves_nothing(tmp_path, dynamic_onnx):
    add_model(tmp_path, "m", dynamic_onnx)
    other = identity_onnx(tmp_path / "src" / "ident.onnx")
    with pytest.raises(AlreadyExists, match=r"model\.yaml: the model exists with .*'ids'"):
        add_model(tmp_path, "m", other)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["1", "model.yaml"]


def test_a_fixed_batch_version_of_a_batched_model_is_refused(tmp_path, dynamic_onnx, fixed_onnx):
    add_model(tmp_path, "m", dynamic_onnx)
    with pytest.raises(AlreadyExists, match="another name"):
        add_model(tmp_path, "m", fixed_onnx)


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 200, "a..b", "m:v"])
def test_invalid_model_names_are_refused(tmp_path, dynamic_onnx, name):
    with pytest.raises(InvalidArgument, match="invalid model name"):
        add_model(tmp_path / "repo", name, dynamic_onnx)
    assert not (tmp_path / "repo").exists()
    assert not (tmp_path / "evil").exists()


def test_a_model_folder_that_is_a_symlink_is_refused(tmp_path, dynamic_onnx):
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "m").symlink_to(outside)
    with pytest.raises(UnsafeArtifact, match="link"):
        add_model(tmp_path / "repo", "m", dynamic_onnx)
    assert list(outside.iterdir()) == []


# --------------------------------------------------------------------------- kinds and options


def test_unknown_and_missing_artifacts_are_refused(tmp_path):
    text = tmp_path / "model.txt"
    text.write_text("hello")
    with pytest.raises(InvalidArgument, match=r"unknown kind of artifact '.txt'"):
        add_model(tmp_path / "repo", "m", text)
    with pytest.raises(InvalidArgument, match="no such file"):
        add_model(tmp_path / "repo", "m", tmp_path / "nope.onnx")
    with pytest.raises(InvalidArgument, match=r"config.json"):
        add_model(tmp_path / "repo", "m", tmp_path)  # a folder that is not a transformers model


def test_pickle_files_are_refused_with_how_to_convert(tmp_path):
    weights = tmp_path / "model.pt"
    weights.write_bytes(b"\x80\x04junk")
    with pytest.raises(UnsafeArtifact, match=r"model\.pt: pickle .*safetensors"):
        add_model(tmp_path / "repo", "m", weights)


def test_options_for_another_kind_are_refused(tmp_path, dynamic_onnx, minilm):
    with pytest.raises(InvalidArgument, match="--model-class applies to safetensors"):
        add_model(tmp_path, "m", dynamic_onnx, model_class="slimserve.zoo:MLP")
    with pytest.raises(InvalidArgument, match="--input-shape applies to safetensors"):
        add_model(tmp_path, "m", dynamic_onnx, input_shape=[4])
    with pytest.raises(InvalidArgument, match="--task applies to transformers"):
        add_model(tmp_path, "m", dynamic_onnx, task="embedding")
    with pytest.raises(InvalidArgument, match="--task 'translation'"):
        add_model(tmp_path, "m", minilm, task="translation")


# --------------------------------------------------------------------------- safetensors


def test_safetensors_with_a_class_reads_shapes_from_the_first_layer(tmp_path, mlp_safetensors):
    args = {"sizes": [IN, 8, OUT]}
    version = add_model(
        tmp_path, "t", mlp_safetensors, model_class="slimserve.zoo:MLP", model_args=args
    )

    assert (version / "model.safetensors").is_file() and verify_manifest(version)
    config = load_model_config(version.parent / "model.yaml")
    assert config.backend == "torch"
    assert config.model_class == "slimserve.zoo:MLP" and config.model_args == args
    assert _tensors(config.inputs) == [("input", "FP32", [-1, IN])]
    assert _tensors(config.outputs) == [("output", "FP32", [-1, OUT])]

    runtime = create_runtime(Repository(tmp_path).target("t", 1))
    runtime.load()
    try:
        assert runtime.infer({"input": np.zeros((3, IN), np.float32)})["output"].shape == (3, OUT)
    finally:
        runtime.unload()


def test_safetensors_without_a_class_says_which_flag_to_add(tmp_path, mlp_safetensors):
    with pytest.raises(InvalidArgument, match=r"--model-class package.module:ClassName"):
        add_model(tmp_path, "t", mlp_safetensors)


def test_weights_that_do_not_fit_the_class_are_refused(tmp_path, mlp_safetensors):
    with pytest.raises(InvalidArgument, match=r"do not fit slimserve\.zoo:MLP.*--model-args"):
        add_model(
            tmp_path,
            "t",
            mlp_safetensors,
            model_class="slimserve.zoo:MLP",
            model_args={"sizes": [IN, 16, OUT]},
        )
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("model_class", "match"),
    [
        ("slimserve.nowhere:MLP", "cannot import"),
        ("slimserve.zoo:Nope", "cannot import"),
        ("pathlib:Path", "not a torch.nn.Module"),
        ("slimserve.zoo:", "package.module:ClassName"),
    ],
)
def test_bad_model_classes_are_named(tmp_path, mlp_safetensors, model_class, match):
    with pytest.raises(InvalidArgument, match=match):
        add_model(tmp_path, "t", mlp_safetensors, model_class=model_class)


def test_bad_constructor_arguments_are_named(tmp_path, mlp_safetensors):
    with pytest.raises(InvalidArgument, match="check --model-args"):
        add_model(
            tmp_path, "t", mlp_safetensors, model_class="slimserve.zoo:MLP", model_args={"width": 3}
        )


def test_a_conv_first_layer_asks_for_the_input_shape(tmp_path, lenet_safetensors):
    with pytest.raises(InvalidArgument, match=r"Conv2d.*--input-shape, e\.g\. 1,28,28"):
        add_model(tmp_path, "lenet", lenet_safetensors, model_class="slimserve.zoo:LeNet5")
    version = add_model(
        tmp_path,
        "lenet",
        lenet_safetensors,
        model_class="slimserve.zoo:LeNet5",
        input_shape=[1, 28, 28],
    )
    config = load_model_config(version.parent / "model.yaml")
    assert _tensors(config.inputs) == [("input", "FP32", [-1, 1, 28, 28])]
    assert _tensors(config.outputs) == [("output", "FP32", [-1, 10])]


def test_a_wrong_input_shape_is_reported(tmp_path, mlp_safetensors):
    with pytest.raises(InvalidArgument, match=r"failed on zeros.*--input-shape"):
        add_model(
            tmp_path,
            "t",
            mlp_safetensors,
            model_class="slimserve.zoo:MLP",
            model_args={"sizes": [IN, 8, OUT]},
            input_shape=[IN + 1],
        )


def test_a_fake_safetensors_file_is_refused(tmp_path):
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(InvalidArgument, match="not a readable safetensors"):
        add_model(tmp_path / "repo", "t", fake, model_class="slimserve.zoo:MLP")


# --------------------------------------------------------------------------- transformers


def test_minilm_folder_becomes_an_embedding_model(tmp_path, minilm):
    version = add_model(tmp_path, "minilm", minilm)

    config = load_model_config(version.parent / "model.yaml")
    assert config.backend == "transformers" and config.task == "embedding"
    assert _tensors(config.inputs) == [("text", "BYTES", [-1])]
    assert _tensors(config.outputs) == [("embedding", "FP32", [-1, 384])]
    copied = {p.relative_to(version).as_posix() for p in version.rglob("*") if p.is_file()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "1_Pooling/config.json",
        "MANIFEST.json",
    } <= copied
    assert ".gitattributes" not in copied  # hidden files stay behind
    assert verify_manifest(version)


def test_sequence_classifier_gets_logits_per_label_and_runs(tmp_path, tiny_classifier):
    version = add_model(tmp_path, "sentiment", tiny_classifier)

    config = load_model_config(version.parent / "model.yaml")
    assert config.task == "sequence-classification"
    assert _tensors(config.outputs) == [("logits", "FP32", [-1, 3])]
    runtime = create_runtime(Repository(tmp_path).target("sentiment", 1))
    runtime.load()
    try:
        texts = np.array([b"good movie", b"the bad movie"], dtype=object)
        assert runtime.infer({"text": texts})["logits"].shape == (2, 3)
    finally:
        runtime.unload()


def test_task_can_be_overridden(tmp_path, tiny_classifier):
    version = add_model(tmp_path, "enc", tiny_classifier, task="embedding")
    config = load_model_config(version.parent / "model.yaml")
    assert config.task == "embedding"
    assert _tensors(config.outputs) == [("embedding", "FP32", [-1, 16])]


def test_pickle_only_weights_are_refused_with_the_conversion_hint(tmp_path, pickle_only_folder):
    with pytest.raises(UnsafeArtifact, match=r"pytorch_model\.bin.*safe_serialization=True"):
        add_model(tmp_path / "repo", "old", pickle_only_folder)
    assert not (tmp_path / "repo" / "old").exists()


def test_pickles_beside_safetensors_are_left_behind(tmp_path, tiny_classifier):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in tiny_classifier.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    notes: list[str] = []
    version = add_model(tmp_path / "repo", "mixed", folder, report=notes.append)
    assert not (version / "pytorch_model.bin").exists()
    assert any("pytorch_model.bin" in n for n in notes)


def test_a_folder_without_tokenizer_is_refused(tmp_path, tiny_classifier):
    folder = tmp_path / "no-tok"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((tiny_classifier / name).read_bytes())
    with pytest.raises(InvalidArgument, match="no tokenizer files"):
        add_model(tmp_path / "repo", "m", folder)


def test_out_of_range_batch_sizes_are_refused(tmp_path, dynamic_onnx):
    for size in (-1, 100_000):
        with pytest.raises(InvalidArgument, match=f"--max-batch-size {size}: use 0"):
            add_model(tmp_path, "m", dynamic_onnx, max_batch_size=size)


def test_names_model_yaml_cannot_hold_are_explained(tmp_path):
    from onnx import TensorProto, helper, save

    long = "x" * 300
    graph = helper.make_graph(
        [helper.make_node("Identity", [long], ["y"])],
        "g",
        [helper.make_tensor_value_info(long, TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
    )
    path = tmp_path / "long.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(
        InvalidArgument,
        match=r"long\.onnx -> model\.yaml: field 'name' = 'xxx"
        r".*at most 256 characters; fix: ",
    ):
        add_model(tmp_path / "repo", "m", path)
