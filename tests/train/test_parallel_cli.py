"""`slimserve optimize ... --parallel pp=2` under torchrun, end to end, against one process.

Two real processes (torchrun, gloo) run a fine-tuning recipe and a distillation recipe with
the model cut into two pipeline stages (the teacher's forward pipelined too); rank 0 alone
writes the variants. Their weights must equal those `slimserve optimize` makes in one process.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimserve.cli import main
from slimserve.optimize.data import digits
from tests.optimize.quant_fixtures import make_repository, tree_digest
from tests.train.launch import torchrun

FAST = ["--batch-sizes", "1,4", "--min-time-s", "0.01", "--max-eval-rows", "200"]
RECIPES = ["--recipe", "finetune:epochs=1,lr=0.01", "--recipe", "distill:hidden=16,epochs=1"]


@pytest.fixture()
def train_npz(tmp_path: Path) -> Path:
    x, y = digits("train")
    np.savez(tmp_path / "train.npz", x=x, y=y)
    return tmp_path / "train.npz"


def test_optimize_pp2_under_torchrun_matches_one_process(tmp_path, train_npz):
    split, single = make_repository(tmp_path / "pp"), make_repository(tmp_path / "one")
    argv = ["optimize", "mlp", "--data", str(train_npz), *RECIPES, *FAST]
    proc = torchrun(2, ["-m", "slimserve", *argv, "-r", str(split), "--parallel", "pp=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # rank 0 alone reports
    assert main([*argv, "-r", str(single)]) == 0

    names = sorted(p.name for p in (single / "mlp/1/variants").iterdir())
    assert sorted(p.name for p in (split / "mlp/1/variants").iterdir()) == names
    assert len(names) == 2
    for name in names:
        got = load_file(split / "mlp/1/variants" / name / "model.safetensors")
        want = load_file(single / "mlp/1/variants" / name / "model.safetensors")
        assert got.keys() == want.keys()
        for key, tensor in want.items():
            torch.testing.assert_close(got[key], tensor, atol=1e-5, rtol=0, msg=f"{name}.{key}")
    original = load_file(single / "mlp/1/model.safetensors")
    tuned = load_file(single / "mlp/1/variants" / names[-1] / "model.safetensors")
    assert (original["net.0.weight"] - tuned["net.0.weight"]).abs().max() > 1e-3  # it trained


def test_a_layout_that_does_not_fit_the_processes_is_refused(tmp_path, train_npz):
    root = make_repository(tmp_path / "models")
    before = tree_digest(root)
    argv = ["optimize", "mlp", "-r", str(root), "--data", str(train_npz), *RECIPES[:2]]
    proc = torchrun(2, ["-m", "slimserve", *argv, "--parallel", "dp=2,pp=2"])
    assert proc.returncode != 0
    assert "needs 4 processes (the product of its degrees) but torchrun started 2" in proc.stderr
    assert tree_digest(root) == before


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("pp=2", "needs 2 processes but this is one process; start it with torchrun"),
        ("tp=2", "NAME one of dp, fsdp, pp"),
    ],
)
def test_bad_parallel_specs_exit_2_with_the_fix(tmp_path, train_npz, capsys, spec, words):
    root = make_repository(tmp_path / "models")
    before = tree_digest(root)
    argv = ["optimize", "mlp", "-r", str(root), "--data", str(train_npz), *RECIPES[:2]]
    assert main([*argv, "--parallel", spec]) == 2
    assert words in capsys.readouterr().err
    assert tree_digest(root) == before
