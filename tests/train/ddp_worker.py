"""Worker for test_distributed.py: `torchrun --nproc_per_node=2 ddp_worker.py OUT_DIR`.

`train()` is also called in-process by the test for the single-process reference run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from sklearn.datasets import load_digits

from slimserve.train import TrainConfig, classification_loss, fit
from slimserve.train.distributed import init_distributed, is_main_process, shutdown
from slimserve.zoo import MLP

N = 1536  # divisible by the global batch: every rank sees equally many full batches
CONFIG = TrainConfig(epochs=2, lr=0.05, optimizer="sgd", batch_size=64, progress=False, seed=3)


def train() -> tuple[MLP, list[float], int]:
    d = load_digits()
    x = torch.tensor(d.data[:N], dtype=torch.float32) / 16
    y = torch.tensor(d.target[:N])
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = MLP([64, 32, 10])
    result = fit(model, classification_loss, (x, y), CONFIG)
    return model, result.epoch_losses, result.world_size


def main(out: Path) -> None:
    torch.set_num_threads(1)
    ctx = init_distributed()
    model, losses, world = train()
    if is_main_process():  # only rank 0 writes
        from safetensors.torch import save_file

        save_file(model.state_dict(), out / "model.safetensors")
        (out / f"rank{ctx.rank}.json").write_text(json.dumps({"losses": losses, "world": world}))
    shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
