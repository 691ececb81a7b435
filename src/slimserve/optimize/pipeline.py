"""`optimize(...)`: run recipes on a repository model; each result a measured variant.

Order of work, so that bad input changes nothing:
1. parse every recipe (step names, arguments, step order) and check variant names; without
   --data, refuse a step that needs data, naming it and the flag;
2. load the data and the original, and check the data fits the model; without --data, make
   inputs from model.yaml (synthetic.py): they time the model and measure agreement with the
   original on the same rows; accuracy is then recorded as None (not measured);
3. run each recipe in a scratch folder, write its variant into a hidden staging folder
   `NAME/VERSION/variants/.tmp-VARIANT-*`, reload it as the server would, and profile it;
4. only when every recipe succeeded, rename each staging folder into place (os.rename: atomic
   on one file system). On any error the staging folders are removed and the repository is
   exactly as it was; then the report is written under NAME/reports/ (outside every version,
   so no manifest changes).

Under torchrun (`--parallel`), every process runs every recipe's steps, since the steps that
train need them all; only rank 0 measures, writes variants and the report. The others stop
after the last step (`_follow`). Under pipeline stages, when every recipe distills from the
original, no process loads it whole: each holds its stage, and the original is profiled
stage by stage (split_original.py).
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm.auto import tqdm

from slimserve.errors import InvalidArgument
from slimserve.fields import pick
from slimserve.optimize import artifacts, split_original, staging
from slimserve.optimize.data import load_data
from slimserve.optimize.evaluation import as_predictor, evaluate, predict_all
from slimserve.optimize.lm_quant import optimize_lm
from slimserve.optimize.recipe import Recipe
from slimserve.optimize.report import earlier_variants, write_report
from slimserve.optimize.staging import Result, VariantRow, plain
from slimserve.optimize.state import State
from slimserve.optimize.steps import check_data
from slimserve.optimize.synthetic import synthetic_inputs
from slimserve.repository import Repository, write_manifest
from slimserve.repository.schema import ModelConfig
from slimserve.repository.store import VARIANT_YAML, VARIANTS_DIR
from slimserve.train.distributed import barrier, context

__all__ = ["Options", "Result", "optimize"]

Arrays = tuple[Any, np.ndarray | None]
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
    seed: int = 0  # torch's seed for each recipe, and the seed of training and made inputs


@dataclass
class _Original:
    kind: str  # "torch" | "onnx"
    model: Any  # nn.Module or Path
    config: ModelConfig
    folder: Path
    # Set when the original is kept split over pipeline stages (split_original.py): `model`
    # then holds only this process's stage, the rest is on the meta device.
    split: artifacts.TorchFiles | None = None


def optimize(
    repository: str | Path,
    name: str,
    recipes: list[str],
    data: str | Arrays | None,
    eval_data: str | Arrays | None = None,
    options: Options | None = None,
) -> Result:
    """Make one variant per recipe of model `name` (module docstring)."""
    opts = options or Options()
    repo = Repository(Path(repository))
    config = repo.config(name)
    if config.task == "text-generation":  # quantized LM weights: lm_quant.py (no training)
        if not context().is_main:
            return Result(name, opts.version or 0, {})
        result: Result = optimize_lm(repository, name, recipes, data, eval_data, opts)
        return result
    version = opts.version or staging.latest_version(repo, name)
    vdir = repo.version_dir(name, version)
    start = "onnx" if config.backend == "onnx" else "torch"
    recipes_ = staging.plan(recipes, start, vdir, opts.overwrite)
    barrier()  # every process has checked for existing variants before rank 0 writes one
    if data is None:
        for recipe in recipes_:
            check_data([(s.spec, s.config, s.text) for s in recipe.steps])
    original = _load_original(vdir, config, recipes_)
    train = _inputs(original, data, "--data", opts.seed)
    evaluation = train if eval_data is None else _inputs(original, eval_data, "--eval-data", 0)
    result = Result(name, version, {})
    measured = None
    if original.split is not None:  # every process of the pipeline measures its stage
        rows = _rows(evaluation, opts.max_eval_rows)
        measured = split_original.profile_split(original.model, original.split, rows, opts)
        measured = measured[0], _mark_accuracy(measured[1], rows[1], opts.embedding)
    if not context().is_main:
        _follow(_Made(original, train, evaluation, np.empty(0), opts, data is None, {}), recipes_)
        return result
    reference, result.original = measured or _profile_original(original, evaluation, opts)
    baseline = {k: result.original.get(k) for k in ("accuracy", "size_bytes", "latency_ms_batch1")}
    made = _Made(original, train, evaluation, reference, opts, data is None, plain(baseline))
    staged = staging.stage_all(
        vdir / VARIANTS_DIR, recipes_, lambda r: r.name, made.variant, result
    )
    staging.commit(staged, vdir / VARIANTS_DIR, opts.overwrite)
    result.earlier = earlier_variants(vdir / VARIANTS_DIR, {v["name"] for v in result.variants})
    out = opts.report_dir or (repo.model_dir(name) / "reports" / str(version))
    result.report = write_report(result, out)
    return result


def _load_original(vdir: Path, config: ModelConfig, recipes: list[Recipe]) -> _Original:
    """The original whole, or only this process's pipeline stage of it (split_original.py)."""
    files = split_original.split_files(vdir, config, recipes)
    if files is None:
        return _Original(*artifacts.load_original(vdir, config), config, vdir)
    layout = context().layout
    stage = artifacts.load_torch_stage(files, layout.spec.pp, layout.stage)
    return _Original("torch", stage, config, vdir, files)


