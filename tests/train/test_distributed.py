"""Two real processes under torchrun (gloo, CPU) train like one process.

Both runs see the same global batches in the same order (DistributedSampler in both), each
rank half of every batch; DDP averages the gradients. The weights may differ only by float
summation order: we allow 1e-5 absolute after 48 SGD steps (measured: about 1e-7).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.train.launch import load_worker, torchrun

WORKER = Path(__file__).with_name("ddp_worker.py")
TOLERANCE = 1e-5


def test_two_process_ddp_matches_single_process(tmp_path):
    proc = torchrun(2, [str(WORKER), str(tmp_path)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors", "rank0.json"]
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["world"] == 2

    model, losses, world = load_worker(WORKER).train()
    assert world == 1
    ddp = load_file(tmp_path / "model.safetensors")
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(ddp[name], tensor, atol=TOLERANCE, rtol=0)
    assert max(abs(a - b) for a, b in zip(report["losses"], losses, strict=True)) < 1e-5
    # and training did move the weights: the comparison is not between two initial models
    torch.manual_seed(0)
    from slimserve.zoo import MLP

    initial = MLP([64, 32, 10]).state_dict()
    assert (initial["net.0.weight"] - ddp["net.0.weight"]).abs().max() > 1e-2
