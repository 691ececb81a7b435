"""`slimserve optimize` from the command line: real argv, real repository, exit codes."""

from __future__ import annotations

import numpy as np
import pytest

from slimserve.cli import main
from slimserve.optimize.data import digits
from tests.optimize.quant_fixtures import make_repository, tree_digest

FAST = ["--batch-sizes", "1,4", "--min-time-s", "0.01", "--max-eval-rows", "200"]


@pytest.fixture()
def repo_and_data(tmp_path):
    root = make_repository(tmp_path / "models")
    x, y = digits("train")
    np.savez(tmp_path / "train.npz", x=x, y=y)
    xt, yt = digits("test")
    np.savez(tmp_path / "test.npz", x=xt, y=yt)
    return root, tmp_path / "train.npz", tmp_path / "test.npz"


def test_optimize_writes_variants_and_a_report(repo_and_data, capsys):
    root, train, test = repo_and_data
    code = main(
        [
            "optimize",
            "mlp",
            "--repository",
            str(root),
            "--recipe",
            "int8",
            "--recipe",
            "onnx+int8",
            "--data",
            str(train),
            "--eval-data",
            str(test),
            *FAST,
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "mlp:int8:" in out and "mlp:onnx_int8:" in out and "report:" in out
    assert sorted(p.name for p in (root / "mlp/1/variants").iterdir()) == ["int8", "onnx_int8"]
    assert (root / "mlp/reports/1/report.png").is_file()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--recipe", "int9"], "unknown recipe step 'int9'"),
        (["--recipe", "prune:1.5"], "amount=1.5 is impossible"),
        (["--recipe", "int8", "--batch-sizes", "0"], "--batch-sizes"),
        (["--recipe", "int8", "--data", "nope.parquet"], "unknown format"),
    ],
)
def test_bad_input_exits_2_with_the_reason_and_changes_nothing(repo_and_data, capsys, args, words):
    root, train, _ = repo_and_data
    before = tree_digest(root)
    argv = ["optimize", "mlp", "--repository", str(root), "--data", str(train), *FAST, *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "slimserve optimize: error:" in err and words in err
    assert tree_digest(root) == before


def test_unknown_model_is_not_found(repo_and_data, capsys):
    root, train, _ = repo_and_data
    assert (
        main(["optimize", "nomodel", "-r", str(root), "--recipe", "int8", "--data", str(train)])
        == 2
    )
    assert "'nomodel' is not in the repository" in capsys.readouterr().err
