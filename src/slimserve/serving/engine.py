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
    PermissionDenied,
    SlimserveError,
)
from slimserve.repository.store import Repository, split_served_name
from slimserve.runtimes.llm import SamplingParams
from slimserve.security.audit import AuditLog
from slimserve.security.keys import ANONYMOUS, Authenticator, Identity
from slimserve.serving import llm, llm_v2, slo
from slimserve.serving.admission import Admission
from slimserve.serving.cache import ResponseCaches, cache_key
from slimserve.serving.catalog import Catalog, parse_version
from slimserve.serving.llm import TextStream
from slimserve.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from slimserve.serving.metrics import Metrics
from slimserve.serving.models import ModelManager, State, Unit
from slimserve.serving.validate import check_inputs, check_outputs
from slimserve.types import (
    NO_CONTROLS,
    Clock,
    HealthReport,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelSettings,
    ModelStatistics,
    RepositoryEntry,
    RequestControls,
    ServerMetadata,
)

log = logging.getLogger("slimserve.engine")

EXTENSIONS = ("binary_tensor_data", "model_repository", "schedule_policy")


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
        catalog: Catalog,
        audit: AuditLog,
        auth: Authenticator | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self._clock = clock  # seconds; admission decisions only (tests pass a fake one)
        self.metrics = metrics
        self.models = models
        self.admission = admission
        self.caches = caches  # per model, for models with `cache:`
        self.catalog = catalog
        self.auth = auth
        self.audit = audit
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
        # An entry is a model (all its units) or one unit key, NAME/VERSION[:VARIANT], as
        # `slimserve plan` writes them to keep only the planned units resident.
        missing = [n for n in wanted if n.partition("/")[0] not in available]
        for name in missing:
            log.error("startup model %s is not in the repository %s", name, self.repository.root)
        return [n for n in wanted if n not in missing]

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

    def server_metadata(self) -> ServerMetadata:
        return ServerMetadata("slimserve", __version__, EXTENSIONS)

    def model_metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        return self.catalog.metadata(name, version)

    def model_ready(self, name: str, version: str | None = None) -> bool:
        return self.catalog.ready(name, version)

    def model_config(self, name: str, version: str | None = None) -> ModelSettings:
        return self.catalog.settings(name, version)

    def model_statistics(
        self, name: str | None = None, version: str | None = None
    ) -> list[ModelStatistics]:
        return self.catalog.statistics(name, version)

    def repository_index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        return self.catalog.index(ready_only)

    def health(self) -> HealthReport:
        """Health beyond live/ready: what is degraded and why."""
        return self.catalog.health(self.live(), self.ready())

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
        return self.catalog.public(text)

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
        arrived = self._clock()
        name, variant = _requested(request)
        version = parse_version(request.version)
        entry = self.models.entry(name)
        asked = self.models.find(name, version, variant)
        config = asked.target.config
        rows = check_inputs(request.model, config, request.inputs)
        check_outputs(request.model, config, request.outputs)
        now = self._clock()
        controls = request.controls
        deadline = _deadline(controls.timeout_s, now)
        self.admission.check_rate(request.client, name, config, now)
        allow = config.degrade.allow if controls.degrade is None else controls.degrade
        choice = None
        if controls.latency_slo_ms is not None and asked.target.variant is None:
            # The objective picks the unit (serving/slo.py); pressure does not move it again.
            asked, choice = slo.choose_unit(
                entry, asked, controls, rows, self.admission.healthy, arrived, now
            )
            allow = False
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
        if choice is not None:
            response.parameters.update(slo.response_parameters(choice))
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
                if plan is not None:
                    begun = self._clock()
                    time_left = None if deadline is None else deadline - begun
                    try:
                        outputs = await llm_v2.complete(
                            unit, request.inputs, plan, time_left, self.metrics.generation
                        )
                    except SlimserveError:
                        unit.stats.record_call(rows, _ns(self._clock() - begun), ok=False)
                        raise
                    unit.stats.record_call(rows, _ns(self._clock() - begun), ok=True)
                else:
                    outputs = await unit.batcher.submit(
                        request.inputs, rows, deadline, request.controls.priority
                    )
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

    async def embed(
        self,
        model: str,
        texts: Sequence[str],
        client: str | None = None,
        controls: RequestControls = NO_CONTROLS,
    ) -> InferResponse:
        """Embeddings of an embedding model through `infer` (batched): one response whose only
        output is (N, hidden) FP32; it names the unit that answered (the first chunk's, with
        its objective parameters, when `controls` carry latency_slo_ms)."""
        config = llm.find_unit(self, model, llm.EMBEDDING).target.config
        spec, output = config.input_specs()[0], config.output_specs()[0].name
        step = config.batching.max_batch_size or len(texts)
        requests = []
        for start in range(0, len(texts), step):
            array = np.empty(len(texts[start : start + step]), dtype=object)
            array[:] = [t.encode("utf-8") for t in texts[start : start + step]]
            inputs = {spec.name: array}
            requests.append(
                InferRequest(model, inputs, outputs=(output,), client=client, controls=controls)
            )
        responses = await asyncio.gather(*(self.infer(r) for r in requests))
        first = responses[0]
        vectors = np.concatenate([r.outputs[output] for r in responses])
        return InferResponse(
            first.model, first.version, {output: vectors}, first.variant, None, first.parameters
        )


def _requested(request: InferRequest) -> tuple[str, str | None]:
    """Model name and variant from 'name[:variant]' and the request's `variant`."""
    name, variant = split_served_name(request.model)
    if request.variant is None:
        return name, variant
    if variant is not None and variant != request.variant:
        raise InvalidArgument(
            f"variant given twice: '{variant}' in the name, '{request.variant}' in parameters"
        )
    return name, split_served_name(f"{name}:{request.variant}")[1]


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _deadline(seconds: float | None, now: float) -> float | None:
    """When a request with `seconds` to live (None: no limit), arriving `now`, is too late."""
    if seconds is None:
        return None
    if seconds <= 0:
        raise DeadlineExceeded("the request's timeout passed before it reached the model")
    return now + seconds
