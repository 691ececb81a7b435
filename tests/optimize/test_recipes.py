"""Each recipe kind through the command line on digits (issue 16): deep-compression, iterative
pruning and structured pruning as one step each, recipes that need no data, the steps that do
saying so, and missing optional dependencies named in one line."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from slimserve.cli import main
from slimserve.optimize.data import digits
from slimserve.optimize.deep_compression import CONV_LR, FC_LR, DeepCompression, schedule_for
from slimserve.optimize.recipe import parse_step
from slimserve.zoo import LeNet5
from tests.optimize.quant_fixtures import make_repository, tree_digest

FAST = ["--batch-sizes", "1,4", "--min-time-s", "0.01", "--max-eval-rows", "300"]


@pytest.fixture()
def repo(tmp_path):
    root = make_repository(tmp_path / "models")
    for split in ("train", "test"):
        x, y = digits(split)
        np.savez(tmp_path / f"{split}.npz", x=x, y=y)
    return root


def _optimize(repo, *args: str, data: bool = True) -> int:
    files = ["--data", str(repo.parent / "train.npz"), "--eval-data", str(repo.parent / "test.npz")]
    return main(["optimize", "mlp", "-r", str(repo), *args, *FAST, *(files if data else [])])


def _variant(repo, name: str) -> dict:
    return yaml.safe_load((repo / "mlp" / "1" / "variants" / name / "variant.yaml").read_text())


def test_deep_compression_is_one_step_with_rounds_sharing_and_a_dcz(repo, capsys):
    recipe = "deep-compression:ratio=4,rounds=2,epochs=1,final_epochs=1,centroid_epochs=1"
    assert _optimize(repo, "--recipe", recipe, "--seed", "3") == 0
    (name,) = (repo / "mlp" / "1" / "variants").iterdir()
    doc = _variant(repo, name.name)
    assert doc["artifact"] == "model.dcz" and (name / "model.dcz").is_file()
    original = doc["baseline"]
    assert original["size_bytes"] / doc["profile"]["size_bytes"] >= 4
    # The held-out accuracy of the reloaded variant stays near the baseline it came from.
    assert doc["profile"]["accuracy"] >= original["accuracy"] - 0.1
    dc = doc["notes"]["deep_compression"]
    assert len(dc["rounds"]) == 2 and dc["rounds"][0]["sparsity"] < dc["rounds"][1]["sparsity"]
    assert all(r["accuracy"] is not None for r in dc["rounds"])
    assert dc["schedule"]["lr"] == FC_LR  # the digits model has no convolutions
    assert doc["seed"] == 3
    report = (repo / "mlp" / "reports" / "1" / "report.md").read_text()
    assert "baseline accuracy" in report and f"| {name.name} |" in report


def test_deep_compression_retrains_fully_connected_models_at_a_higher_rate():
    # Measured on Fashion-MNIST at 40x (RESULTS.md, issue 16): LeNet-300-100 lost less at 6e-4
    # than at 3e-4; LeNet-5 met its target at 3e-4. A rate the user gives wins over both.
    config = DeepCompression()
    assert FC_LR > CONV_LR
    assert schedule_for(config, 60_000, 0.9, has_conv=False).lr == FC_LR
    assert schedule_for(config, 60_000, 0.9, has_conv=True).lr == CONV_LR
    assert schedule_for(DeepCompression(lr=1e-4), 60_000, 0.9, has_conv=False).lr == 1e-4


def test_deep_compression_can_retrain_from_the_dense_models_soft_targets(repo):
    # Off by default (it measured worse on LeNet-300-100); bits as Han et al.: conv 8, fc 5.
    assert DeepCompression().distill == 0 and DeepCompression().conv_bits == 8
    recipe = "deep-compression:ratio=4,rounds=2,epochs=1,final_epochs=1,centroid_epochs=0"
    assert _optimize(repo, "--recipe", recipe + ",distill=0.9,temperature=2") == 0
    (folder,) = (repo / "mlp" / "1" / "variants").iterdir()
    doc = _variant(repo, folder.name)
    assert doc["notes"]["deep_compression"]["rounds"][1]["sparsity"] > 0.5
    assert doc["profile"]["accuracy"] >= doc["baseline"]["accuracy"] - 0.1


@pytest.mark.parametrize(
    ("param", "words"),
    [("distill=1.5", ["distill=1.5", "[0, 1]"]), ("temperature=0", ["temperature=0", "e.g. 4"])],
)
def test_deep_compression_refuses_bad_distillation_settings(repo, capsys, param, words):
    assert _optimize(repo, "--recipe", f"deep-compression:{param}") == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


def test_iterative_pruning_is_one_step(repo):
    assert _optimize(repo, "--recipe", "prune:0.8,rounds=3,epochs=1") == 0
    notes = _variant(repo, "prune0.8-rounds3-epochs1")["notes"]
    sparsities = [r["sparsity"] for r in notes["rounds"]]
    assert len(sparsities) == 3 and sparsities == sorted(sparsities)
    assert notes["sparsity"] == pytest.approx(0.8, abs=0.02)
    assert all(r["accuracy"] > 0.5 for r in notes["rounds"])
    # Defaults chosen on Fashion-MNIST's validation split (RESULTS.md, issue 16, session 5): one
    # global threshold, and retraining at the rate deep-compression uses for the model's kind.
    assert notes["retrain_lr"] == FC_LR
    assert parse_step("prune:0.9,rounds=2,epochs=1").config.pruning.scope == "global"
    assert parse_step("prune:0.9,scope=layer").config.pruning.scope == "layer"


def test_iterative_structured_pruning_is_one_step(repo):
    assert _optimize(repo, "--recipe", "structured:0.5,rounds=2,epochs=1") == 0
    doc = _variant(repo, "structured0.5-rounds2-epochs1")
    assert len(doc["notes"]["rounds"]) == 2
    hidden = doc["model_args"]["layers"]["net.0"]["out_features"]
    assert 28 <= hidden <= 36  # 64 neurons, half removed in two rounds


def test_a_convolutional_teacher_distills_into_an_mlp_student(tmp_path):
    # hidden= sizes the student for any teacher ending in a Linear layer (issue 16: LeNet-5
    # taught 784-300-100-10 on Fashion-MNIST); inputs are flattened, the teacher's classes kept.
    torch.manual_seed(0)
    teacher = LeNet5().eval()
    save_file(teacher.state_dict(), str(tmp_path / "lenet.safetensors"))
    x = torch.rand(256, 1, 28, 28)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    repo = str(tmp_path / "r")
    add = ["--model-class", "slimserve.zoo:LeNet5", "--input-shape", "1,28,28"]
    assert (
        main(["repo", "add", "lenet", str(tmp_path / "lenet.safetensors"), "-r", repo, *add]) == 0
    )
    recipe = "distill:hidden=16,epochs=3,temperature=2,alpha=0.5"
    assert (
        main(
            [
                "optimize",
                "lenet",
                "-r",
                repo,
                "--recipe",
                recipe,
                "--data",
                str(tmp_path / "d.npz"),
                *FAST,
            ]
        )
        == 0
    )
    (path,) = (tmp_path / "r" / "lenet" / "1" / "variants").glob("*/variant.yaml")
    doc = yaml.safe_load(path.read_text())
    assert doc["model_args"] == {"sizes": [784, 16, 10]}
    assert doc["profile"]["agreement"] > 0.5, doc["profile"]


DATA_FREE = ["int8", "weight-int8", "int4:group=32", "bf16", "prune:0.5", "structured:0.3"]


def test_data_free_recipes_run_without_data(repo, capsys):
    args = [a for r in [*DATA_FREE, "share:bits=4", "onnx"] for a in ("--recipe", r)]
    assert _optimize(repo, *args, data=False) == 0
    out = capsys.readouterr().out
    assert out.count("accuracy not measured") == len(DATA_FREE) + 2
    for folder in (repo / "mlp" / "1" / "variants").iterdir():
        profile = _variant(repo, folder.name)["profile"]
        assert profile["accuracy"] is None and profile["data"] == "synthetic"
        assert 0 <= profile["agreement"] <= 1 and profile["latency_ms_batch1"] > 0
    report = (repo / "mlp" / "reports" / "1" / "report.md").read_text()
    assert "not measured" in report and "No --data" in report


@pytest.mark.parametrize(
    ("recipe", "words"),
    [
        ("deep-compression", ["deep-compression", "labelled data", "--data"]),
        ("finetune:epochs=1", ["finetune", "--data"]),
        ("prune:0.9,rounds=2,epochs=1", ["prune", "--data"]),
        ("share:bits=5,epochs=1", ["share", "--data"]),
        ("static-int8", ["static-int8", "representative inputs", "--data"]),
    ],
)
def test_steps_that_need_data_say_so_naming_the_flag(repo, capsys, recipe, words):
    before = tree_digest(repo)
    assert _optimize(repo, "--recipe", recipe, data=False) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert tree_digest(repo) == before


def test_an_onnx_model_takes_int8_without_data(tmp_path, capsys):
    import torch

    from slimserve.optimize.export import export_onnx
    from tests.optimize.quant_fixtures import digits_mlp

    path = tmp_path / "model.onnx"
    export_onnx(digits_mlp(), torch.zeros(2, 64), path, input_names=["input"])
    assert main(["repo", "add", "m", str(path), "-r", str(tmp_path / "r")]) == 0
    assert main(["optimize", "m", "-r", str(tmp_path / "r"), "--recipe", "int8", *FAST]) == 0
    assert "accuracy not measured" in capsys.readouterr().out


_BLOCKER = """
import sys
from importlib.abc import MetaPathFinder

class Blocker(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Blocker())
from slimserve.cli import main
sys.exit(main({argv!r}))
"""


def _without(module: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
    code = textwrap.dedent(_BLOCKER).format(blocked=module, argv=argv)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


@pytest.mark.parametrize(("module", "package"), [("torch", "torch"), ("sklearn", "scikit-learn")])
def test_a_missing_optional_dependency_is_one_line_saying_what_to_install(repo, module, package):
    argv = ["optimize", "mlp", "-r", str(repo), "--data", "digits", "--recipe", "int8", *FAST]
    done = _without(module, argv)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"slimserve optimize: error: {package} is not installed; pip install 'slimserve[optimize]'"
    ]


def test_without_matplotlib_the_report_skips_its_plot_with_a_warning(repo):
    argv = ["optimize", "mlp", "-r", str(repo), "--recipe", "int8", *FAST]
    done = _without("matplotlib", argv)
    assert done.returncode == 0, done.stderr
    assert "report.png skipped: matplotlib is not installed" in done.stderr
    assert "pip install 'slimserve[optimize]'" in done.stderr
    assert not (repo / "mlp" / "reports" / "1" / "report.png").exists()