def _inputs(original: _Original, data: str | Arrays | None, flag: str, seed: int) -> Arrays:
    """The data conformed to the model; without any, inputs made from model.yaml, unlabelled."""
    if data is None:
        return synthetic_inputs(original.config, seed=seed), None
    return _conform(original, _arrays(data, flag), flag)


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
    try:
        if original.split is not None:  # shapes only: the weights are not all here
            split_original.run_on_meta(original.split, x[:2])
        else:
            as_predictor(original.model)(np.ascontiguousarray(x[:2]))
    except Exception as exc:  # noqa: BLE001 - any framework error here means the shapes disagree
        raise InvalidArgument(
            f"{flag}: the model cannot run on data of shape {list(x.shape)}: "
            f"{str(exc)[:200]}; give data shaped like the model's input"
        ) from None


def _profile_original(
    original: _Original, evaluation: Arrays, opts: Options
) -> tuple[np.ndarray, dict[str, Any]]:
    x, y = _rows(evaluation, opts.max_eval_rows)
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
        **pick(opts, "embedding batch_sizes threads min_time_s"),
    )
    return reference, _mark_accuracy(profile, y, opts.embedding)


def _rows(data: Arrays, n: int) -> Arrays:
    x, y = data
    x = {k: v[:n] for k, v in x.items()} if isinstance(x, dict) else x[:n]
    return x, None if y is None else y[:n]


def _mark_accuracy(profile: dict[str, Any], labels: Any, embedding: bool) -> dict[str, Any]:
    """accuracy: None (not measured) where there were no labels."""
    if labels is None and not embedding:
        profile["accuracy"] = None
    return profile


@dataclass
class _Made:
    """Makes one variant into a staging folder: the recipe's steps, save, reload, profile."""

    original: _Original
    train: Arrays
    evaluation: Arrays
    reference: np.ndarray
    opts: Options
    synthetic: bool
    baseline: dict[str, Any]

    def variant(self, recipe: Recipe, stage: Path) -> VariantRow:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="slimserve-optimize-") as scratch:
            state = self._state(Path(scratch))
            _run_steps(recipe, state, self.opts.progress)
            doc = _save(state, self.original, stage)
        built_s = time.perf_counter() - t0
        candidate, artifact = _reload(stage, doc, self.original)
        x, y = _rows(self.evaluation, self.opts.max_eval_rows)
        profile = evaluate(
            candidate,
            x,
            y,
            reference=self.reference,
            artifact=artifact,
            embedding=self.opts.embedding,
            batch_sizes=self.opts.batch_sizes,
            threads=self.opts.threads,
            min_time_s=self.opts.min_time_s,
        )
        profile = _mark_accuracy(profile, y, self.opts.embedding)
        profile["data"] = "synthetic" if self.synthetic and y is None else "given"
        doc.update(_variant_doc(recipe, profile, state.notes, built_s))
        doc.update(seed=self.opts.seed, baseline=self.baseline)
        (stage / VARIANT_YAML).write_text(yaml.safe_dump(doc, sort_keys=False))
        write_manifest(stage)
        return {
            "name": recipe.name,
            "recipe": recipe.text,
            "backend": doc.get("backend"),
            "profile": doc["profile"],
            "seed": self.opts.seed,
            "baseline": self.baseline,
        }

    def _state(self, scratch: Path) -> State:
        cfg = self.original.config
        state = State(scratch, self.train, self.evaluation, self.synthetic, self.opts.seed)
        state.input_name = cfg.inputs[0].name if cfg.inputs else "input"
        state.output_name = cfg.outputs[0].name if cfg.outputs else "output"
        state.model_class, state.model_args = cfg.model_class, dict(cfg.model_args)
        if self.original.kind == "onnx":
            state.onnx_path = self.original.model
        elif self.original.split is not None:
            # Only ever a teacher (every recipe starts with distill, which leaves the teacher
            # as it was): no copy, so one stage per process is all the memory it takes.
            state.model = self.original.model
        else:
            state.model = copy.deepcopy(self.original.model)
        return state


def _follow(made: _Made, recipes: list[Recipe]) -> None:
    """A process other than rank 0: each recipe's steps (their training needs every process),
    nothing measured or written."""
    for recipe in recipes:
        with tempfile.TemporaryDirectory(prefix="slimserve-optimize-") as scratch:
            _run_steps(recipe, made._state(Path(scratch)), progress=False)


def _run_steps(recipe: Recipe, state: State, progress: bool) -> None:
    """Each step in turn, under a progress bar with the accuracy after each that trains."""
    torch.manual_seed(state.seed)
    bar = tqdm(recipe.steps, desc=recipe.name, disable=not progress, leave=False)
    for step in bar:
        bar.set_postfix(step=step.text)
        step.spec.run(state, step.config)
        # Accuracy after the steps that train (a quantized or bf16 model in the making takes
        # other inputs than the float one; its accuracy is measured once it is saved).
        trained = step.spec.needs(step.config) == "labels"
        acc = state.accuracy() if trained and state.model is not None else None
        if acc is not None:
            bar.set_postfix(step=step.text, acc=f"{100 * acc:.2f}%")
    bar.close()


def _save(state: State, original: _Original, stage: Path) -> dict[str, Any]:
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
        "profile": plain(ordered),
        "notes": plain({**notes, "build_seconds": round(built_s, 2)}),
        "measured_on": plain(machine),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
