"""Worker for test_lazy_teacher.py: distills a small student from a teacher given as files
(TorchFiles), recording this process's peak resident-memory growth over the distillation.

    python lazy_teacher_worker.py FOLDER OUT_DIR                                # one process
    torchrun --nproc_per_node=2 lazy_teacher_worker.py FOLDER OUT_DIR pp=2      # a stage each

Growth: Linux's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs just
before) minus the resident set then; imports and data come before and are not counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from slimserve.optimize.artifacts import TorchFiles
from slimserve.optimize.distillation import DistillConfig, distill
from slimserve.train.distributed import context, init_distributed, shutdown
from slimserve.train.parallel import parse_parallel
from slimserve.zoo import MLP

TEACHER = [64, *[1024] * 33, 10]  # 32 layers of 4 MiB: 128.3 MiB of fp32 weights
CONFIG = DistillConfig(2.0, 0.5, epochs=1, lr=0.05, optimizer="sgd", batch_size=64, progress=False)


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def main(folder: Path, out: Path, spec: str | None) -> None:
    torch.set_num_threads(1)
    if spec:
        init_distributed(parallel=parse_parallel(spec))
    torch.manual_seed(1)
    x, y = torch.rand(256, 64), torch.randint(0, 10, (256,))
    torch.manual_seed(0)  # the same student on every rank
    student = MLP([64, 32, 10])
    teacher = TorchFiles(folder, "slimserve.zoo:MLP", {"sizes": TEACHER})
    Path("/proc/self/clear_refs").write_text("5")
    before = status_bytes("VmRSS")
    result = distill(teacher, student, (x, y), CONFIG)
    growth = status_bytes("VmHWM") - before
    rank = context().rank
    save_file(dict(student.state_dict()), out / f"rank{rank}.safetensors")
    (out / f"rank{rank}.json").write_text(
        json.dumps({"growth": growth, "losses": result.epoch_losses})
    )
    if spec:
        shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
