"""optimize(): recipes -> variants in the repository, loadable as the server loads them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from slimserve.errors import AlreadyExists, InvalidArgument
from slimserve.optimize import artifacts
from slimserve.optimize.data import digits
from slimserve.optimize.pipeline import Options, optimize
from slimserve.optimize.recipe import parse_recipe
from slimserve.repository import Repository, verify_manifest
from slimserve.repository.schema import load_variant_info
from tests.optimize.quant_fixtures import digits_mlp, make_repository, outputs, tree_digest

FAST = Options(batch_sizes=(1, 8), min_time_s=0.01, max_eval_rows=300)
TRAIN, TEST = digits("train"), digits("test")


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    root = make_repository(tmp_path_factory.mktemp("repo"))
    recipes = [
        "int8",
        "int4:group=32",
        "prune:0.5+finetune:epochs=1+int8",
        "onnx+static-int8",
        "bf16",
        "distill:hidden=32,epochs=15,lr=0.01,progress=false+int8",
        "structured:0.25",
    ]
    result = optimize(root, "mlp", recipes, TRAIN, TEST, FAST)
    return root, result


def _load(root, variant):
    """Load a variant the way the server does: variant.yaml overrides, then the artifact."""
    target = Repository(root).target("mlp", 1, variant)
    info = target.info
    if target.backend == "onnx":
        return target.path / "model.onnx"
    cls = getattr(info, "model_class", None) or target.config.model_class
    args = getattr(info, "model_args", None) or target.config.model_args
    return artifacts.load_torch(target.path, cls, args)


def test_each_recipe_is_a_variant_with_manifest_and_profile(optimized):
    root, result = optimized
    repo = Repository(root)
    names = repo.variants("mlp", 1)
    assert names == sorted(v["name"] for v in result.variants)
    for name in names:
        folder = repo.variant_dir("mlp", 1, name)
        assert verify_manifest(folder) is True
        info = load_variant_info(folder / "variant.yaml")
        assert info.profile.size_bytes > 0 and info.profile.latency_ms_batch1 > 0
        assert 0.9 <= info.profile.agreement <= 1.0
        assert info.profile.accuracy > 0.85
        assert info.recipe["text"]
    assert not [p for p in (root / "mlp/1/variants").iterdir() if p.name.startswith(".")]


def test_variants_reload_from_disk_and_match_what_was_profiled(optimized):
    root, result = optimized
    x = torch.from_numpy(TEST[0][:300])
    ref = outputs(digits_mlp(), x)
    for v in result.variants:
        loaded = _load(root, v["name"])
        if isinstance(loaded, torch.nn.Module):
            got = outputs(loaded, x)
        else:
            import onnxruntime as ort

            got = ort.InferenceSession(str(loaded)).run(None, {"input": x.numpy()})[0]
        agreement = float((got.argmax(1) == ref.argmax(1)).mean())
        assert agreement == pytest.approx(v["profile"]["agreement"], abs=1e-6), v["name"]


def test_quantized_variants_are_smaller_and_say_how_to_build_them(optimized):
    root, result = optimized
    by_name = {v["name"]: v["profile"] for v in result.variants}
    original = result.original["size_bytes"]
    assert by_name["int8"]["size_bytes"] < original / 2.5
    assert by_name["int4group32"]["size_bytes"] < by_name["int8"]["size_bytes"]
    doc = yaml.safe_load((root / "mlp/1/variants/int8/variant.yaml").read_text())
    assert doc["model_class"] == "slimserve.runtimes.quantized.variant:VariantModel"
    assert doc["model_args"]["base_class"] == "slimserve.zoo:MLP"
    assert doc["model_args"]["layers"]["net.0"]["kind"] == "int8_dynamic"
    onnx_doc = yaml.safe_load((root / "mlp/1/variants/onnx_static-int8/variant.yaml").read_text())
    assert onnx_doc["backend"] == "onnx" and "model_class" not in onnx_doc
    assert Repository(root).target("mlp", 1, "onnx_static-int8").backend == "onnx"
    assert doc["measured_on"]["versions"]["torch"].startswith("2.")


def test_bf16_variant_records_the_dtype_it_got(optimized):
    root, _ = optimized
    doc = yaml.safe_load((root / "mlp/1/variants/bf16/variant.yaml").read_text())
    from slimserve.optimize.precision import bf16_supported

    expected = "bfloat16" if bf16_supported() else "float32"
    assert doc["notes"]["dtype"] == expected


def test_distilled_and_structurally_pruned_variants_record_their_new_shapes(optimized):
    root, result = optimized
    names = {v["name"] for v in result.variants}
    distilled = next(n for n in names if n.startswith("distill"))
    doc = yaml.safe_load((root / "mlp/1/variants" / distilled / "variant.yaml").read_text())
    assert doc["model_args"]["base_args"] == {"sizes": [64, 32, 10]}
    assert doc["notes"]["student_sizes"] == [64, 32, 10]
    doc = yaml.safe_load((root / "mlp/1/variants/structured0.25/variant.yaml").read_text())
    layers = doc["model_args"]["layers"]
    assert layers["net.0"]["kind"] == "linear" and layers["net.0"]["out_features"] == 48
    assert layers["net.2"]["in_features"] == 48


def test_report_has_every_variant_and_a_plot(optimized):
    root, result = optimized
    report = json.loads(result.report["json"].read_text())
    assert [v["name"] for v in report["variants"]] == [v["name"] for v in result.variants]
    text = result.report["markdown"].read_text()
    assert "| int8 |" in text and "(original)" in text
    assert result.report["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.report["json"].parent == root / "mlp" / "reports" / "1"


def test_existing_variant_needs_overwrite(optimized, tmp_path):
    root, _ = optimized
    with pytest.raises(AlreadyExists, match="--overwrite"):
        optimize(root, "mlp", ["int8"], TRAIN, TEST, FAST)


def test_overwrite_replaces_a_variant_atomically(tmp_path):
    root = make_repository(tmp_path)
    optimize(root, "mlp", ["int8:per_channel=false"], TRAIN, TEST, FAST)
    before = (root / "mlp/1/variants/int8per_channelfalse/variant.yaml").read_text()
    opts = Options(overwrite=True, batch_sizes=(1,), min_time_s=0.01, max_eval_rows=100)
    optimize(root, "mlp", ["int8:per_channel=false"], TRAIN, TEST, opts)
    after = (root / "mlp/1/variants/int8per_channelfalse/variant.yaml").read_text()
    assert before != after  # new profile
    # a later run's report also lists the variants made before it
    optimize(root, "mlp", ["weight-int8"], TRAIN, TEST, opts)
    report = json.loads((root / "mlp/reports/1/report.json").read_text())
    assert [v["name"] for v in report["earlier_variants"]] == ["int8per_channelfalse"]
    assert "| int8per_channelfalse |" in (root / "mlp/reports/1/report.md").read_text()
    assert sorted(p.name for p in (root / "mlp/1/variants").iterdir()) == [
        "int8per_channelfalse",
        "weight-int8",
    ]


@pytest.mark.parametrize(
    ("recipes", "data", "words"),
    [
        (["int8+quantum"], TRAIN, "unknown recipe step 'quantum'; known steps:"),
        (["prune:1.5"], TRAIN, "amount=1.5 is impossible"),
        (["prune:0.9,final_epochs=2"], TRAIN, "final_epochs applies to retraining; add epochs"),
        (["prune:0.9,rounds=2,epochs=1,final_epochs=1.5"], TRAIN, "final_epochs=1.5: use a whole"),
        (["int8:bits=3"], TRAIN, "bits=3"),
        (["int8:color=red"], TRAIN, "unknown argument 'color'"),
        (["int8+finetune"], TRAIN, "cannot run on a quantized torch model"),
        (["int8+onnx"], TRAIN, "cannot run on a quantized torch model"),
        (["static-int8:calibration=mse"], TRAIN, "use one of minmax"),
        (["int4:group=48"], TRAIN, "32, 64 or 128"),
        (["int8"], (np.zeros((10, 28), np.float32), None), r"shape \[10, 28\] does not fit"),
        (["int8"], (np.zeros((10, 2, 28), np.float32), None), r"shape \[10, 2, 28\] does not"),
        (["int8", "int8"], TRAIN, "same variant"),
        (["qat"], (TRAIN[0], None), "labels"),
    ],
)
def test_bad_input_is_named_and_the_repository_is_unchanged(tmp_path, recipes, data, words):
    root = make_repository(tmp_path)
    before = tree_digest(root)
    with pytest.raises(InvalidArgument, match=words):
        optimize(root, "mlp", recipes, data, TEST, FAST)
    assert tree_digest(root) == before


def test_a_failure_in_a_later_recipe_rolls_back_earlier_ones(tmp_path):
    root = make_repository(tmp_path)
    before = tree_digest(root)
    with pytest.raises(InvalidArgument, match="group_size 128"):
        optimize(root, "mlp", ["int8", "int4:group=128"], TRAIN, TEST, FAST)
    assert tree_digest(root) == before
    assert not (root / "mlp/1/variants").exists()


def test_recipe_files_and_names(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text(
        "name: small\nsteps:\n  - prune: 0.5\n  - finetune: {epochs: 2, lr: 0.001}\n  - int8\n"
    )
    recipe = parse_recipe(str(path))
    assert recipe.name == "small"
    assert [s.spec.name for s in recipe.steps] == ["prune", "finetune", "int8"]
    assert recipe.steps[1].config.epochs == 2 and recipe.steps[0].config.pruning.amount == 0.5
    assert parse_recipe("int4:group=64").steps[0].config.group_size == 64
    with pytest.raises(InvalidArgument, match="needs a name"):
        parse_recipe("finetune:3,4")


def test_onnx_backend_models_take_onnx_level_steps(tmp_path):
    from slimserve.optimize.export import export_onnx

    version = tmp_path / "mlp-onnx" / "1"
    version.mkdir(parents=True)
    export_onnx(
        digits_mlp(), torch.from_numpy(TEST[0][:2]), version / "model.onnx", output_names=["logits"]
    )
    model_yaml = {
        "backend": "onnx",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    (tmp_path / "mlp-onnx" / "model.yaml").write_text(yaml.safe_dump(model_yaml))
    before = tree_digest(tmp_path)
    with pytest.raises(InvalidArgument, match="cannot run on an ONNX model"):
        optimize(tmp_path, "mlp-onnx", ["finetune"], TRAIN, TEST, FAST)
    assert tree_digest(tmp_path) == before
    result = optimize(tmp_path, "mlp-onnx", ["int8", "static-int8"], TRAIN, TEST, FAST)
    for v in result.variants:
        folder = tmp_path / "mlp-onnx/1/variants" / v["name"]
        assert (folder / "model.onnx").is_file() and v["profile"]["agreement"] > 0.95
        doc = yaml.safe_load((folder / "variant.yaml").read_text())
        assert "backend" not in doc  # the same backend as the original
        assert v["profile"]["size_bytes"] < result.original["size_bytes"] / 2


def test_rows_with_the_right_number_of_values_are_reshaped(tmp_path):
    root = make_repository(tmp_path)
    images = (TRAIN[0].reshape(-1, 8, 8), TRAIN[1])  # IDX-like (N, 8, 8) for input [-1, 64]
    result = optimize(root, "mlp", ["int8"], images, None, FAST)
    assert result.variants[0]["profile"]["accuracy"] > 0.85


def test_prune_share_variant_is_stored_as_dcz_and_reloads(tmp_path):
    root = make_repository(tmp_path)
    result = optimize(
        root, "mlp", ["prune:0.8+finetune:epochs=3,lr=0.003+share:bits=4"], TRAIN, TEST, FAST
    )
    (variant,) = result.variants
    folder = root / "mlp/1/variants" / variant["name"]
    assert sorted(p.name for p in folder.iterdir()) == [
        "MANIFEST.json",
        "model.dcz",
        "variant.yaml",
    ]
    doc = yaml.safe_load((folder / "variant.yaml").read_text())
    assert doc["artifact"] == "model.dcz" and "model_class" not in doc
    assert variant["profile"]["size_bytes"] < result.original["size_bytes"] / 8
    assert variant["profile"]["accuracy"] > 0.8
    model = artifacts.load_torch(folder, "slimserve.zoo:MLP", {"sizes": [64, 64, 10]})
    weights = model.net[0].weight
    assert len(torch.unique(weights[weights != 0])) <= 15  # 4 bits: 15 shared values + zero
    with pytest.raises(InvalidArgument, match="cannot run on a weight-shared"):
        optimize(root, "mlp", ["share:bits=4+int8"], TRAIN, TEST, FAST)
