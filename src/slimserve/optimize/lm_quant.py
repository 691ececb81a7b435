"""`slimserve optimize` for a `task: text-generation` model: quantized weights as variants.

Recipes (the ordinary recipe grammar; one step each):
  int8           int8 weights per output channel; served with int8 activations and matmul
  weight-int8    the same stored weights; served with fp32 activations
  int4:group=32  int4 weights, one fp16 scale and offset per group of 32 (or 64, 128) inputs

The variant is a transformers folder whose model.safetensors holds the quantized tensors
(runtimes/llm/prequant.py defines the format); the server loads it as stored. The
profile records the perplexity of held-out text (the original's and the variant's), the
top-1 next-token agreement with the original, size on disk, resident weight bytes and decode
speed at 1 and 8 streams. Held-out text: --eval-data, else --data (plain text files), else
the text that ships with slimserve (optimize/heldout.py, ~550 tokens).

Order of work as in pipeline.py: check every recipe, the text and the group sizes first; stage
each variant in a hidden folder; rename them into place only when all succeeded.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from importlib import metadata as pkg_metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from slimserve.errors import InvalidArgument
from slimserve.optimize import staging
from slimserve.optimize.data import load_text
from slimserve.optimize.evaluation import machine_facts
from slimserve.optimize.heldout import HELD_OUT_TEXT
from slimserve.optimize.lm_profile import perplexity_of, profile
from slimserve.optimize.recipe import Recipe, parse_recipe
from slimserve.optimize.staging import Result, VariantRow, plain
from slimserve.repository import Repository, write_manifest
from slimserve.repository.profiles import update_profile
from slimserve.repository.store import VARIANT_YAML, VARIANTS_DIR
from slimserve.runtimes.llm.prequant import METADATA_KEY, check_group, quantize_state
from slimserve.runtimes.llm.runtime import TextGenerationRuntime, _check_folder, _read_weights

LM_RECIPES = "int8, weight-int8 or int4:group=32 (or 64, 128)"
MAX_EVAL_TOKENS = 1024


@dataclass(frozen=True)
class LMScheme:
    scheme: str  # a prequant.SCHEMES entry
    group: int | None = None


def scheme_of(recipe: Recipe) -> LMScheme:
    """The weight scheme a recipe asks for; anything else is refused naming what works."""
    names = [s.spec.name for s in recipe.steps]
    if len(names) != 1 or names[0] not in ("int8", "weight-int8", "int4"):
        raise InvalidArgument(
            f"recipe '{recipe.text}' does not apply to a text-generation model; "
            f"language models take one quantization step: {LM_RECIPES}"
        )
    step = recipe.steps[0]
    if step.spec.name == "int4":
        return LMScheme("int4", int(step.config.group_size))
    if not getattr(step.config, "per_channel", True):
        raise InvalidArgument(f"'{recipe.text}': language models use per_channel int8 only")
    return LMScheme("int8" if step.spec.name == "int8" else "int8-weight-only")


def eval_text(data: Any, eval_data: Any) -> str:

    spec = eval_data if eval_data is not None else data
    if spec is None:
        return HELD_OUT_TEXT
    if not isinstance(spec, str | Path):
        raise InvalidArgument("a language model's --data/--eval-data is a plain text file")
    return load_text(spec)


def optimize_lm(
    repository: str | Path,
    name: str,
    recipes: list[str],
    data: Any,
    eval_data: Any,
    opts: Any,
) -> Any:
    """One quantized variant per recipe of the text-generation model `name`."""
    repo = Repository(Path(repository))
    version = opts.version or staging.latest_version(repo, name)
    vdir = repo.version_dir(name, version)
    for text in recipes:  # the LM's own message first, before the step-order rules
        scheme_of(parse_recipe(text))
    recipes_ = [(r, scheme_of(r)) for r in staging.plan(recipes, "torch", vdir, opts.overwrite)]
    text = eval_text(data, eval_data)
    state = _read_state(vdir)
    _check_groups(state, [s for _, s in recipes_])
    if opts.threads:
        torch.set_num_threads(opts.threads)
    tokens, reference, original = _profile_original(vdir, text, opts)
    result = Result(name, version, original)
    staged = staging.stage_all(
        vdir / VARIANTS_DIR,
        recipes_,
        lambda item: item[0].name,
        lambda item, stage: _make_variant(*item, vdir, state, stage, tokens, reference, opts),
        result,
    )
    staging.commit(staged, vdir / VARIANTS_DIR, opts.overwrite)
    # The original's decode profile where the server reads it (VERSION/profile.yaml), so a
    # per-request latency objective can weigh the original against its variants.
    update_profile(repo, name, version, None, original)
    out = opts.report_dir or (repo.model_dir(name) / "reports" / str(version))
    result.report = write_report(result, out)
    return result


def _read_state(vdir: Path) -> dict[str, Any]:

    return _read_weights(_check_folder(vdir))


def _check_groups(state: dict[str, Any], schemes: list[LMScheme]) -> None:

    for scheme in schemes:
        if scheme.group is not None:
            check_group(state, scheme.group)


def _profile_original(vdir: Path, text: str, opts: Any) -> tuple[list[int], Any, dict[str, Any]]:

    runtime = TextGenerationRuntime.load(vdir)
    limit = min(MAX_EVAL_TOKENS, runtime.model.shape.max_positions)
    tokens = runtime.encode(text)[:limit]
    if len(tokens) < 2:
        raise InvalidArgument("the held-out text is under 2 tokens; give a longer text")
    info, reference = profile(runtime, tokens, vdir, None, opts.min_time_s)
    return tokens, reference, plain(info)


def _make_variant(
    recipe: Recipe,
    scheme: LMScheme,
    vdir: Path,
    state: dict[str, Any],
    stage: Path,
    tokens: list[int],
    reference: Any,
    opts: Any,
) -> VariantRow:

    start = time.perf_counter()
    meta = write_quantized(vdir, stage, state, scheme)
    built_s = time.perf_counter() - start
    runtime = TextGenerationRuntime.load(stage)  # as the server will: from the files
    info, _ = profile(runtime, tokens, stage, reference, opts.min_time_s)
    info = plain(info | {"perplexity_original": result_ppl(reference, tokens)})
    info["perplexity_ratio"] = round(info["perplexity"] / info["perplexity_original"], 4)
    doc = _variant_doc(recipe, info, meta, built_s)
    (stage / VARIANT_YAML).write_text(yaml.safe_dump(doc, sort_keys=False))
    write_manifest(stage)
    return {"name": recipe.name, "recipe": recipe.text, "backend": None, "profile": info}


def result_ppl(reference: Any, tokens: list[int]) -> float:

    return perplexity_of(reference, tokens)


def write_quantized(
    vdir: Path, stage: Path, state: dict[str, Any], scheme: LMScheme
) -> dict[str, Any]:
    """The original's config and tokenizer files, and the quantized model.safetensors."""

    for path in sorted(vdir.iterdir()):
        weights = path.name.endswith((".safetensors", ".safetensors.index.json"))
        if path.is_file() and not weights and path.name != "MANIFEST.json":
            shutil.copy2(path, stage / path.name)
    tensors, metadata = quantize_state(state, scheme.scheme, scheme.group)
    save_file(tensors, str(stage / "model.safetensors"), metadata=metadata)
    (stage / "model.safetensors").chmod(0o644)  # as readable as the original's files
    return dict(json.loads(metadata[METADATA_KEY]))


