"""The README's Python examples run as written (against a real server where they call one)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from slimserve.repository import write_manifest
from tests.e2e.conftest import start_server, stop_server

README = Path(__file__).parent.parent / "README.md"


def python_blocks() -> list[str]:
    """The README's runnable examples: its top-level ```python blocks. Blocks indented inside
    a list item are fragments that need more around them (a Ray cluster, a prompt)."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), re.S | re.M)


def _mnist_mlp(root: Path) -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((784, 10)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["logits"])],
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (root / "mnist-mlp" / "1").mkdir(parents=True)
    onnx.save(model, str(root / "mnist-mlp" / "1" / "model.onnx"))
    write_manifest(root / "mnist-mlp" / "1")
    yaml = re.search(r"```yaml\n(backend: onnx.*?)```", README.read_text(), re.S)
    assert yaml, "README shows a model.yaml"
    (root / "mnist-mlp" / "model.yaml").write_text(yaml.group(1))


def test_readme_client_example_runs_against_a_real_server(tmp_path, capsys):
    root = tmp_path / "models"
    _mnist_mlp(root)
    (client_block,) = [b for b in python_blocks() if "tritonclient" in b]
    server = start_server(root, tmp_path / "server.log")
    try:
        code = client_block.replace("127.0.0.1:8000", server.http_url)
        exec(compile(code, "README.md", "exec"), {})
    finally:
        stop_server(server)
    printed = capsys.readouterr().out.strip()
    assert re.fullmatch(r"\[\d( \d)*\]", printed), printed  # four predicted classes


def test_readme_optimize_example_runs():
    import torch

    from slimserve.zoo import MLP

    (block,) = [b for b in python_blocks() if "slimserve.optimize" in b]
    model = MLP([784, 32, 10])
    before = model(torch.ones(1, 784))
    exec(compile(block, "README.md", "exec"), {"model": model})
    assert type(model.net[0]).__name__ != "Linear"  # swapped for an int8 layer
    after = model(torch.ones(1, 784))
    assert after.shape == before.shape


def test_readme_embedding_example_runs(tmp_path, capsys, monkeypatch):
    _mnist_mlp(tmp_path / "models")
    (block,) = [b for b in python_blocks() if "build_server" in b]
    monkeypatch.chdir(tmp_path)  # Settings(repository="models") is relative
    exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip() == "(1, 10)"
