"""model.yaml / variant.yaml: each mistake is named with its file, field, value and a fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from slimserve.errors import ConfigError
from slimserve.repository.schema import (
    dump_model_config,
    load_model_config,
    load_variant_info,
)

GOOD = """\
backend: onnx
inputs:  [{name: input,  datatype: FP32, shape: [-1, 784]}]
outputs: [{name: logits, datatype: FP32, shape: [-1, 10]}]
batching: {max_batch_size: 32, max_queue_delay_ms: 2}
"""


def _write(tmp_path: Path, text: str, name: str = "model.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_readme_example_loads(tmp_path):
    config = load_model_config(_write(tmp_path, GOOD))
    assert config.backend == "onnx"
    assert [s.to_dict() for s in config.input_specs()] == [
        {"name": "input", "datatype": "FP32", "shape": [-1, 784]}
    ]
    assert config.batched and config.batching.max_queue_delay_ms == 2


def test_datatypes_are_case_insensitive(tmp_path):
    config = load_model_config(_write(tmp_path, GOOD.replace("FP32", "fp32")))
    assert config.inputs[0].datatype == "FP32"


@pytest.mark.parametrize(
    ("old", "new", "field", "value", "fix"),
    [
        (
            "backend: onnx",
            "backend: tensorflow",
            "backend",
            "'tensorflow'",
            "use one of onnx, torch, transformers, python",
        ),
        (
            "datatype: FP32, shape: [-1, 784]",
            "datatype: FLOAT32, shape: [-1, 784]",
            "inputs.0.datatype",
            "'FLOAT32'",
            "use one of BOOL",
        ),
        ("shape: [-1, 784]", "shape: [-1, 0]", "inputs.0.shape", "[-1, 0]", "-1 for a free"),
        ("shape: [-1, 10]", "shape: [-1, ten]", "outputs.0.shape.1", "'ten'", "list of integers"),
        (
            "max_batch_size: 32",
            "max_batch_size: -4",
            "batching.max_batch_size",
            "-4",
            "use 0 for a model without a batch dimension",
        ),
        (
            "max_queue_delay_ms: 2",
            "max_queue_delay_ms: -1",
            "batching.max_queue_delay_ms",
            "-1",
            "milliseconds",
        ),
        ("batching:", "batchin:", "batchin", "{'max_batch_size'", "check its spelling"),
        ("name: input,", "name: '',", "inputs.0.name", "''", "non-empty name"),
    ],
)
def test_each_mistake_names_file_field_value_and_fix(tmp_path, old, new, field, value, fix):
    path = _write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigError) as exc:
        load_model_config(path)
    message = exc.value.message
    assert str(path) in message
    assert f"field '{field}'" in message
    assert value in message
    assert "fix: " + fix in message or fix in message.split("fix: ", 1)[1]


def test_every_mistake_is_listed_at_once(tmp_path):
    text = GOOD.replace("backend: onnx", "backend: tf").replace("FP32", "F32")
    with pytest.raises(ConfigError) as exc:
        load_model_config(_write(tmp_path, text))
    assert len(exc.value.message.splitlines()) == 3  # backend, inputs.0, outputs.0


def test_a_missing_field_says_to_add_it(tmp_path):
    with pytest.raises(ConfigError, match=r"field 'backend': Field required; fix: use one of"):
        load_model_config(_write(tmp_path, GOOD.replace("backend: onnx\n", "")))


def test_a_batched_model_needs_a_free_first_dimension(tmp_path):
    path = _write(tmp_path, GOOD.replace("shape: [-1, 10]", "shape: [1, 10]"))
    with pytest.raises(ConfigError) as exc:
        load_model_config(path)
    assert "field 'outputs.0.shape' = [1, 10]" in exc.value.message
    assert "max_batch_size: 0" in exc.value.message
    # ... and without batching the same shape is fine
    load_model_config(
        _write(
            tmp_path,
            GOOD.replace("shape: [-1, 10]", "shape: [1, 10]").replace(
                "max_batch_size: 32", "max_batch_size: 0"
            ),
        )
    )


def test_duplicate_tensor_names_are_refused(tmp_path):
    text = GOOD.replace(
        "inputs:  [{name: input,  datatype: FP32, shape: [-1, 784]}]",
        "inputs: [{name: a, datatype: FP32, shape: [-1]}, {name: a, datatype: FP32, shape: [-1]}]",
    )
    with pytest.raises(ConfigError, match=r"field 'inputs': duplicate names \['a'\]; fix"):
        load_model_config(_write(tmp_path, text))


def test_transformers_needs_a_task(tmp_path):
    text = "backend: transformers\ninputs: [{name: text, datatype: BYTES, shape: [-1]}]\n"
    with pytest.raises(ConfigError, match=r"field 'task' is missing.*task: embedding"):
        load_model_config(_write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"field 'task' = 'chat'.*embedding or sequence"):
        load_model_config(_write(tmp_path, text + "task: chat\n"))


def test_model_class_must_name_module_and_class(tmp_path):
    text = GOOD.replace("backend: onnx", "backend: torch\nmodel_class: slimserve.zoo.MLP")
    with pytest.raises(ConfigError, match=r"field 'model_class' = 'slimserve.zoo.MLP'.*fix: "):
        load_model_config(_write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("backend: [onnx\n", "not valid YAML"),
        ("- just\n- a list\n", "expected a mapping"),
        ("", "expected a mapping"),
    ],
)
def test_files_that_are_not_a_mapping(tmp_path, text, match):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as exc:
        load_model_config(path)
    assert str(path) in exc.value.message


def test_a_missing_model_yaml_says_how_to_make_one(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.yaml: missing.*slimserve repo add"):
        load_model_config(tmp_path / "model.yaml")


def test_dump_round_trips_and_leaves_defaults_out(tmp_path):
    config = load_model_config(_write(tmp_path, GOOD))
    text = dump_model_config(config)
    assert "normalize" not in text and "max_length" not in text and "parameters" not in text
    assert text.splitlines()[0] == "backend: onnx"
    assert load_model_config(_write(tmp_path, text, "again.yaml")) == config


def test_dump_keeps_torch_fields(tmp_path):
    text = GOOD.replace(
        "backend: onnx",
        "backend: torch\nmodel_class: 'slimserve.zoo:MLP'\nmodel_args: {sizes: [784, 10]}",
    )
    config = load_model_config(_write(tmp_path, text))
    dumped = dump_model_config(config)
    assert load_model_config(_write(tmp_path, dumped, "again.yaml")) == config
    assert dumped.index("model_class") < dumped.index("inputs")


def test_variant_info(tmp_path):
    assert load_variant_info(tmp_path / "variant.yaml").profile.size_bytes is None
    info = load_variant_info(
        _write(
            tmp_path,
            "backend: onnx\nrecipe: int8\nprofile: {size_bytes: 1000, agreement: 0.99}\n",
            "variant.yaml",
        )
    )
    assert info.backend == "onnx" and info.recipe == "int8"
    assert info.profile.size_bytes == 1000 and info.profile.agreement == 0.99
    path = _write(tmp_path, "profile: {size_bytes: lots}\n", "variant.yaml")
    with pytest.raises(ConfigError, match=r"variant\.yaml: field 'profile.size_bytes' = 'lots'"):
        load_variant_info(path)
