"""The engine: the one object every transport calls.

`infer` resolves a served name to a model unit, validates tensors against model.yaml, admits
the request (rate limits, breakers, shedding, degradation), queues it into that unit's
batcher (or, for a language model, its generator) and returns only the outputs asked for;
`generate` streams tokens from a language model for the OpenAI routes. The describing
questions of the KServe v2 protocol go to serving/catalog.py, keys and model control to
serving/control.py; the engine only delegates to them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from slimserve import __version__
from slimserve.config import Settings
from slimserve.errors import (
    Code,
    DeadlineExceeded,
    InvalidArgument,
    SlimserveError,
)
from slimserve.repository.store import Repository, split_served_name
from slimserve.runtimes.llm import SamplingParams
from slimserve.security.audit import AuditLog
from slimserve.security.keys import ANONYMOUS, Identity
from slimserve.serving import llm, prompt_tensors, slo
from slimserve.serving.admission import Admission
from slimserve.serving.cache import ResponseCaches, cache_key
from slimserve.serving.catalog import Catalog, parse_version
from slimserve.serving.control import ModelControl
from slimserve.serving.llm import TextStream
from slimserve.serving.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from slimserve.serving.metrics import Metrics, TokenMeter
from slimserve.serving.models import ModelManager, Unit
from slimserve.serving.overview import LiveSample, ModelView, live_sample, model_views
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
        control: ModelControl,
        audit: AuditLog,
        clock: Clock = time.monotonic,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self._clock = clock  # monotonic seconds: deadlines and admission (tests: a FakeClock)
        self.metrics = metrics
        self.models = models
        self.admission = admission
        self.caches = caches  # per model, for models with `cache:`
        self.catalog = catalog
        self.control = control
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

    # -- keys and model control -------------------------------------------------------------

    def authorize(self, token: str | None, scope: str, model: str | None = None) -> Identity:
        """The caller, if it may use `scope` on `model` (serving/control.py)."""
        return self.control.authorize(token, scope, model)

    def identify(self, token: str | None) -> Identity:
        """Who holds `token` (any scope); Unauthenticated (401) without a valid one."""
        return self.control.identify(token)

    def public(self, text: str) -> str:
        """A message fit for clients: the repository's location on disk is not theirs to know
        (the server log keeps full paths for operators)."""
        return self.catalog.public(text)

    async def load_model(self, name: str, identity: Identity | None = None) -> None:
        await self.control.load(name, identity)

    async def unload_model(self, name: str, identity: Identity | None = None) -> None:
        await self.control.unload(name, identity)

    # -- inference -------------------------------------------------------------------------

    def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type, for GET /metrics."""
        return self.metrics.render(), METRICS_CONTENT_TYPE

    def overview(self, identity: Identity = ANONYMOUS) -> list[ModelView]:
        """Every model, version and variant `identity` may use: state, residency, profile."""
        return model_views(self.models, self.admission, self.public, identity.may_use)

    def live_metrics(self, identity: Identity = ANONYMOUS) -> LiveSample:
        """The /metrics figures now, per model and variant `identity` may use (cumulative)."""
        return live_sample(self.metrics.registry, identity.may_use)

    async def infer(self, request: InferRequest) -> InferResponse:
        """Validate, admit, route (variant, degradation), batch and run one request."""
        started = time.perf_counter()
        try:
            response = await self._infer(request)
        except SlimserveError as exc:
            self._count_refusal(request.model, exc)
            exc.message = self.public(exc.message)
            raise
        elapsed = time.perf_counter() - started
        self.metrics.observe_request(response.model, response.variant or "", "success", elapsed)
        if response.parameters.get("degraded"):
            self.metrics.observe_degraded(response.model, response.variant or "")
        return response

    def _count_refusal(self, served: str, exc: SlimserveError) -> None:
        name = served.partition(":")[0]
        label = name if name in self.models.models else "_other"
        self.metrics.observe_request(label, "", exc.code.value.lower(), 0.0)

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
            resident = self.models.resident_units()
            asked, choice = slo.choose_unit(
                entry, asked, controls, rows, self.admission.healthy, resident, (arrived, now)
            )
            allow = False
        elif controls.latency_slo_ms is not None:
            allow = False  # a named variant answers, as named (README: latency objectives)
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
        if controls.latency_slo_ms is not None:
            response.parameters.update(slo.response_parameters(choice))
        return response

    async def _run(
        self, unit: Unit, request: InferRequest, rows: int, deadline: float | None
    ) -> dict[str, Any]:
        # A language model generates through its own generator with the request's sampling
        # parameters (checked here, before a load), not through the batcher.
        text = unit.target.config.task == llm.TEXT_GENERATION
        plan = prompt_tensors.plan(unit.target.config, request.parameters) if text else None
        unit = await self._acquire(unit)
        started = self._clock()
        outcome = "cancelled"  # left before an answer (the client went away)
        try:
            if plan is None:
                assert unit.batcher is not None  # READY units always have one
                outputs = await unit.batcher.submit(
                    request.inputs, rows, deadline, request.controls.priority
                )
            else:
                outputs = await self._complete(unit, request, rows, plan, deadline)
            outcome = "success"
        except SlimserveError as exc:
            outcome = exc.code.value.lower()
            raise
        finally:
            self._done(unit, outcome, started)
        return outputs

    async def _complete(
        self,
        unit: Unit,
        request: InferRequest,
        rows: int,
        plan: prompt_tensors.V2Plan,
        deadline: float | None,
    ) -> dict[str, Any]:
        """A tensor of prompts completed by a language model (serving/prompt_tensors.py),
        counted in the unit's statistics as one batch of its rows."""
        target = unit.target
        variant = target.variant or ""

        def meter(prompt_tokens: int) -> TokenMeter:
            return self.metrics.generation.meter(target.model, variant, prompt_tokens, 1)

        begun = self._clock()
        time_left = None if deadline is None else deadline - begun
        generator = llm.text_generator(unit)
        ok = False
        try:
            outputs = await prompt_tensors.complete(
                generator, target.config, request.inputs, plan, time_left, meter
            )
            ok = True
        finally:
            unit.stats.record_call(rows, _ns(self._clock() - begun), ok=ok)
        return outputs

    async def _acquire(self, unit: Unit) -> Unit:
        """The unit loaded and held (not evictable) for one request; pair with `_done`."""
        self.admission.in_flight[unit.target.model] += 1
        try:
            return await self.models.acquire_unit(unit)
        except BaseException:
            self.admission.in_flight[unit.target.model] -= 1
            raise

    def _done(self, unit: Unit, outcome: str, started: float) -> float:
        """Release a unit `_acquire` held; the breaker learns whether the model (not the
        request) failed. Returns the seconds the request held it."""
        self.models.release(unit)
        self.admission.in_flight[unit.target.model] -= 1
        now = self._clock()
        elapsed = now - started
        if outcome in ("success", Code.INTERNAL.value.lower()):
            self.admission.record(unit, now, outcome == "success", elapsed)
        return elapsed

    # -- language models and embeddings (the OpenAI API) -------------------------------------

    async def generate(
        self,
        model: str,
        params: SamplingParams,
        *,
        prompt: llm.Prompt | None = None,
        messages: llm.Messages | None = None,
        fill_max_tokens: bool = False,
        deadline_s: float | None = None,
        client: str | None = None,
        controls: RequestControls = NO_CONTROLS,
    ) -> TextStream:
        """Submit a prompt (text, token ids or chat messages) to a text-generation model; the
        returned stream yields TokenEvents and releases the model when it ends.

        `fill_max_tokens`: ignore params.max_tokens and allow up to the context's end (at
        most llm.DEFAULT_CHAT_MAX_TOKENS), as the chat API does when max_tokens is not given.
        Refusals (rate limits, a full queue, a prompt too long) raise before any event.
        `controls` may carry a latency objective for the whole completion (serving/slo.py).
        """
        try:
            asked = llm.find_unit(self.models, model, llm.TEXT_GENERATION)
            config = asked.target.config
            limit = llm.configured_timeout_s(config.parameters)
            if limit is not None:  # the server's own bound; the request's may be shorter
                deadline_s = limit if deadline_s is None else min(deadline_s, limit)
            now = self._clock()
            self.admission.check_rate(client, asked.target.model, config, now)
            # As v2 requests: the breaker, and a cheaper variant under pressure where allowed;
            # a latency objective picks the unit itself (and pressure does not move it).
            entry = self.models.entry(asked.target.model)
            allow, objective = config.degrade.allow, None
            if controls.latency_slo_ms is not None:
                allow = False
                if asked.target.variant is None:
                    tokens = llm.DEFAULT_CHAT_MAX_TOKENS if fill_max_tokens else params.max_tokens
                    asked, choice = slo.choose_llm_unit(
                        entry, asked, controls, tokens + 1, self.admission.healthy, (now, now)
                    )
                    objective = slo.response_parameters(choice)
                else:
                    objective = slo.response_parameters(None)
            unit = self.admission.route(entry, asked, allow, now)
            self.admission.check_load(unit, deadline_s)
            unit = await self._acquire(unit)
        except SlimserveError as exc:  # refused before any event: counted like a failed infer
            self._count_refusal(model, exc)
            raise
        started = self._clock()
        try:
            generator = llm.text_generator(unit)
            ids = llm.encode_prompt(generator, prompt, messages)
            if fill_max_tokens:
                params = llm.fill_context(generator, ids, params)
            stream = generator.submit(ids, params, deadline_s)
        except BaseException as exc:
            self._done(unit, "cancelled", started)
            if isinstance(exc, SlimserveError):
                self._count_refusal(model, exc)
            raise
        target = unit.target
        variant = target.variant or ""
        meter = self.metrics.generation.meter(target.model, variant, len(ids), params.n)

        def on_end(outcome: str) -> None:
            elapsed = self._done(unit, outcome, started)
            self.metrics.observe_request(target.model, variant, outcome, elapsed)

        served = llm.Served(variant or None, degraded=unit is not asked, objective=objective)
        return TextStream(stream, generator, len(ids), meter, on_end, served)

    async def cached_reply(
        self,
        model: str,
        request: dict[str, Any],
        compute: Callable[[], Awaitable[tuple[bytes, bool]]],
    ) -> tuple[bytes, bool]:
        """A deterministic generation's encoded reply through the model's response cache
        (`cache:` in model.yaml; without one, computed): `request` holds what determines the
        answer, `compute` returns (reply, whether it may be kept: not a degraded answer).
        Returns (reply, whether it came from the cache)."""
        target = llm.find_unit(self.models, model, llm.TEXT_GENERATION).target
        cache = self.caches.for_model(target.model, target.config.cache)
        if cache is None:
            return (await compute())[0], False
        kept = {"ok": True, "computed": False}

        async def arrays() -> dict[str, Any]:
            reply, kept["ok"] = await compute()
            kept["computed"] = True
            return {"reply": np.array([reply], dtype=object)}

        key = cache_key(target.key, {}, request)
        found = await cache.get_or_compute(key, arrays, keep=lambda _: kept["ok"])
        return bytes(found["reply"][0]), not kept["computed"]

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
        config = llm.find_unit(self.models, model, llm.EMBEDDING).target.config
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

    def count_tokens(self, model: str, texts: Sequence[str]) -> int:
        """Tokens in `texts` for an embedding model's usage (0 when unknown)."""
        return llm.count_tokens(self.models, model, texts)


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
