"""Pipeline-parallel, FSDP and hybrid dp x pp training in real processes (torchrun, gloo, CPU)
train exactly like one process.

Each layout trains an MLP teacher on the digits (SGD with gradient clipping, a short last
batch) and then distills a student from it (the teacher's forward pipelined under pp). Every
rank's final weights and per-epoch losses must equal the single-process run's up to float
summation order: measured about 3e-8; we allow 1e-5. A QAT copy of the teacher must come out
about as accurate as one process's (its range trackers cannot match exactly, see README).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.train.launch import load_worker, torchrun

WORKER = Path(__file__).with_name("parallel_worker.py")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference():
    torch.set_num_threads(1)
    result = load_worker(WORKER).run()
    weights = {f"teacher.{k}": v for k, v in result["teacher"].state_dict().items()}
    weights |= {f"student.{k}": v for k, v in result["student"].state_dict().items()}
    return weights, {k: result[k] for k in ("losses", "distill_losses", "qat_accuracy")}


@pytest.mark.parametrize(("spec", "procs"), [("pp=2", 2), ("fsdp=2", 2), ("dp=2,pp=2", 4)])
def test_layout_trains_like_one_process(spec, procs, tmp_path, reference):
    proc = torchrun(procs, [str(WORKER), spec, str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights, losses = reference
    for rank in range(procs):
        got = load_file(tmp_path / f"rank{rank}.safetensors")
        assert got.keys() == weights.keys()
        for name, tensor in weights.items():
            torch.testing.assert_close(got[name], tensor, atol=TOLERANCE, rtol=0, msg=name)
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key in ("losses", "distill_losses"):
            assert report[key] == pytest.approx(losses[key], abs=TOLERANCE), (rank, key)
        # QAT's range trackers see shares of batches or micro-batches: close, not equal
        # (trackers fed uninitialised tensors gave 0.41 against 0.67 here).
        assert abs(report["qat_accuracy"] - losses["qat_accuracy"]) < 0.05, report
    # training moved the weights: the comparison is not between two initial models
    torch.manual_seed(0)
    from slimserve.zoo import MLP

    initial = MLP([64, 48, 32, 10]).state_dict()
    assert (initial["net.0.weight"] - weights["teacher.net.0.weight"]).abs().max() > 1e-2
