"""The repository the console's browser tests (and its README screenshots) serve: an ONNX MLP
with profiled variants and an optimize report, a slow model that degrades to a fast variant
under load, and a tiny language model for the chat."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from slimserve.optimize.report import write_report
from tests.e2e.conftest import MLP_YAML, mlp_weights, write_mlp_onnx
from tests.e2e.test_pressure import WIDTH, write_mlp, write_toy, write_yaml
from tests.transport.test_openai import LM_YAML

# The variants of mlp version 1 and their profiles: int8 and fast are within the default
# quality budget (1 point of agreement), pruned is not.
PROFILES: dict[str, dict[str, Any]] = {
    "int8": {"size_bytes": 420, "latency_ms_batch1": 0.05, "agreement": 0.995, "accuracy": 0.91},
    "fast": {"size_bytes": 300, "latency_ms_batch1": 0.04, "agreement": 0.992, "accuracy": 0.905},
    "pruned": {"size_bytes": 150, "latency_ms_batch1": 0.03, "agreement": 0.93, "accuracy": 0.86},
}
for _p in PROFILES.values():  # the rest of what `slimserve optimize` measures
    _p.update(
        latency_ms_batch1_p99=_p["latency_ms_batch1"] * 3,
        latency_ms_best=0.01,
        best_batch=32,
        throughput_rps=3200.0,
        latency_ms_by_batch={"1": _p["latency_ms_batch1"], "8": 0.02, "32": 0.01},
        max_abs_error=0.01,
    )
RECIPES = {"int8": "int8", "fast": "distill:hidden=4", "pruned": "prune:0.9+finetune"}
SHOUT = {
    "backend": "python",
    "model_class": "text_models:Shout",
    "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
    "outputs": [
        {"name": "upper", "datatype": "BYTES", "shape": [-1]},
        {"name": "length", "datatype": "INT32", "shape": [-1]},
    ],
    "batching": {"max_batch_size": 8, "max_queue_delay_ms": 1},
}
ORIGINAL = {"size_bytes": 960, "latency_ms_batch1": 0.08, "agreement": 1.0, "accuracy": 0.912}


def build_console_repo(root: Path, lm_folder: Path | None) -> Path:
    """mlp (variants int8, fast, pruned; a report for version 1), slow (degrades to fast under
    load), shout (text in, text out: tests/e2e/text_models.py, on the server's path), broken
    (a corrupt artifact: it fails to load) and, given its folder, tiny (a language model)."""
    (root / "mlp").mkdir(parents=True)
    (root / "mlp" / "model.yaml").write_text(MLP_YAML)
    write_mlp_onnx(root / "mlp" / "1" / "model.onnx", mlp_weights(1))
    for seed, (name, profile) in enumerate(PROFILES.items(), start=2):
        folder = root / "mlp" / "1" / "variants" / name
        write_mlp_onnx(folder / "model.onnx", mlp_weights(seed))
        recipe = {"text": RECIPES[name]}
        write_yaml(folder / "variant.yaml", {"recipe": recipe, "profile": profile})
    rows = [{"name": n, "recipe": RECIPES[n], "profile": p} for n, p in PROFILES.items()]
    result = SimpleNamespace(model="mlp", version=1, original=ORIGINAL, variants=rows, earlier=[])
    write_report(result, root / "mlp" / "reports" / "1")
    write_toy(
        root,
        "slow",
        "SlowRuntime",
        "fast",
        model_args={"delay_s": 0.02},
        batching={"max_batch_size": 1, "max_queue_delay_ms": 0, "max_queue_size": 8},
        degrade={"allow": True, "queue_fraction": 0.25, "recover_s": 1.0},
    )
    write_mlp(root / "slow" / "1" / "variants" / "fast" / "model.onnx", [WIDTH, WIDTH], seed=7)
    write_yaml(root / "shout" / "model.yaml", SHOUT)
    (root / "shout" / "1").mkdir()
    (root / "shout" / "1" / "README").write_text("served by model_class\n")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "model.yaml").write_text(MLP_YAML)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"this is not an onnx file")
    if lm_folder is not None:
        (root / "tiny").mkdir()
        (root / "tiny" / "model.yaml").write_text(
            LM_YAML.replace("max_tokens: 6", "max_tokens: 24")
        )
        shutil.copytree(lm_folder, root / "tiny" / "1")
    return root
