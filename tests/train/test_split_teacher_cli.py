"""`slimserve optimize NAME --recipe distill:... --parallel pp=2` under real torchrun, with an
original (the teacher) larger than each process's memory budget: no process loads it whole
(each reads its own stage from model.safetensors, and the original is profiled stage by stage),
and the student equals the one `distill()` makes in one process from the same files.

Each process's peak memory growth over the command must exceed its stage's weights (the
measure sees what a process holds) and stay under 3/4 of the teacher (one process loading the
teacher whole grows by about twice the teacher: tests/train/test_lazy_teacher.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from slimserve.optimize.artifacts import TorchFiles
from slimserve.optimize.data import digits
from slimserve.optimize.distillation import DistillConfig, derive_student, distill
from slimserve.repository import write_manifest
from slimserve.zoo import MLP
from tests.train.launch import torchrun

WORKER = Path(__file__).with_name("cli_memory_worker.py")
TEACHER = [64, *[1024] * 65, 10]  # 64 layers of 4 MiB: 256.3 MiB of fp32 weights
RECIPE = "distill:width=0.03125,depth=1,epochs=1,lr=0.05,optimizer=sgd,batch_size=64"
FAST = ["--batch-sizes", "1,4", "--min-time-s", "0.01", "--max-eval-rows", "64"]


def make_repository(root: Path) -> Path:
    """Model `big`: a 256 MiB MLP (random weights: a teacher is a teacher) taking digits rows."""
    version = root / "big" / "1"
    version.mkdir(parents=True)
    torch.manual_seed(0)
    save_file(dict(MLP(TEACHER).state_dict()), version / "model.safetensors")
    config = {
        "backend": "torch",
        "model_class": "slimserve.zoo:MLP",
        "model_args": {"sizes": TEACHER},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    (root / "big" / "model.yaml").write_text(yaml.safe_dump(config))
    write_manifest(version)
    return version


def test_optimize_pp2_distills_a_teacher_over_the_budget_without_loading_it_whole(tmp_path):
    x, y = digits("train")
    x, y = x[:256], y[:256]
    np.savez(tmp_path / "train.npz", x=x, y=y)
    version = make_repository(tmp_path / "models")
    teacher_bytes = (version / "model.safetensors").stat().st_size
    out = tmp_path / "memory"
    out.mkdir()
    argv = ["optimize", "big", "-r", str(tmp_path / "models"), "--recipe", RECIPE, *FAST]
    argv += ["--data", str(tmp_path / "train.npz"), "--parallel", "pp=2"]
    done = torchrun(2, [str(WORKER), str(out), *argv])
    assert done.returncode == 0, done.stderr[-3000:]
    growth = [json.loads((out / f"rank{r}.json").read_text())["growth"] for r in (0, 1)]
    budget = 0.75 * teacher_bytes
    assert all(teacher_bytes / 2 < g < budget for g in growth), (growth, teacher_bytes)

    # The library path, one process: distill() from the same files, the same seeds.
    torch.manual_seed(0)
    with torch.device("meta"):
        shape = MLP(TEACHER)
    student = derive_student(shape, 0.03125, 1)
    config = DistillConfig(epochs=1, lr=0.05, optimizer="sgd", batch_size=64, progress=False)
    teacher = TorchFiles(version, "slimserve.zoo:MLP", {"sizes": TEACHER})
    distill(teacher, student, (torch.from_numpy(x), torch.from_numpy(y)), config)
    (folder,) = (version / "variants").iterdir()
    got = load_file(folder / "model.safetensors")
    for key, value in student.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)

    # The original's profile, measured stage by stage, as the whole teacher gives it.
    baseline = yaml.safe_load((folder / "variant.yaml").read_text())["baseline"]
    with torch.inference_mode():
        logits = teacher.load()(torch.from_numpy(x[:64]))
    assert baseline["accuracy"] == float((logits.argmax(1).numpy() == y[:64]).mean())
    assert baseline["size_bytes"] == teacher_bytes and baseline["latency_ms_batch1"] > 0
