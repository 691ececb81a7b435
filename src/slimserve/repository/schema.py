"""model.yaml and variant.yaml: their schema, and errors that name file, field, value and fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from slimserve.errors import ConfigError
from slimserve.types import DATATYPES, TensorSpec

Backend = Literal["onnx", "torch", "transformers", "python"]

# Per-field advice appended to validation errors: what a correct value looks like.
_FIXES: dict[str, str] = {
    "backend": "use one of onnx, torch, transformers, python",
    "datatype": f"use one of {', '.join(DATATYPES)}",
    "shape": "give a list of integers, -1 for a free dimension, e.g. [-1, 784]",
    "max_batch_size": "use 0 for a model without a batch dimension, or a positive size like 32",
    "max_queue_delay_ms": "use a small non-negative number of milliseconds, e.g. 2",
    "name": "give each tensor a non-empty name as the artifact declares it",
    "task": "use embedding or sequence-classification, or text-generation for a language model",
    "model_class": "name the class as 'package.module:ClassName'",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorConfig(_Strict):
    name: str = Field(min_length=1, max_length=256)
    datatype: str
    shape: list[int] = Field(min_length=0, max_length=16)

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        upper = value.upper()
        if upper not in DATATYPES:
            raise ValueError(f"unknown datatype {value!r}")
        return upper

    @field_validator("shape")
    @classmethod
    def _dims(cls, value: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in value):
            raise ValueError("dimensions must be positive, or -1 for a free dimension")
        return value

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, tuple(self.shape))


class BatchingConfig(_Strict):
    """Dynamic batching. max_batch_size 0 means the model has no batch dimension."""

    max_batch_size: int = Field(32, ge=0, le=65536)
    max_queue_delay_ms: float = Field(2.0, ge=0, le=10_000)
    # None: the server's default (Settings.max_queue_size).
    max_queue_size: int | None = Field(None, gt=0)


class LimitsConfig(_Strict):
    """Admission control for one model (all clients together)."""

    rate: float | None = Field(None, gt=0)  # requests per second; None: unlimited
    burst: float | None = Field(None, ge=1)  # default: one second's worth of `rate`
    max_concurrency: int | None = Field(None, gt=0)  # requests queued or running at once
    max_queue_wait_ms: float | None = Field(None, gt=0)  # shed when the wait would exceed it


class BreakerSettings(_Strict):
    """Circuit breaker per served unit (see policies/breaker.py)."""

    enabled: bool = True
    consecutive_failures: int = Field(5, ge=1)
    error_rate: float = Field(0.5, gt=0, le=1)
    min_calls: int = Field(20, ge=1)
    window: int = Field(50, ge=1)
    slow_call_ms: float | None = Field(None, gt=0)
    slow_rate: float = Field(0.8, gt=0, le=1)
    open_s: float = Field(5.0, gt=0)
    probe_calls: int = Field(3, ge=1)


class DegradeSettings(_Strict):
    """Serving a cheaper variant while the original is under pressure."""

    allow: bool = False  # the default for requests that do not say (parameter `degrade`)
    max_quality_loss: float = Field(1.0, ge=0)  # points of accuracy/agreement given up
    queue_fraction: float = Field(0.5, gt=0, le=1)  # queue this full counts as pressure
    recover_s: float = Field(5.0, ge=0)  # calm needed before returning to the original


class CacheSettings(_Strict):
    """Response cache for this model (off unless present in model.yaml)."""

    policy: Literal["lru", "lfu"] = "lru"
    max_bytes: int = Field(64 * 1024 * 1024, gt=0)
    ttl_s: float | None = Field(None, gt=0)


Weights = Literal["auto", "fp32", "bf16", "bf16+int4", "int8"]


class SpeculativeSettings(_Strict):
    """Speculative decoding for greedy requests (runtimes/llm/speculate.py): the output is
    plain greedy decoding's, produced in fewer forwards when drafts are right.

    `prompt-lookup` drafts the tokens that followed the latest earlier occurrence of the
    last `ngram_max`..`ngram_min` tokens (free; pays on repetitive outputs: summaries,
    edits, extraction); `draft` runs the same checkpoint loaded with `draft_weights` (a
    cheaper variant) to propose `num_tokens` tokens. Only while at most `max_rows`
    sequences decode together (larger batches are compute-bound), and a sequence whose drafts
    are accepted less than `min_acceptance` of the time pauses for `pause_tokens` tokens."""

    method: Literal["prompt-lookup", "draft"] = "prompt-lookup"
    num_tokens: int = Field(4, ge=1, le=16)
    ngram_max: int = Field(3, ge=1, le=16)
    ngram_min: int = Field(2, ge=1, le=16)
    max_rows: int = Field(4, ge=1, le=4096)
    min_acceptance: float = Field(0.5, ge=0.0, le=1.0)  # below it a sequence pauses drafting
    pause_tokens: int = Field(16, ge=1)
    draft_weights: Weights = "bf16+int4"


class GenerationSettings(_Strict):
    """The generation engine of a `task: text-generation` model (KV cache, batching, weights).

    The KV pool holds `kv_cache_bytes` (all layers, K and V, fp32) in blocks of `block_size`
    token positions; `max_seqs` sequences decode together; `weights: int8` quantizes the
    linear layers at load (per-channel int8 weights, int8 matmul); `weights: bf16` computes
    the fp32 checkpoint in bf16 where the CPU has avx512_bf16 (fp32 elsewhere); `bf16+int4`
    is bf16 with one- and two-row decode steps read from int4 planes of the same weights;
    `auto` (the default) picks from the CPU's features: bf16+int4 where it has bf16
    arithmetic, else int8. fp32 only when asked. `speculative` drafts tokens for greedy
    requests (see SpeculativeSettings).

    `pipeline_parallel` P x `tensor_parallel` T above 1 split the model over P x T worker
    processes the server starts (runtimes/llm/parallel/): P stages of consecutive layers, each
    with its attention heads and MLP columns over T ranks; each process reads only its shard
    and holds its own KV pool. `step_timeout_s`: a worker not answering a step by then fails
    the requests in flight (503) and the group restarts.
    """

    block_size: int = Field(16, ge=1, le=1024)
    kv_cache_bytes: int = Field(256 * 1024 * 1024, ge=1)  # SmolLM2-135M: ~5,800 tokens
    max_seqs: int = Field(32, ge=1, le=4096)
    max_prefill_tokens: int = Field(2048, ge=1)
    max_waiting: int = Field(256, ge=1)
    prefix_caching: bool = True
    continuous: bool = True
    weights: Weights = "auto"
    speculative: SpeculativeSettings | None = None
    pipeline_parallel: int = Field(1, ge=1, le=64)
    tensor_parallel: int = Field(1, ge=1, le=64)
    step_timeout_s: float = Field(60.0, gt=0)

    @property
    def processes(self) -> int:
        """Worker processes the model is split over (1: in the server process)."""
        return self.pipeline_parallel * self.tensor_parallel


class ModelConfig(_Strict):
    """The contents of model.yaml."""

    backend: Backend
    inputs: list[TensorConfig] = Field(default_factory=list)
    outputs: list[TensorConfig] = Field(default_factory=list)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    # torch backend, safetensors weights: the nn.Module class and its constructor arguments.
    model_class: str | None = None
    model_args: dict[str, Any] = Field(default_factory=dict)
    # transformers backend: what to compute.
    task: Literal["embedding", "sequence-classification", "text-generation"] | None = None
    # task text-generation: the generation engine's settings (defaults when absent).
    generation: GenerationSettings | None = None
    normalize: bool = True
    max_length: int = Field(256, gt=0, le=131072)
    # Free-form options for the runtime (documented by each runtime).
    parameters: dict[str, Any] = Field(default_factory=dict)
    description: str = ""
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    breaker: BreakerSettings = Field(default_factory=BreakerSettings)
    degrade: DegradeSettings = Field(default_factory=DegradeSettings)
    cache: CacheSettings | None = None

    @field_validator("model_class")
    @classmethod
    def _class_path(cls, value: str | None) -> str | None:
        if value is not None and (":" not in value or value.startswith(":")):
            raise ValueError(f"{value!r} is not of the form 'package.module:ClassName'")
        return value

    def input_specs(self) -> list[TensorSpec]:
        return [t.spec() for t in self.inputs]

    def output_specs(self) -> list[TensorSpec]:
        return [t.spec() for t in self.outputs]

    @property
    def batched(self) -> bool:
        return self.batching.max_batch_size > 0


class VariantProfile(BaseModel):
    """A variant's measured profile (written by `slimserve optimize`); all fields optional."""

    model_config = ConfigDict(extra="allow", frozen=True)

    size_bytes: int | None = None
    memory_bytes: int | None = None
    latency_ms_batch1: float | None = None
    latency_ms_best: float | None = None
    throughput_rps: float | None = None
    accuracy: float | None = None
    agreement: float | None = None

    def quality_loss(self) -> float | None:
        """Points given up against the original: `quality_loss` if written, else
        100 x (1 - agreement); None when the profile says neither."""
        extra = self.model_extra or {}
        if isinstance(extra.get("quality_loss"), int | float):
            return float(extra["quality_loss"])
        if self.agreement is not None:
            # Rounded: (1 - 0.99) * 100 is 1.0000000000000009, over a budget of exactly 1.
            return round((1.0 - self.agreement) * 100.0, 9)
        return None

    def latency_curve(self) -> tuple[tuple[int, float], ...]:
        """(batch rows, ms) from `latency_ms_by_batch`, sorted by rows (else batch 1 alone
        from latency_ms_batch1; empty when neither was measured)."""
        by_batch = (self.model_extra or {}).get("latency_ms_by_batch")
        points: list[tuple[int, float]] = []
        if isinstance(by_batch, dict):
            for size, ms in by_batch.items():
                if str(size).isdigit() and isinstance(ms, int | float) and ms > 0:
                    points.append((int(size), float(ms)))
        if not points and self.latency_ms_batch1:
            points.append((1, float(self.latency_ms_batch1)))
        return tuple(sorted(points))


