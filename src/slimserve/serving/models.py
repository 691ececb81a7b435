"""Model states: which versions and variants are loaded, loading, or failed, and why.

Loading and unloading run in a dedicated thread pool so that they never block inference on
other models; each served unit (version or variant) gets its own runtime and batcher.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from enum import Enum

from slimserve.config import Settings
from slimserve.errors import ModelLoadError, NotFound, SlimserveError, Unavailable
from slimserve.repository import verify_manifest
from slimserve.repository.schema import ModelConfig
from slimserve.repository.store import Repository, Target
from slimserve.runtimes import Runtime, RuntimeOptions, create_runtime
from slimserve.serving.batcher import Batcher

log = logging.getLogger("slimserve.models")

RuntimeFactory = Callable[[Target, RuntimeOptions], Runtime]


class State(str, Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(slots=True)
class Unit:
    """One served unit: a version or a variant of it."""

    target: Target
    state: State = State.LOADING
    reason: str = ""
    runtime: Runtime | None = None
    batcher: Batcher | None = None


@dataclass(slots=True)
class ModelEntry:
    name: str
    config: ModelConfig | None = None
    state: State = State.LOADING
    reason: str = ""
    # (version, variant or None) -> unit
    units: dict[tuple[int, str | None], Unit] = field(default_factory=dict)

    def versions(self) -> list[int]:
        return sorted({v for v, var in self.units if var is None})

    def default_version(self) -> int | None:
        ready = [v for (v, var), u in self.units.items() if var is None and u.state is State.READY]
        return max(ready) if ready else None


class ModelManager:
    """Loads, tracks and unloads models from a repository."""

    def __init__(
        self,
        repository: Repository,
        settings: Settings,
        infer_executor: Executor,
        load_executor: Executor,
        runtime_factory: RuntimeFactory | None = None,
    ) -> None:
        self.repository = repository
        self.settings = settings
        self._infer_executor = infer_executor
        self._load_executor = load_executor
        self._factory = runtime_factory or create_runtime
        self._options = RuntimeOptions(
            intra_op_threads=settings.intra_op_threads,
            graph_optimization=settings.ort_graph_optimization,
        )
        self.models: dict[str, ModelEntry] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def entry(self, name: str) -> ModelEntry:
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(
                f"model '{name}' is not loaded; known models: "
                f"{', '.join(sorted(self.models)) or 'none'}"
            ) from None

    def unit(self, name: str, version: int | None, variant: str | None) -> Unit:
        """The READY unit for a request, or a NotFound/Unavailable error saying why not."""
        entry = self.entry(name)
        if version is None:
            version = entry.default_version()
            if version is None:
                raise Unavailable(
                    f"model '{name}' has no ready version ({entry.state.value}"
                    + (f": {entry.reason}" if entry.reason else "")
                    + ")",
                    retry_after_s=1 if entry.state is State.LOADING else None,
                )
        unit = entry.units.get((version, variant))
        if unit is None:
            what = f"version {version}" + (f" variant '{variant}'" if variant else "")
            raise NotFound(f"model '{name}' has no {what}")
        if unit.state is not State.READY:
            raise Unavailable(
                f"{unit.target.key} is {unit.state.value}"
                + (f": {unit.reason}" if unit.reason else ""),
                retry_after_s=1 if unit.state is State.LOADING else None,
            )
        return unit

    async def load(self, name: str) -> ModelEntry:
        """(Re)load every version and variant of a model; failures are recorded per unit."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            old = self.models.get(name)
            entry = ModelEntry(name)
            if old is None:
                self.models[name] = entry
            try:
                targets = self._targets(name, entry)
            except SlimserveError as exc:
                entry.state, entry.reason = State.UNAVAILABLE, exc.message
                self.models[name] = entry
                log.error("model %s cannot be loaded: %s", name, exc.message)
                if old is not None:
                    await self._unload_entry(old)
                return entry
            entry.units = {(t.version, t.variant): Unit(t) for t in targets}
            await asyncio.gather(*(self._load_unit(u) for u in entry.units.values()))
            entry.state, entry.reason = self._summarise(entry)
            self.models[name] = entry
            if old is not None:
                await self._unload_entry(old)
            return entry

    def _targets(self, name: str, entry: ModelEntry) -> list[Target]:
        repo = self.repository
        entry.config = repo.config(name)
        versions = repo.versions(name)
        if not versions:
            raise ModelLoadError(
                f"model '{name}' has no version folders; put the artifact in {name}/1/"
            )
        targets = []
        for v in versions:
            targets.append(repo.target(name, v))
            targets.extend(repo.target(name, v, var) for var in repo.variants(name, v))
        return targets

    @staticmethod
    def _summarise(entry: ModelEntry) -> tuple[State, str]:
        if entry.default_version() is not None:
            return State.READY, ""
        reasons = [f"{u.target.key}: {u.reason}" for u in entry.units.values() if u.reason]
        return State.UNAVAILABLE, "; ".join(reasons) or "no version loaded"

    async def _load_unit(self, unit: Unit) -> None:
        loop = asyncio.get_running_loop()
        try:
            unit.runtime = await loop.run_in_executor(self._load_executor, self._build, unit)
        except SlimserveError as exc:
            unit.state, unit.reason = State.UNAVAILABLE, exc.message
            log.error("failed to load %s: %s", unit.target.key, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - a broken model must not stop the server
            unit.state, unit.reason = State.UNAVAILABLE, f"{type(exc).__name__}: {exc}"
            log.exception("failed to load %s", unit.target.key)
            return
        batching = unit.target.config.batching
        unit.batcher = Batcher(
            unit.runtime.infer,
            self._infer_executor,
            max_batch_size=batching.max_batch_size,
            max_delay_s=batching.max_queue_delay_ms / 1000.0,
            max_queue=batching.max_queue_size or self.settings.max_queue_size,
        )
        unit.batcher.start()
        unit.state = State.READY
        log.info("loaded %s (%s)", unit.target.key, unit.target.backend)

    def _build(self, unit: Unit) -> Runtime:
        """Blocking: verify the manifest, load and warm up the runtime (load thread)."""
        target = unit.target
        if self.settings.verify_manifests and not verify_manifest(target.path):
            log.info("%s has no MANIFEST.json; hashed at first load and accepted", target.key)
        runtime = self._factory(target, self._options)
        runtime.load()
        try:
            runtime.warmup()
        except Exception:
            runtime.unload()
            raise
        return runtime

    async def unload(self, name: str) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            entry = self.entry(name)
            del self.models[name]
            await self._unload_entry(entry)

    async def _unload_entry(self, entry: ModelEntry) -> None:
        await asyncio.gather(*(self._unload_unit(u) for u in entry.units.values()))

    async def _unload_unit(self, unit: Unit) -> None:
        if unit.state is not State.READY:
            return
        unit.state = State.UNLOADING
        if unit.batcher is not None:
            await unit.batcher.close()  # queued requests finish first
        if unit.runtime is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._load_executor, unit.runtime.unload)
        unit.runtime, unit.batcher = None, None
        unit.state = State.UNAVAILABLE
        unit.reason = "unloaded"
        log.info("unloaded %s", unit.target.key)

    async def close(self) -> None:
        for name in list(self.models):
            await self.unload(name)
