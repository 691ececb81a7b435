"""Worker for test_parallel.py: `torchrun --nproc_per_node=N parallel_worker.py SPEC OUT_DIR`.

Trains a small MLP on the digits with the layout SPEC (e.g. pp=2, fsdp=2, dp=2,pp=2), then
distills it into a student with the teacher's forward pipelined when SPEC has pp, then
quantization-aware trains a copy of it (its range trackers must see real activations only:
torch's pipeline shape inference would feed them uninitialised tensors). Every rank
writes its weights and losses, so the test can check they agree with each other as well as
with one process. `run()` is also called in-process for the single-process reference.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from sklearn.datasets import load_digits

from slimserve.optimize.distillation import DistillConfig, distill
from slimserve.optimize.quantize import QAT, quantize_
from slimserve.train import TrainConfig, classification_loss, fit
from slimserve.train.distributed import init_distributed, shutdown
from slimserve.train.parallel import parse_parallel
from slimserve.zoo import MLP

N = 520  # not a multiple of the batch: the last batch (8 rows) is short, padded in pipelines
CONFIG = TrainConfig(
    epochs=2, lr=0.05, optimizer="sgd", batch_size=64, max_grad_norm=1.0, progress=False
)
DISTILL = DistillConfig(2.0, 0.5, epochs=1, lr=0.05, optimizer="sgd", batch_size=64, progress=False)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data[:N], dtype=torch.float32) / 16, torch.tensor(d.target[:N])


def run() -> dict[str, object]:
    x, y = data()
    torch.manual_seed(0)  # the same initial weights on every rank
    teacher, student = MLP([64, 48, 32, 10]), MLP([64, 24, 10])
    trained = fit(teacher, classification_loss, (x, y), CONFIG)
    distilled = distill(teacher, student, (x, y), DISTILL)
    qat = copy.deepcopy(teacher)
    options = {"batch_size": 64, "optimizer": "sgd", "progress": False}
    quantize_(qat, QAT(epochs=1, lr=0.05, fit_options=options), data=(x, y))
    with torch.inference_mode():
        qat_accuracy = float((qat(x).argmax(1) == y).float().mean())
    return {
        "teacher": teacher,
        "student": student,
        "losses": trained.epoch_losses,
        "distill_losses": distilled.epoch_losses,
        "qat_accuracy": qat_accuracy,
    }


def main(spec: str, out: Path) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed(parallel=parse_parallel(spec))
    result = run()
    tensors = {f"teacher.{k}": v for k, v in result["teacher"].state_dict().items()}
    tensors |= {f"student.{k}": v for k, v in result["student"].state_dict().items()}
    save_file(tensors, out / f"rank{ctx.rank}.safetensors")
    losses = {k: result[k] for k in ("losses", "distill_losses", "qat_accuracy")}
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(losses))
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
