"""A distillation teacher too large for one process's memory budget, split over two pipeline
stages that each read only their own tensors from its file (real torchrun): each process's
peak memory growth stays under the budget while one process loading the teacher whole goes
over it, and the student comes out as one process trains it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from slimserve.zoo import MLP
from tests.train.launch import torchrun

WORKER = Path(__file__).with_name("lazy_teacher_worker.py")
sys.path.insert(0, str(WORKER.parent))
from lazy_teacher_worker import TEACHER  # noqa: E402


def run(args: list[str], procs: int) -> None:
    if procs == 1:
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                              timeout=300)  # fmt: skip
    else:
        done = torchrun(procs, args)
    assert done.returncode == 0, done.stderr[-3000:]


def test_a_teacher_over_the_budget_distills_split_in_two_stages(tmp_path: Path) -> None:
    folder, whole, split = tmp_path / "teacher", tmp_path / "whole", tmp_path / "split"
    for d in (folder, whole, split):
        d.mkdir()
    torch.manual_seed(0)
    teacher = MLP(TEACHER)
    save_file(dict(teacher.state_dict()), folder / "model.safetensors")
    teacher_bytes = sum(t.numel() * t.element_size() for t in teacher.state_dict().values())
    budget = 0.75 * teacher_bytes  # no process may grow by this much
    run([str(WORKER), str(folder), str(whole)], 1)
    run([str(WORKER), str(folder), str(split), "pp=2"], 2)
    runs = {"whole": whole / "rank0.json", "stage0": split / "rank0.json",
            "stage1": split / "rank1.json"}  # fmt: skip
    growth = {name: json.loads(path.read_text())["growth"] for name, path in runs.items()}
    assert growth["whole"] > budget, growth  # the measure sees a whole teacher
    assert growth["stage0"] < budget and growth["stage1"] < budget, (growth, budget)
    want = load_file(whole / "rank0.safetensors")
    for rank in (0, 1):
        got = load_file(split / f"rank{rank}.safetensors")
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5)
