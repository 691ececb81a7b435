"""`slimserve optimize` end to end on LeNet-5 / Fashion-MNIST: a repository, several recipes,
the variants and the report (markdown, JSON, PNG with the Pareto front).

    .venv/bin/python benchmarks/optimize_lenet_int8.py --epochs 3   # trains and caches fp32
    .venv/bin/python benchmarks/optimize_pipeline_lenet.py [--repository /tmp/slimserve-lenet]

Writes the repository (default /tmp/slimserve-lenet), then runs the command line exactly as a
user would; the report lands in REPOSITORY/lenet5/reports/1/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

from slimserve.cli import main as slimserve
from slimserve.repository import write_manifest

CACHE = Path("/tmp/slimserve-bench")
RECIPES = [
    "static-int8",  # ours, PyTorch: int8 Conv2d + Linear
    "onnx",
    "onnx+static-int8",  # ONNX Runtime QDQ, every Conv/Gemm
    "onnx+static-int8:ops=Gemm-MatMul",  # ONNX Runtime QDQ, Linear layers only
    "weight-int8",
    "qat:epochs=1",
    "bf16",
]


def make_repository(root: Path, epochs: int) -> None:
    weights = CACHE / f"lenet5_fmnist_e{epochs}.safetensors"
    if not weights.exists():
        sys.exit(f"{weights} is missing: run benchmarks/optimize_lenet_int8.py --epochs {epochs}")
    shutil.rmtree(root, ignore_errors=True)
    version = root / "lenet5" / "1"
    version.mkdir(parents=True)
    shutil.copyfile(weights, version / "model.safetensors")
    model_yaml = {
        "backend": "torch",
        "model_class": "slimserve.zoo:LeNet5",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
    }
    (root / "lenet5" / "model.yaml").write_text(yaml.safe_dump(model_yaml, sort_keys=False))
    write_manifest(version)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("/tmp/slimserve-lenet"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    make_repository(args.repository, args.epochs)
    argv = [
        "optimize",
        "lenet5",
        "--repository",
        str(args.repository),
        "--data",
        "fashion-mnist:train",
        "--eval-data",
        "fashion-mnist:test",
        "--max-eval-rows",
        "10000",
        "--threads",
        str(args.threads),
        "--batch-sizes",
        "1,32,256",
    ]
    for recipe in RECIPES:
        argv += ["--recipe", recipe]
    return slimserve(argv)


if __name__ == "__main__":
    raise SystemExit(main())
