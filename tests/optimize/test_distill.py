"""Distillation: the loss arithmetic, classifier and embedding students, derived students."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from slimserve.errors import InvalidArgument
from slimserve.optimize.distillation import (
    DistillConfig,
    classifier_loss,
    derive_student,
    distill,
    mlp_sizes,
    soft_target_loss,
)
from slimserve.train import TrainConfig, classification_loss, fit, predict
from slimserve.zoo import MLP, LeNet5


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)


@pytest.fixture(scope="module")
def teacher(digits) -> MLP:
    torch.manual_seed(0)
    model = MLP([64, 128, 128, 10])
    fit(model, classification_loss, digits, TrainConfig(epochs=8, lr=2e-3, progress=False))
    return model


def test_soft_loss_is_t_squared_kl():
    torch.manual_seed(0)
    s, t = torch.randn(5, 10), torch.randn(5, 10)
    p_t = F.softmax(t / 3, dim=1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 3, dim=1))).sum(1).mean()
    torch.testing.assert_close(soft_target_loss(s, t, 3.0), 9 * kl)
    assert soft_target_loss(t, t, 3.0).abs() < 1e-6


def test_alpha_weighs_soft_against_hard():
    torch.manual_seed(0)
    s, t, y = torch.randn(5, 10), torch.randn(5, 10), torch.randint(0, 10, (5,))
    hard = classifier_loss(s, t, y, DistillConfig(alpha=0.0))
    torch.testing.assert_close(hard, F.cross_entropy(s, y))
    mixed = classifier_loss(s, t, y, DistillConfig(alpha=0.3, temperature=2.0))
    torch.testing.assert_close(mixed, 0.3 * soft_target_loss(s, t, 2.0) + 0.7 * hard)


def _kl_to(teacher: nn.Module, student: nn.Module, x: torch.Tensor) -> float:
    # at the distillation temperature: what the soft term matches
    return float(soft_target_loss(predict(student, x), predict(teacher, x), 4.0))


def test_distilled_student_imitates_the_teacher_better(teacher, digits):
    torch.manual_seed(1)
    alone = MLP([64, 16, 10])
    student = copy.deepcopy(alone)
    fit(alone, classification_loss, digits, TrainConfig(epochs=6, lr=3e-3, progress=False))
    config = DistillConfig(4.0, alpha=1.0, epochs=6, lr=3e-3, batch_size=64, progress=False)
    result = distill(teacher, student, digits, config)
    assert result.epoch_losses[-1] < result.epoch_losses[0]
    assert _kl_to(teacher, student, digits[0]) < _kl_to(teacher, alone, digits[0])


def test_embedding_student_learns_the_teachers_directions(digits):
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 16))
    student = nn.Sequential(nn.Linear(64, 16))

    def cosine(model: nn.Module) -> float:
        x = digits[0]
        return float(F.cosine_similarity(predict(model, x), predict(teacher, x)).mean())

    before = cosine(student)
    config = DistillConfig(kind="embedding", epochs=8, lr=1e-2, progress=False)
    distill(teacher, student, (digits[0],), config)
    assert cosine(student) > max(before, 0.9)
    mse = nn.Sequential(nn.Linear(64, 16))
    config = DistillConfig(kind="embedding", embedding_loss="mse", epochs=8, lr=1e-2)
    distill(teacher, mse, (digits[0],), replace(config, progress=False))
    assert cosine(mse) > 0.9


def test_derive_student_by_width_and_depth():
    big = MLP([784, 1200, 1200, 10])
    assert mlp_sizes(derive_student(big, width=0.25)) == [784, 300, 300, 10]
    assert mlp_sizes(derive_student(big, width=0.25, depth=1)) == [784, 300, 10]
    assert mlp_sizes(derive_student(big, width=0.5, depth=0)) == [784, 10]
    with pytest.raises(InvalidArgument, match="MLP"):
        derive_student(LeNet5())
    with pytest.raises(InvalidArgument, match="width"):
        derive_student(big, width=0)
    with pytest.raises(InvalidArgument, match="depth"):
        derive_student(big, depth=3)


def test_mismatched_students_and_data_are_refused(teacher, digits):
    with pytest.raises(InvalidArgument, match="last layer"):
        distill(teacher, MLP([64, 8, 7]), digits, DistillConfig(epochs=1, progress=False))
    with pytest.raises(InvalidArgument, match="inputs"):
        distill(teacher, MLP([32, 8, 10]), digits, DistillConfig(epochs=1, progress=False))
    with pytest.raises(InvalidArgument, match="labels"):
        distill(teacher, MLP([64, 8, 10]), (digits[0],), DistillConfig(epochs=1, progress=False))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": 0}, "temperature"),
        ({"alpha": 1.5}, "alpha"),
        ({"kind": "detector"}, "kind"),
        ({"embedding_loss": "l1"}, "embedding_loss"),
    ],
)
def test_bad_distill_configs_are_named(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        DistillConfig(**kwargs)


def test_unlabelled_rows_get_the_soft_term_only():
    from slimserve.optimize.distillation import hard_label_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 0])
    assert torch.allclose(hard_label_loss(logits, labels), F.cross_entropy(logits, labels))
    partial = torch.tensor([0, -1, 2, -1, -1, 0])
    kept = partial >= 0
    expected = F.cross_entropy(logits[kept], partial[kept], reduction="sum") / 6
    assert torch.allclose(hard_label_loss(logits, partial), expected)
    assert hard_label_loss(logits, torch.full((6,), -1)).item() == 0.0


class _Recorder(nn.Module):
    """A module that keeps a copy of every input it is called on."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        return self.inner(x)


