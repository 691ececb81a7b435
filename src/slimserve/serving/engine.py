"""The engine: the one object both transports call.

It resolves a served name to a model unit, validates tensors against model.yaml, queues the
request into that unit's batcher and returns only the outputs asked for. It also answers the
health, metadata, statistics and repository questions of the KServe v2 protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from slimserve import __version__
from slimserve.config import Settings
from slimserve.errors import (
    Code,
    DeadlineExceeded,
    InvalidArgument,
    ModelLoadError,
    NotFound,
    PermissionDenied,
    SlimserveError,
)
from slimserve.repository.store import Repository, split_served_name
from slimserve.runtimes.llm import SamplingParams
from slimserve.security.audit import AuditLog
from slimserve.security.keys import ANONYMOUS, Authenticator, Identity
from slimserve.serving import llm, llm_v2
from slimserve.serving.admission import Admission
from slimserve.serving.cache import ResponseCaches, cache_key
from slimserve.serving.llm import TextStream
from slimserve.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from slimserve.serving.metrics import Metrics
from slimserve.serving.models import ModelEntry, ModelManager, State, Unit
from slimserve.serving.validate import check_inputs, check_outputs
from slimserve.types import InferRequest, InferResponse

log = logging.getLogger("slimserve.engine")

EXTENSIONS = ["binary_tensor_data", "model_repository", "schedule_policy"]
PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "torch": "pytorch_torch",
    "transformers": "transformers",
    "python": "python",
}


def parse_version(version: str | int | None) -> int | None:
    """'' / None -> None (the default version); '3' -> 3; anything else is an error."""
    if version is None or version == "":
        return None
    text = str(version)
    if not text.isdigit() or int(text) <= 0 or len(text) > 9:
        raise InvalidArgument(f"model version {text[:32]!r} is not a positive integer")
    return int(text)


class Engine:
    """The data plane. It receives its collaborators (built from Settings by slimserve.app's
    `build_engine`) and owns them from then on: `stop` closes them."""

    def __init__(
        self,
        repository: Repository,
        settings: Settings,
        *,
        models: ModelManager,
        admission: Admission,
        metrics: Metrics,
        caches: ResponseCaches,
        audit: AuditLog,
        auth: Authenticator | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self._clock = clock  # seconds; admission decisions only (tests pass a fake one)
        self.metrics = metrics
        self.models = models
        self.admission = admission
        self.caches = caches  # per model, for models with `cache:`
        self.auth = auth
        self.audit = audit
        self._root_text = str(repository.root)
        self._started = False
        self._startup_done = False
        self._stopping = False
        self._startup_task: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, wait: bool = False) -> None:
        """Begin loading the startup models in the background (live at once)."""
        self._started = True
        names = self._startup_models()
        self._startup_task = asyncio.get_running_loop().create_task(self._load_all(names))
        if wait:
            await self._startup_task

    def _startup_models(self) -> list[str]:
        wanted = self.settings.load_models
        available = self.repository.model_names()
        if "*" in wanted:
            return available
        missing = [n for n in wanted if n not in available]
        for name in missing:
            log.error("startup model %s is not in the repository %s", name, self.repository.root)
        return [n for n in wanted if n in available]

    async def _load_all(self, names: list[str]) -> None:
        await self.models.register_all()
        await self.models.preload(names)
        self._startup_done = True
        log.info("startup loads done: %d model(s)", len(names))

    async def stop(self) -> None:
        self._stopping = True
        if self._startup_task is not None and not self._startup_task.done():
            self._startup_task.cancel()
        await self.models.close()
        await self.caches.close()
        self.audit.close()

    # -- health and metadata ---------------------------------------------------------------

    def live(self) -> bool:
        return not self._stopping

    def ready(self) -> bool:
        return self._started and self._startup_done and not self._stopping

    def server_metadata(self) -> dict[str, Any]:
        return {"name": "slimserve", "version": __version__, "extensions": list(EXTENSIONS)}

    def _resolve(
        self, served: str, version: str | None
    ) -> tuple[ModelEntry, int | None, str | None]:
        name, variant = split_served_name(served)
        return self.models.entry(name), parse_version(version), variant

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        entry, v, variant = self._resolve(name, version)
        unit = self._describe_unit(entry, v, variant)
        config = unit.target.config if unit is not None else entry.config
        meta: dict[str, Any] = {
            "name": name,
            "versions": [str(x) for x in entry.versions()],
            "platform": PLATFORMS.get(unit.target.backend if unit else "", ""),
            "inputs": [s.to_dict() for s in config.input_specs()] if config else [],
            "outputs": [s.to_dict() for s in config.output_specs()] if config else [],
            "state": (unit.state if unit else entry.state).value,
        }
        reason = unit.reason if unit else entry.reason
        if reason:
            meta["reason"] = self.public(reason)
        if unit is not None and unit.target.variant is None:
            variants = sorted(
                var for (ver, var) in entry.units if ver == unit.target.version and var
            )
            if variants:
                meta["variants"] = variants
        return meta

    def _describe_unit(
        self, entry: ModelEntry, version: int | None, variant: str | None
    ) -> Unit | None:
        v = version if version is not None else entry.default_version()
        if v is None:
            v = max(entry.versions(), default=None)
        if v is None:
            return None
        unit = entry.units.get((v, variant))
        if unit is None:
            what = f"version {v}" + (f" variant '{variant}'" if variant else "")
            raise NotFound(f"model '{entry.name}' has no {what}")
        return unit

    def model_ready(self, name: str, version: str | None = None) -> bool:
        entry, v, variant = self._resolve(name, version)
        try:
            unit = self.models.find(entry.name, v, variant)
        except NotFound:
            if v is None and variant is None:
                return False
            raise
        except SlimserveError:
            return False
        return unit.state is State.READY

    def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        entry, v, variant = self._resolve(name, version)
        unit = self._describe_unit(entry, v, variant)
        config = unit.target.config if unit else entry.config
        if config is None:
            raise NotFound(f"model '{name}' has no readable model.yaml: {entry.reason}")
        batched = config.batched

        def dims(shape: tuple[int, ...]) -> list[int]:
            return list(shape[1:] if batched else shape)

        def tensors(specs: list[Any]) -> list[dict[str, Any]]:
            return [
                {
                    "name": s.name,
                    "data_type": f"TYPE_{_triton_type(s.datatype)}",
                    "dims": dims(s.shape),
                }
                for s in specs
            ]

        backend = unit.target.backend if unit else config.backend
        out: dict[str, Any] = {
            "name": name,
            "platform": PLATFORMS.get(backend, backend),
            "backend": backend,
            "max_batch_size": config.batching.max_batch_size,
            "input": tensors(config.input_specs()),
            "output": tensors(config.output_specs()),
        }
        if batched:
            out["dynamic_batching"] = {
                "max_queue_delay_microseconds": int(config.batching.max_queue_delay_ms * 1000)
            }
        return out

    def model_statistics(
        self, name: str | None = None, version: str | None = None
    ) -> dict[str, Any]:
        if name:
            entry, v, variant = self._resolve(name, version)
            units = [
                u
                for (ver, var), u in entry.units.items()
                if var == variant and (v is None or ver == v)
            ]
        else:
            units = [u for e in self.models.models.values() for u in e.units.values()]
        return {"model_stats": [_unit_stats(u) for u in units]}

    def repository_index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for name in self.repository.model_names():
            entry = self.models.models.get(name)
            if entry is None:
                if not ready_only:
                    rows.append({"name": name, "version": "", "state": "UNLOADED", "reason": "new"})
                continue
            for (ver, var), unit in sorted(
                entry.units.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
            ):
                if ready_only and unit.state is not State.READY:
                    continue
                served = name if var is None else f"{name}:{var}"
                rows.append(
                    {
                        "name": served,
                        "version": str(ver),
                        "state": unit.state.value,
                        "reason": self.public(unit.reason),
                    }
                )
            if not entry.units and not ready_only:
                rows.append(
                    {
                        "name": name,
                        "version": "",
                        "state": entry.state.value,
                        "reason": self.public(entry.reason),
                    }
                )
        return rows

    # -- model control ---------------------------------------------------------------------

    def authorize(self, token: str | None, scope: str, model: str | None = None) -> Identity:
        """Who is calling (from a bearer token) and whether they may use `scope` on `model`.

        Without a key file every caller is anonymous and allowed. Raises Unauthenticated
        (401) or PermissionDenied (403); never echoes the token. A refused management call
        is audited like an allowed one.
        """
        if self.auth is None:
            return ANONYMOUS
        identity = None
        try:
            identity = self.auth.authenticate(token)
            self.auth.authorize(identity, scope, model)
        except SlimserveError as exc:
            if scope == "manage":
                self.audit.record(identity, "authorize", model, outcome=exc.code.value.lower())
            raise
        return identity

    def public(self, text: str) -> str:
        """A message fit for clients: the repository's location on disk is not theirs to know
        (the server log keeps full paths for operators)."""
        return text.replace(self._root_text, "<repository>") if text else text

    def _check_control(self) -> None:
        if not self.settings.model_control:
            raise PermissionDenied(
                "model control is disabled; start the server with --model-control "
                "(or SLIMSERVE_MODEL_CONTROL=true) to load and unload models through the API"
            )

    async def load_model(self, name: str, identity: Identity | None = None) -> None:
        await self._audited("load", name, identity, self._load)

    async def unload_model(self, name: str, identity: Identity | None = None) -> None:
        await self._audited("unload", name, identity, self._unload)

    async def _audited(
        self,
        action: str,
        name: str,
        identity: Identity | None,
        run: Callable[[str], Awaitable[None]],
    ) -> None:
        """Run a management action and write its audit line, whether it succeeds or not."""
        shown = name if len(name) <= 128 else name[:128] + "..."
        try:
            self._check_control()
            await run(name)
        except SlimserveError as exc:
            self.audit.record(identity, action, shown, outcome=exc.code.value.lower())
            exc.message = self.public(exc.message)
            raise
        self.audit.record(identity, action, shown)

    async def _load(self, name: str) -> None:
        model, variant = split_served_name(name)
        if variant is not None:
            raise InvalidArgument("load a model by its name; its variants load with it")
        self.repository.model_dir(model)  # NotFound with the repository path
        entry = await self.models.load(model)
        if entry.state is not State.READY:
            raise ModelLoadError(f"model '{model}' failed to load: {entry.reason}")

    async def _unload(self, name: str) -> None:
        model, variant = split_served_name(name)
        if variant is not None:
            raise InvalidArgument("unload a model by its name; its variants unload with it")
        await self.models.unload(model)

    # -- inference -------------------------------------------------------------------------

    def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type, for GET /metrics."""
        return self.metrics.render(), METRICS_CONTENT_TYPE

    def health(self) -> dict[str, Any]:
        """Health beyond live/ready: what is degraded and why."""
        units = [u for e in self.models.models.values() for u in e.units.values()]
        open_breakers = sorted(
            u.target.key for u in units if self.admission.breaker_state(u).value != "closed"
        )
        failed = sorted(
            u.target.key for u in units if u.state is State.UNAVAILABLE and u.reason != "unloaded"
        )
        degraded = sorted(
            key for key, guard in self.admission.guards().items() if guard.degrade.degraded
        )
        status = "ok" if not (open_breakers or failed or degraded) else "degraded"
        if not self.ready():
            status = "starting" if self.live() else "stopping"
        return {
            "status": status,
            "live": self.live(),
            "ready": self.ready(),
            "breakers_open": open_breakers,
            "failed_units": failed,
            "degraded_models": degraded,
            "resident_bytes": self.models.used_bytes,
            "memory_budget_bytes": self.models.budget_bytes,
        }

    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate, admit, route (variant, degradation), batch and run one request."""
        started = time.perf_counter()
        try:
            response = await self._infer(request)
        except SlimserveError as exc:
            name = request.model.partition(":")[0]
            label = name if name in self.models.models else "_other"
            self.metrics.observe_request(label, "", exc.code.value.lower(), 0.0)
            exc.message = self.public(exc.message)
            raise
        elapsed = time.perf_counter() - started
        self.metrics.observe_request(response.model, response.variant or "", "success", elapsed)
        return response

    async def _infer(self, request: InferRequest) -> InferResponse:
        name, variant = _requested(request)
        version = parse_version(request.version)
        entry = self.models.entry(name)
        asked = self.models.find(name, version, variant)
        config = asked.target.config
        rows = check_inputs(request.model, config, request.inputs)
        check_outputs(request.model, config, request.outputs)
        deadline = _deadline(request.parameters.get("timeout"))
        now = self._clock()
        self.admission.check_rate(request.client, name, config, now)
        allow = _flag(request.parameters.get("degrade"), config.degrade.allow)
        unit = self.admission.route(entry, asked, allow, now, rows)
        self.admission.check_load(unit, None if deadline is None else deadline - now)
        cache = self.caches.for_model(unit.target.model, unit.target.config.cache)
        if cache is None:
            outputs = await self._run(unit, request, rows, deadline)
        else:
            key = cache_key(unit.target.key, request.inputs, request.parameters)
            outputs = await cache.get_or_compute(
                key, lambda: self._run(unit, request, rows, deadline)
            )
        if request.outputs:
            outputs = {k: outputs[k] for k in request.outputs}
        response = InferResponse(
            model=name,
            version=str(unit.target.version),
            outputs=outputs,
            variant=unit.target.variant,
            id=request.id,
        )
        if unit is not asked:
            response.parameters["degraded"] = True
        return response

    async def _run(
        self, unit: Unit, request: InferRequest, rows: int, deadline: float | None
    ) -> dict[str, Any]:
        model = unit.target.model
        # A language model generates through its own engine with the request's sampling
        # parameters (checked here, before a load), not through the batcher (serving/llm_v2).
        text = unit.target.config.task == llm.TEXT_GENERATION
        plan = llm_v2.plan(unit.target.config, request.parameters) if text else None
        self.admission.in_flight[model] += 1
        started = self._clock()
        try:
            unit = await self.models.acquire_unit(unit)
            try:
                assert unit.batcher is not None  # READY units always have one
                priority = _priority(request.parameters.get("priority"))
                if plan is not None:
                    begun_ns = time.perf_counter_ns()
                    try:
                        outputs = await llm_v2.complete(
                            unit, request.inputs, plan, deadline, self.metrics.generation
                        )
                    except SlimserveError:
                        unit.stats.record_call(rows, begun_ns, ok=False)
                        raise
                    unit.stats.record_call(rows, begun_ns, ok=True)
                else:
                    outputs = await unit.batcher.submit(request.inputs, rows, deadline, priority)
            finally:
                self.models.release(unit)
        except SlimserveError as exc:
            if exc.code is Code.INTERNAL:  # the model failed, not the request
                self.admission.record(unit, self._clock(), False, self._clock() - started)
            raise
        finally:
            self.admission.in_flight[model] -= 1
        self.admission.record(unit, self._clock(), True, self._clock() - started)
        return outputs

    # -- language models and embeddings (the OpenAI API) -------------------------------------

    async def generate(
        self,
        model: str,
        params: SamplingParams,
        *,
        prompt: str | Sequence[int] | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        fill_max_tokens: bool = False,
        deadline_s: float | None = None,
        client: str | None = None,
    ) -> TextStream:
        """Submit a prompt (text, token ids or chat messages) to a text-generation model; the
        returned stream yields TokenEvents and releases the model when it ends (serving/llm)."""
        return await llm.generate(
            self,
            model,
            params,
            prompt=prompt,
            messages=messages,
            fill_max_tokens=fill_max_tokens,
            deadline_s=deadline_s,
            client=client,
        )

    async def embed(self, model: str, texts: Sequence[str], client: str | None = None) -> Any:
        """Embeddings (N, hidden) FP32 of an embedding model, through `infer` (batched)."""
        config = llm.find_unit(self, model, llm.EMBEDDING).target.config
        spec, output = config.input_specs()[0], config.output_specs()[0].name
        step = config.batching.max_batch_size or len(texts)
        requests = []
        for start in range(0, len(texts), step):
            array = np.empty(len(texts[start : start + step]), dtype=object)
            array[:] = [t.encode("utf-8") for t in texts[start : start + step]]
            inputs = {spec.name: array}
            requests.append(InferRequest(model, inputs, outputs=(output,), client=client))
        responses = await asyncio.gather(*(self.infer(r) for r in requests))
        return np.concatenate([r.outputs[output] for r in responses])


def _requested(request: InferRequest) -> tuple[str, str | None]:
    """Model name and variant from 'name[:variant]' and the parameter 'variant'."""
    name, variant = split_served_name(request.model)
    param_variant = request.parameters.get("variant")
    if param_variant is None:
        return name, variant
    if not isinstance(param_variant, str):
        raise InvalidArgument("parameter 'variant' must be a string naming a variant")
    if variant is not None and variant != param_variant:
        raise InvalidArgument(
            f"variant given twice: '{variant}' in the name, '{param_variant}' in parameters"
        )
    return name, split_served_name(f"{name}:{param_variant}")[1]


def _flag(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise InvalidArgument(f"parameter 'degrade' = {value!r}: use true or false")


def _priority(value: Any) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"parameter 'priority' = {value!r}: use an integer (higher first)")
    try:
        return int(value)
    except ValueError:
        raise InvalidArgument(
            f"parameter 'priority' = {value!r}: use an integer (higher first)"
        ) from None


def _deadline(timeout: Any) -> float | None:
    if timeout is None:
        return None
    try:
        seconds = float(timeout)
    except (TypeError, ValueError):
        raise InvalidArgument(
            f"parameter 'timeout' = {timeout!r} is not a number of seconds"
        ) from None
    if seconds <= 0:
        raise DeadlineExceeded("the request's timeout passed before it reached the model")
    return time.monotonic() + seconds


def _triton_type(datatype: str) -> str:
    return "STRING" if datatype == "BYTES" else datatype


def _unit_stats(unit: Unit) -> dict[str, Any]:
    s = unit.stats
    t = unit.target
    served = t.model if t.variant is None else f"{t.model}:{t.variant}"

    def pair(count: int, ns: int) -> dict[str, int]:
        return {"count": count, "ns": ns}

    return {
        "name": served,
        "version": str(t.version),
        "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count,
        "execution_count": s.execution_count,
        "inference_stats": {
            "success": pair(s.success_count, s.success_ns),
            "fail": pair(s.fail_count, s.fail_ns),
            "queue": pair(s.success_count, s.queue_ns),
            "compute_input": pair(s.execution_count, 0),
            "compute_infer": pair(s.execution_count, s.compute_ns),
            "compute_output": pair(s.execution_count, 0),
            "cache_hit": pair(0, 0),
            "cache_miss": pair(0, 0),
        },
        "batch_stats": [
            {
                "batch_size": size,
                "compute_input": pair(c, 0),
                "compute_infer": pair(c, ns),
                "compute_output": pair(c, 0),
            }
            for size, (c, ns) in sorted(s.batch_sizes.items())
        ],
    }