class VariantInfo(BaseModel):
    """The contents of variant.yaml: how the variant was made, and what it measured."""

    model_config = ConfigDict(extra="allow", frozen=True)

    # The variant's artifact may use another backend than the original (e.g. torch -> onnx).
    backend: Backend | None = None
    recipe: Any = None
    profile: VariantProfile = Field(default_factory=VariantProfile)


_MODEL_YAML_HELP = "see README 'model.yaml' or run `slimserve repo add NAME ARTIFACT`"


def read_yaml_mapping(path: Path, expected: str = _MODEL_YAML_HELP) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; ConfigError saying what to write otherwise."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing; write one ({expected})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level ({expected})")
    return data


def describe_validation_error(
    path: Path, exc: ValidationError, fixes: dict[str, str] | None = None
) -> str:
    """One line per mistake: file, field path, the value given, what is wrong, the fix
    (`fixes`: advice per field name; model.yaml's by default)."""
    fixes = _FIXES if fixes is None else fixes
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        last = next((str(p) for p in reversed(err["loc"]) if isinstance(p, str)), "")
        fix = fixes.get(last, "")
        if err["type"] == "extra_forbidden":
            fix = "remove it or check its spelling"
        elif err["type"] == "missing":
            fix = fix or "add it"
        msg = f"{path}: field '{loc}'"
        if err["type"] != "missing":
            msg += f" = {value!r}"
        msg += f": {err['msg']}"
        if fix:
            msg += f"; fix: {fix}"
        lines.append(msg)
    return "\n".join(lines)


