"""`optimize(...)`: run recipes on a repository model; each result a measured variant.

Order of work, so that bad input changes nothing:
1. parse every recipe (step names, arguments, step order) and check variant names;
2. load the data and the original, and check the data fits the model;
3. run each recipe in a scratch folder, write its variant into a hidden staging folder
   `NAME/VERSION/variants/.tmp-VARIANT-*`, reload it as the server would, and profile it;
4. only when every recipe succeeded, rename each staging folder into place (os.rename: atomic
   on one file system). On any error the staging folders are removed and the repository is
   exactly as it was; then the report is written under NAME/reports/ (outside every version,
   so no manifest changes).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from slimserve.errors import AlreadyExists, InvalidArgument
from slimserve.optimize import artifacts, steps
from slimserve.optimize.data import load_data
from slimserve.optimize.recipe import Recipe, parse_recipe
from slimserve.repository import Repository, write_manifest
from slimserve.repository.schema import ModelConfig
from slimserve.repository.store import VARIANT_YAML, VARIANTS_DIR

Arrays = tuple[np.ndarray, np.ndarray | None]
_PROFILE_KEYS = (
    "size_bytes",
    "memory_bytes",
    "latency_ms_batch1",
    "latency_ms_best",
    "throughput_rps",
    "accuracy",
    "agreement",
)


@dataclass(frozen=True)
class Options:
    """How to measure. max_eval_rows bounds the fidelity/accuracy pass (rows of eval data)."""

    version: int | None = None
    overwrite: bool = False
    threads: int | None = None
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128)
    min_time_s: float = 0.2
    max_eval_rows: int = 2000
    embedding: bool = False
    report_dir: Path | None = None
    progress: bool = True


@dataclass
class Result:
    model: str
    version: int
    original: dict[str, Any]
    variants: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Path] = field(default_factory=dict)
    # Variants of the same version made by earlier runs (read back from their variant.yaml),
    # so the report compares everything the version has.
    earlier: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Original:
    kind: str  # "torch" | "onnx"
    model: Any  # nn.Module or Path
    config: ModelConfig
    folder: Path


def optimize(
    repository: str | Path,
    name: str,
    recipes: list[str],
    data: str | Arrays | None,
    eval_data: str | Arrays | None = None,
    options: Options | None = None,
) -> Result:
    """Make one variant per recipe of model `name` (see the module docstring)."""
    opts = options or Options()
    repo = Repository(Path(repository))
    config = repo.config(name)
    if config.task == "text-generation":  # quantized LM weights: lm_quant.py
        from slimserve.optimize.lm_quant import optimize_lm

        return optimize_lm(repository, name, recipes, data, eval_data, opts)  # type: ignore[no-any-return]
    if data is None:
        raise InvalidArgument("--data is required: training/calibration data for the recipes")
    version = opts.version or _latest(repo, name)
    vdir = repo.version_dir(name, version)
    start = "onnx" if config.backend == "onnx" else "torch"
    plan = _plan(recipes, start, vdir, opts.overwrite)
    train = _arrays(data, "--data")
    evaluation = train if eval_data is None else _arrays(eval_data, "--eval-data")
    kind, model = artifacts.load_original(vdir, config)
    original = _Original(kind, model, config, vdir)
    train = _conform(original, train, "--data")
    evaluation = _conform(original, evaluation, "--eval-data")
    result = Result(name, version, {})
    reference, result.original = _profile_original(original, evaluation, opts)
    staged = _run_all(plan, original, train, evaluation, reference, opts, result)
    _commit(staged, vdir / VARIANTS_DIR, opts.overwrite)
    from slimserve.optimize.report import earlier_variants, write_report

    result.earlier = earlier_variants(vdir / VARIANTS_DIR, {v["name"] for v in result.variants})

    out = opts.report_dir or (repo.model_dir(name) / "reports" / str(version))
    result.report = write_report(result, out)
    return result


def _latest(repo: Repository, name: str) -> int:
    versions = repo.versions(name)
    if not versions:
        raise InvalidArgument(f"model '{name}' has no version folder (1/, 2/, ...) to optimize")
    return versions[-1]


def _plan(texts: list[str], start: str, vdir: Path, overwrite: bool) -> list[Recipe]:
    if not texts:
        raise InvalidArgument("give at least one --recipe, e.g. --recipe int8")
    plan = [parse_recipe(t) for t in texts]
    names = [r.name for r in plan]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidArgument(
            f"two recipes make the same variant {dupes}; name them apart in "
            "a recipe file (name: ...)"
        )
    for recipe in plan:
        steps.check_order([(s.spec.name, s.text) for s in recipe.steps], start)
        if (vdir / VARIANTS_DIR / recipe.name).exists() and not overwrite:
            raise AlreadyExists(
                f"variant '{recipe.name}' already exists in {vdir / VARIANTS_DIR}; "
                "pass --overwrite to replace it, or name the recipe differently"
            )
    return plan


def _arrays(data: str | Arrays, flag: str) -> Arrays:
    x, y = load_data(data) if isinstance(data, str | Path) else data
    if len(x) == 0:
        raise InvalidArgument(f"{flag}: the data is empty")
    return np.ascontiguousarray(x, dtype=np.float32) if x.dtype.kind == "f" else x, y


def _conform(original: _Original, data: Arrays, flag: str) -> Arrays:
    """Data shaped for the model: rows reshaped (a view) when model.yaml declares a fully
    known row shape with the same number of values, e.g. IDX images (N, 28, 28) for an input
    [-1, 784]; then checked against the model."""
    x, y = data
    inputs = original.config.inputs
    if inputs and inputs[0].shape and -1 not in inputs[0].shape[1:]:
        row = inputs[0].shape[1:]
        if list(x.shape[1:]) != row and int(np.prod(x.shape[1:])) == int(np.prod(row)):
            x = x.reshape(len(x), *row)
    _check_fits(original, x, flag)
    return x, y


def _check_fits(original: _Original, x: np.ndarray, flag: str) -> None:
    """Compare the data's shape with model.yaml's input, then run two rows through the model."""
    inputs = original.config.inputs
    if inputs:
        want = inputs[0].shape
        got = list(x.shape)
        if len(want) != len(got) or any(w not in (-1, g) for w, g in zip(want, got, strict=False)):
            raise InvalidArgument(
                f"{flag}: data of shape {got} does not fit input '{inputs[0].name}' of shape "
                f"{want} in model.yaml; give rows shaped {want[1:]} (reshape the data)"
            )
    from slimserve.optimize.evaluate import as_predictor

    try:
        as_predictor(original.model)(np.ascontiguousarray(x[:2]))
    except Exception as exc:  # any framework error here means the shapes disagree
        raise InvalidArgument(
            f"{flag}: the model cannot run on data of shape {list(x.shape)}: "
            f"{str(exc)[:200]}; give data shaped like the model's input"
        ) from None


def _profile_original(
    original: _Original, evaluation: Arrays, opts: Options
) -> tuple[np.ndarray, dict[str, Any]]:
    from slimserve.optimize.evaluate import as_predictor, evaluate, predict_all

    x, y = evaluation[0][: opts.max_eval_rows], _cut(evaluation[1], opts.max_eval_rows)
    reference = predict_all(as_predictor(original.model, opts.threads), x)
    artifact = (
        original.model
        if original.kind == "onnx"
        else artifacts.find_file(original.folder, ".safetensors")
    )
    profile = evaluate(
        original.model,
        x,
        y,
        reference=reference,
        artifact=artifact,
        embedding=opts.embedding,
        batch_sizes=opts.batch_sizes,
        threads=opts.threads,
        min_time_s=opts.min_time_s,
    )
    return reference, profile


def _cut(y: np.ndarray | None, n: int) -> np.ndarray | None:
    return None if y is None else y[:n]


def _run_all(
    plan: list[Recipe],
    original: _Original,
    train: Arrays,
    evaluation: Arrays,
    reference: np.ndarray,
    opts: Options,
    result: Result,
) -> list[tuple[Path, str]]:
    variants_dir = original.folder / VARIANTS_DIR
    created = not variants_dir.exists()
    staged: list[tuple[Path, str]] = []
    try:
        variants_dir.mkdir(exist_ok=True)
        for recipe in plan:
            stage = Path(tempfile.mkdtemp(prefix=f".tmp-{recipe.name}-", dir=variants_dir))
            stage.chmod(0o755)  # mkdtemp makes it private; a variant is as readable as its model
            staged.append((stage, recipe.name))
            info = _make_variant(recipe, original, train, evaluation, reference, opts, stage)
            result.variants.append(info)
    except BaseException:
        for stage, _ in staged:
            shutil.rmtree(stage, ignore_errors=True)
        if created:
            shutil.rmtree(variants_dir, ignore_errors=True)
        raise
    return staged


def _make_variant(
    recipe: Recipe,
    original: _Original,
    train: Arrays,
    evaluation: Arrays,
    reference: np.ndarray,
    opts: Options,
    stage: Path,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="slimserve-optimize-") as scratch:
        state = _initial_state(original, train, Path(scratch))
        for step in recipe.steps:
            step.spec.run(state, step.config)
        doc = _save(state, original, stage)
    built_s = time.perf_counter() - t0
    candidate, artifact = _reload(stage, doc, original)
    x, y = evaluation[0][: opts.max_eval_rows], _cut(evaluation[1], opts.max_eval_rows)
    from slimserve.optimize.evaluate import evaluate

    profile = evaluate(
        candidate,
        x,
        y,
        reference=reference,
        artifact=artifact,
        embedding=opts.embedding,
        batch_sizes=opts.batch_sizes,
        threads=opts.threads,
        min_time_s=opts.min_time_s,
    )
    doc.update(_variant_doc(recipe, profile, state.notes, built_s))
    (stage / VARIANT_YAML).write_text(yaml.safe_dump(doc, sort_keys=False))
    write_manifest(stage)
    return {
        "name": recipe.name,
        "recipe": recipe.text,
        "backend": doc.get("backend"),
        "profile": doc["profile"],
    }


def _initial_state(original: _Original, train: Arrays, scratch: Path) -> steps.State:
    import copy

    cfg = original.config
    state = steps.State(workdir=scratch, train=train)
    state.input_name = cfg.inputs[0].name if cfg.inputs else "input"
    state.output_name = cfg.outputs[0].name if cfg.outputs else "output"
    state.model_class, state.model_args = cfg.model_class, dict(cfg.model_args)
    if original.kind == "onnx":
        state.onnx_path = original.model
    else:
        state.model = copy.deepcopy(original.model)
    return state


def _save(state: steps.State, original: _Original, stage: Path) -> dict[str, Any]:
    """Write the artifact into the staging folder; the variant.yaml fields it implies."""
    doc: dict[str, Any] = {}
    if state.onnx_path is not None:
        shutil.copyfile(state.onnx_path, stage / "model.onnx")
        if original.config.backend != "onnx":
            doc["backend"] = "onnx"
        return doc
    assert state.model_class is not None
    storage = "dcz" if state.notes.get("storage") == "dcz" else "safetensors"
    override = artifacts.save_torch(
        state.model, stage, state.model_class, state.model_args, state.dtype, storage
    )
    if storage == "dcz":
        doc["artifact"] = "model.dcz"  # Deep Compression storage (slimserve.optimize.compress)
    cfg = original.config
    if override is None and (state.model_class, state.model_args) != (
        cfg.model_class,
        dict(cfg.model_args),
    ):
        # The model was replaced (a distilled student): same artifact form, other arguments.
        override = {"model_class": state.model_class, "model_args": state.model_args}
    doc.update(override or {})
    return doc


def _reload(stage: Path, doc: dict[str, Any], original: _Original) -> tuple[Any, Path]:
    """Load the written variant back from disk, as the server will."""
    if (stage / "model.onnx").is_file():
        return stage / "model.onnx", stage / "model.onnx"
    cfg = original.config
    cls = str(doc.get("model_class", cfg.model_class))
    args = doc.get("model_args", dict(cfg.model_args))
    artifact = stage / str(doc.get("artifact", "model.safetensors"))
    return artifacts.load_torch(stage, cls, args), artifact


def _variant_doc(
    recipe: Recipe, profile: dict[str, Any], notes: dict[str, Any], built_s: float
) -> dict[str, Any]:
    machine = profile.pop("machine")
    ordered = {k: profile.pop(k) for k in _PROFILE_KEYS if k in profile}
    ordered.update(profile)
    return {
        "recipe": {"text": recipe.text, "steps": recipe.describe()},
        "profile": _plain(ordered),
        "notes": _plain({**notes, "build_seconds": round(built_s, 2)}),
        "measured_on": _plain(machine),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _plain(value: Any) -> Any:
    """YAML-safe plain types (numpy scalars -> Python, floats rounded to 6 significant)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return float(f"{value:.6g}")
    return value


def _commit(staged: list[tuple[Path, str]], variants_dir: Path, overwrite: bool) -> None:
    """Rename every staged variant into place (replacing old ones only with overwrite)."""
    for stage, name in staged:
        final = variants_dir / name
        old = None
        if final.exists() and overwrite:
            old = variants_dir / f".old-{name}-{stage.name[-8:]}"
            final.rename(old)
        stage.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
