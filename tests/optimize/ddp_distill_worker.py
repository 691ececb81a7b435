"""Worker for test_distill.py's DDP test: `torchrun --nproc_per_node=2 ddp_distill_worker.py OUT`.

Online distillation with a deterministic view (each image mirrored left-right), so two
processes must train the student as one does. `train()` also runs in-process as the reference.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits

from slimserve.optimize.distillation import DistillConfig, distill
from slimserve.train.distributed import init_distributed, is_main_process, shutdown
from slimserve.zoo import MLP

N = 1536  # divisible by the global batch: every rank sees equally many full batches


def mirror(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x (B, 64): every 8x8 digit mirrored left-right."""
    return x.view(-1, 8, 8).flip(-1).reshape(len(x), 64)


CONFIG = DistillConfig(
    2.0, 1.0, epochs=2, lr=0.05, optimizer="sgd", batch_size=64, progress=False, augment=mirror
)


def train() -> tuple[MLP, list[float], int]:
    d = load_digits()
    x = torch.tensor(d.data[:N], dtype=torch.float32) / 16
    y = torch.tensor(d.target[:N])
    torch.manual_seed(0)  # the same teacher and initial student on every rank
    teacher, student = MLP([64, 48, 10]), MLP([64, 16, 10])
    result = distill(teacher, student, (x, y), CONFIG)
    return student, result.epoch_losses, result.world_size


def main(out: Path) -> None:
    torch.set_num_threads(1)
    init_distributed()
    student, losses, world = train()
    if is_main_process():  # only rank 0 writes
        from safetensors.torch import save_file

        save_file(student.state_dict(), out / "student.safetensors")
        (out / "rank0.json").write_text(json.dumps({"losses": losses, "world": world}))
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
