"""`slimserve optimize` on a text-generation model: int8 and int4 variants with quantized
weights on disk, measured by perplexity against the original, served as stored."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors import safe_open

from slimserve.cli import main
from slimserve.errors import InvalidArgument
from slimserve.optimize.pipeline import Options, optimize
from tests.optimize.lm_fixtures import lm_repository, trained_llama_dir  # noqa: F401
from tests.optimize.quant_fixtures import tree_digest

FAST = Options(min_time_s=0.01)
# Tolerances on the tiny trained model's held-out text (measured: int8 1.000x perplexity and
# 100% next-token agreement; int4 group 32 0.99x and 99%).
INT8_PPL_RATIO, INT4_PPL_RATIO = 1.02, 1.10
INT8_AGREEMENT, INT4_AGREEMENT = 0.97, 0.90


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, trained_llama_dir: Path) -> Any:  # noqa: F811
    from slimserve.runtimes.llm.quality import HELD_OUT_TEXT

    tmp = tmp_path_factory.mktemp("lmq")
    (tmp / "learned.txt").write_text(HELD_OUT_TEXT)  # the paragraph the tiny model learned
    root = lm_repository(tmp / "models", trained_llama_dir)
    result = optimize(root, "tiny", ["int8", "int4:group=32"], None, tmp / "learned.txt", FAST)
    return root, result


@pytest.fixture()
def repo(tmp_path: Path, trained_llama_dir: Path) -> Path:  # noqa: F811
    return lm_repository(tmp_path / "models", trained_llama_dir)


def _profiles(result: Any) -> dict[str, dict[str, Any]]:
    return {v["name"]: v["profile"] for v in result.variants}


def test_variants_are_written_with_recipe_profile_and_manifest(made: Any) -> None:
    root, result = made
    variants = root / "tiny/1/variants"
    assert sorted(p.name for p in variants.iterdir()) == ["int4group32", "int8"]
    doc = yaml.safe_load((variants / "int4group32/variant.yaml").read_text())
    assert doc["recipe"]["text"] == "int4:group=32"
    assert doc["notes"]["quantization"]["scheme"] == "int4"
    assert doc["notes"]["quantization"]["group_size"] == 32
    assert {"torch", "transformers", "safetensors"} <= set(doc["measured_on"]["versions"])
    for key in ("perplexity", "perplexity_original", "weight_bytes", "size_bytes", "agreement"):
        assert key in doc["profile"]
    manifest = json.loads((variants / "int8/MANIFEST.json").read_text())
    assert "model.safetensors" in json.dumps(manifest)
    assert result.report["markdown"].is_file()
    assert "int4group32" in result.report["markdown"].read_text()


def test_variants_are_smaller_on_disk(made: Any) -> None:
    root, result = made
    original = result.original["weight_bytes"]
    int8, int4 = (_profiles(result)[n] for n in ("int8", "int4group32"))
    assert original == (root / "tiny/1/model.safetensors").stat().st_size
    assert int8["weight_bytes"] < 0.3 * original  # ~1/4 plus scales
    assert int4["weight_bytes"] < int8["weight_bytes"]
    assert int4["size_bytes"] < result.original["size_bytes"]


def test_stored_tensors_are_quantized(made: Any) -> None:
    root, _ = made
    path = root / "tiny/1/variants/int4group32/model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        q4 = f.get_tensor("model.layers.0.mlp.down_proj.weight.q4")
        scale = f.get_tensor("model.layers.0.mlp.down_proj.weight.scale")
        embed = f.get_tensor("model.embed_tokens.weight.q")
    assert q4.dtype == torch.uint8 and tuple(q4.shape) == (64, 64)  # (N, K / 2), K = 128
    assert scale.dtype == torch.float16 and tuple(scale.shape) == (64, 4)  # (N, K / 32)
    assert embed.dtype == torch.int8
    assert not any(n.endswith("proj.weight") for n in names)  # no float copy left


def test_quality_stays_within_tolerance(made: Any) -> None:
    _, result = made
    int8, int4 = (_profiles(result)[n] for n in ("int8", "int4group32"))
    assert int8["perplexity_original"] == pytest.approx(result.original["perplexity"], rel=1e-5)
    assert int8["perplexity_ratio"] <= INT8_PPL_RATIO
    assert int4["perplexity_ratio"] <= INT4_PPL_RATIO
    assert int8["agreement"] >= INT8_AGREEMENT
    assert int4["agreement"] >= INT4_AGREEMENT


@pytest.mark.parametrize(
    ("recipes", "words"),
    [
        (["int4:group=128"], "does not divide the input width 64"),
        (["int8", "int4:group=128"], "use group=32 or 64"),
        (["int4:group=7"], "use 32, 64 or 128"),
        (["prune:0.5"], "language models take one quantization step: int8, weight-int8 or int4"),
        (["int8+int4:group=32"], "does not apply to a text-generation model"),
        (["int8:per_channel=false"], "per_channel int8 only"),
    ],
)
def test_bad_recipes_are_refused_and_change_nothing(
    repo: Path, recipes: list[str], words: str
) -> None:
    before = tree_digest(repo)
    with pytest.raises(InvalidArgument, match=words):
        optimize(repo, "tiny", recipes, None, None, FAST)
    assert tree_digest(repo) == before


def test_without_eval_data_the_shipped_text_is_used(repo: Path) -> None:
    from transformers import AutoTokenizer

    from slimserve.optimize.heldout import HELD_OUT_TEXT

    tokenizer = AutoTokenizer.from_pretrained(repo / "tiny/1", local_files_only=True)
    result = optimize(repo, "tiny", ["int8"], None, None, FAST)
    shipped = len(tokenizer(HELD_OUT_TEXT)["input_ids"])
    assert shipped > 512  # the tiny model's context: the text is cut to fit it
    assert result.original["eval_tokens"] == 512


def test_eval_text_must_be_plain_text(repo: Path, tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"PK")
    before = tree_digest(repo)
    with pytest.raises(InvalidArgument, match="plain text file"):
        optimize(repo, "tiny", ["int8"], None, str(tmp_path / "x.npz"), FAST)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(InvalidArgument, match="empty"):
        optimize(repo, "tiny", ["int8"], str(tmp_path / "empty.txt"), None, FAST)
    assert tree_digest(repo) == before


def test_a_failure_while_making_variants_leaves_no_trace(repo: Path, monkeypatch) -> None:
    # The second variant fails after the first was staged (a full disk, say): both go away.
    from slimserve.optimize import lm_quant

    real, calls = lm_quant.write_quantized, []

    def write_then_fail(*args: Any) -> Any:
        calls.append(args)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real(*args)

    monkeypatch.setattr(lm_quant, "write_quantized", write_then_fail)
    before = tree_digest(repo)
    with pytest.raises(OSError, match="No space"):
        optimize(repo, "tiny", ["int8", "int4:group=32"], None, None, FAST)
    assert len(calls) == 2
    assert tree_digest(repo) == before
    assert not (repo / "tiny/1/variants").exists()


def test_a_non_lm_model_still_needs_data_to_train(tmp_path: Path) -> None:
    root = tmp_path / "models"
    (root / "mlp/1").mkdir(parents=True)
    (root / "mlp/model.yaml").write_text(
        "backend: torch\nmodel_class: slimserve.zoo:MLP\nmodel_args: {sizes: [4, 3]}\n"
    )
    with pytest.raises(InvalidArgument, match="'finetune' trains on labelled data: give --data"):
        optimize(root, "mlp", ["finetune"], None, None, FAST)


def test_cli_makes_an_int4_variant_from_a_text_file(repo: Path, tmp_path: Path, capsys) -> None:
    from slimserve.runtimes.llm.quality import HELD_OUT_TEXT

    (tmp_path / "held-out.txt").write_text(HELD_OUT_TEXT)
    argv = ["optimize", "tiny", "-r", str(repo), "--recipe", "int4:group=64"]
    assert main([*argv, "--eval-data", str(tmp_path / "held-out.txt"), "--min-time-s", "0"]) == 0
    out = capsys.readouterr().out
    assert "tiny:int4group64:" in out and "perplexity" in out and "report:" in out
    assert (repo / "tiny/1/variants/int4group64/model.safetensors").is_file()


def test_overwrite_replaces_a_variant(repo: Path) -> None:
    optimize(repo, "tiny", ["int8"], None, None, FAST)
    with pytest.raises(Exception, match="already exists"):
        optimize(repo, "tiny", ["int8"], None, None, FAST)
    again = optimize(repo, "tiny", ["int8"], None, None, Options(min_time_s=0.01, overwrite=True))
    assert [v["name"] for v in again.variants] == ["int8"]
    assert sorted(p.name for p in (repo / "tiny/1/variants").iterdir()) == ["int8"]


def test_original_files_are_untouched(made: Any, trained_llama_dir: Path) -> None:  # noqa: F811
    root, _ = made
    for path in trained_llama_dir.iterdir():
        assert (root / "tiny/1" / path.name).read_bytes() == path.read_bytes()
    assert sorted(p.name for p in (root / "tiny/1").iterdir() if p.is_dir()) == ["variants"]