def _noisy_view(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + torch.randn_like(x)


def test_online_teacher_runs_on_the_view_the_student_trains_on():
    torch.manual_seed(0)
    x, y = torch.zeros(24, 4), torch.randint(0, 3, (24,))
    teacher, student = _Recorder(nn.Linear(4, 3)), _Recorder(nn.Linear(4, 3))
    teacher.train()
    config = DistillConfig(1.0, alpha=1.0, epochs=2, batch_size=8, augment=_noisy_view)
    distill(teacher, student, (x, y), replace(config, progress=False))
    # one shape check each on x[:2], then 2 epochs x 3 batches, each a fresh random view
    assert len(teacher.seen) == len(student.seen) == 1 + 6
    for t_in, s_in in zip(teacher.seen, student.seen, strict=True):
        assert torch.equal(t_in, s_in)
    views = torch.cat(student.seen[1:])
    assert views.abs().min() > 0 and len(views.unique(dim=0)) == 48  # never the plain zeros
    assert teacher.training  # back to its own mode


def test_online_student_learns_what_only_the_views_reveal():
    # The plain inputs are all zeros, where a bias-free teacher says "uniform"; its function
    # shows only on the noisy views, so only the online student can learn it.
    torch.manual_seed(0)
    x, y = torch.zeros(256, 4), torch.randint(0, 3, (256,))
    teacher = nn.Linear(4, 3, bias=False)
    nn.init.normal_(teacher.weight, std=2.0)
    online, offline = nn.Linear(4, 3), nn.Linear(4, 3)
    offline.load_state_dict(online.state_dict())
    config = DistillConfig(1.0, alpha=1.0, epochs=20, lr=3e-2, batch_size=32, progress=False)
    distill(teacher, online, (x, y), replace(config, augment=_noisy_view))
    distill(teacher, offline, (x, y), config)
    probe = torch.randn(512, 4)

    def kl(student: nn.Module) -> float:
        return float(soft_target_loss(predict(student, probe), predict(teacher, probe), 1.0))

    assert kl(online) < 0.05 < kl(offline)


def test_bad_augment_is_refused(teacher, digits):
    with pytest.raises(InvalidArgument, match="augment"):
        DistillConfig(augment=3)  # type: ignore[arg-type]
    config = DistillConfig(epochs=1, progress=False)
    for bad in (lambda x, y: x[:, :10], lambda x, y: x.tolist()):
        with pytest.raises(InvalidArgument, match="augment returned"):
            distill(teacher, MLP([64, 8, 10]), digits, replace(config, augment=bad))


def test_online_distillation_under_two_process_ddp_matches_one_process(tmp_path):
    import importlib.util
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    worker = Path(__file__).with_name("ddp_distill_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["world"] == 2
    spec = importlib.util.spec_from_file_location("ddp_distill_worker", worker)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    student, losses, world = module.train()
    assert world == 1
    ddp = load_file(tmp_path / "student.safetensors")
    for name, tensor in student.state_dict().items():
        torch.testing.assert_close(ddp[name], tensor, atol=1e-5, rtol=0)
    assert max(abs(a - b) for a, b in zip(report["losses"], losses, strict=True)) < 1e-5
    assert losses[-1] < losses[0]  # it did learn: not two untrained students compared