def _variant_doc(
    recipe: Recipe, info: dict[str, Any], meta: dict[str, Any], built_s: float
) -> dict[str, Any]:

    machine = machine_facts()
    machine["versions"] = machine["versions"] | _extra_versions()
    return {
        "recipe": {"text": recipe.text, "steps": recipe.describe()},
        "profile": info,
        "notes": plain({"quantization": meta, "build_seconds": built_s}),
        "measured_on": plain(machine),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _extra_versions() -> dict[str, str]:

    try:
        return {
            "safetensors": pkg_metadata.version("safetensors"),
            "tokenizers": pkg_metadata.version("tokenizers"),
        }
    except pkg_metadata.PackageNotFoundError:
        return {}


def write_report(result: Any, out: Path) -> dict[str, Path]:
    """report.md and report.json: the original and each variant, one row each."""

    out.mkdir(parents=True, exist_ok=True)
    rows = [("(original)", result.original)] + [(v["name"], v["profile"]) for v in result.variants]
    lines = [
        f"# {result.model} version {result.version}: quantized variants",
        "",
        "| variant | perplexity | agreement | weights (MiB) | resident (MiB) | ms/token b1 "
        "| tok/s b8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, p in rows:
        lines.append(
            f"| {name} | {p['perplexity']:.3f} | {p.get('agreement', 1.0):.3f} "
            f"| {p['weight_bytes'] / 2**20:.1f} | {p['memory_bytes'] / 2**20:.1f} "
            f"| {p['latency_ms_batch1']:.2f} | {p['decode_tokens_per_s_8_streams']:.1f} |"
        )
    doc = {"model": result.model, "version": result.version, "original": result.original}
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(doc | {"variants": result.variants}, indent=2))
    return {"markdown": out / "report.md", "json": out / "report.json"}