def load_model_config(path: Path) -> ModelConfig:
    """Read and validate a model.yaml; ConfigError names every mistake."""
    data = read_yaml_mapping(path)
    try:
        config = ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None
    _check_consistency(path, config)
    return config


def _check_consistency(path: Path, config: ModelConfig) -> None:
    for kind, tensors in (("inputs", config.inputs), ("outputs", config.outputs)):
        names = [t.name for t in tensors]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{path}: field '{kind}': duplicate names {dupes}; fix: rename them")
        if config.batched:
            for i, t in enumerate(tensors):
                if not t.shape or t.shape[0] != -1:
                    raise ConfigError(
                        f"{path}: field '{kind}.{i}.shape' = {t.shape}: a batched model "
                        f"(max_batch_size {config.batching.max_batch_size}) needs -1 as the "
                        "first dimension; fix: make it -1, or set batching.max_batch_size: 0"
                    )
    if config.backend == "transformers" and config.task is None:
        raise ConfigError(
            f"{path}: field 'task' is missing: the transformers backend needs it; "
            "fix: task: embedding or task: sequence-classification"
        )


def load_variant_info(path: Path) -> VariantInfo:
    """Read a variant.yaml (a missing file means an unprofiled, hand-made variant)."""
    if not path.exists():
        return VariantInfo()
    data = read_yaml_mapping(path)
    try:
        return VariantInfo.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None


def load_version_profile(path: Path) -> VariantProfile | None:
    """Read an original version's profile.yaml (written by `slimserve profile`); None if absent.

    Same shape as a variant.yaml's `profile:` section, so one reader serves both."""
    if not path.exists():
        return None
    data = read_yaml_mapping(path)
    try:
        return VariantInfo.model_validate(data).profile
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(path, exc)) from None


def dump_model_config(config: ModelConfig) -> str:
    """model.yaml text for a config, with defaults left out so users see what matters."""
    data = config.model_dump(mode="json", exclude_defaults=True)
    data["backend"] = config.backend
    data["batching"] = config.batching.model_dump(mode="json", exclude_none=True)
    for key in ("inputs", "outputs"):
        data[key] = [t.model_dump(mode="json") for t in getattr(config, key)]
    order = ["backend", "task", "model_class", "model_args", "inputs", "outputs", "batching"]
    ordered = {k: data[k] for k in order if k in data}
    ordered.update({k: v for k, v in data.items() if k not in ordered})
    return str(yaml.safe_dump(ordered, sort_keys=False, default_flow_style=None))
