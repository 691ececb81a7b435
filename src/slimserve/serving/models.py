"""Model residency: which versions and variants are loaded, under a memory budget in bytes.

Every model in the repository is known from the start; a unit (a version, or a variant of it)
becomes resident when it is preloaded or on its first request. Concurrent first requests
share one load. To make room, an eviction policy (policies/eviction.py) picks units that are
neither pinned nor serving requests; a unit that cannot fit even alone is refused with the
figures. Loading and unloading run in their own thread pool, so they never block inference.

After each load the heap is frozen (`gc.freeze`): the objects of the frameworks and models
just loaded move out of the cyclic collector's reach. Without it, each full collection walked
every object torch and transformers create and stalled all requests for 0.4-0.6 s under load
(75-180 ms on an idle machine); the serving benchmarks' max latencies of 250-300 ms were these.
That is safe because runtimes free their models by reference counting alone when unloaded
(the runtime contract checks that unloading leaves no cyclic garbage).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum

from slimserve.config import Settings
from slimserve.errors import (
    ModelLoadError,
    NotFound,
    ResourceExhausted,
    SlimserveError,
    Unavailable,
)
from slimserve.policies.eviction import Resident, make_policy
from slimserve.policies.queueing import ServiceModel
from slimserve.repository import hash_tree, verify_manifest
from slimserve.repository.schema import ModelConfig
from slimserve.repository.store import Repository, Target
from slimserve.runtimes import Runtime, RuntimeOptions, create_runtime
from slimserve.serving.batcher import Batcher, BatchStats
from slimserve.serving.threads import InferenceThreads
from slimserve.types import Clock

log = logging.getLogger("slimserve.models")

RuntimeFactory = Callable[[Target, RuntimeOptions], Runtime]
MiB = 1 << 20


class State(str, Enum):
    UNLOADED = "UNLOADED"  # known, not resident: loads on its first request
    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"  # failed to load, or unloaded by the operator


@dataclass(slots=True)
class Unit:
    """One served unit: a version or a variant of it."""

    target: Target
    state: State = State.UNLOADED
    reason: str = ""
    runtime: Runtime | None = None
    batcher: Batcher | None = None
    resident: Resident | None = None
    executor: ThreadPoolExecutor | None = None  # the inference thread its batches run on
    loading: asyncio.Future[None] | None = None
    cold_load_s: float | None = None  # last measured load time (start to warmed up)
    stats: BatchStats = field(default_factory=BatchStats)  # kept across evictions
    # The profile's queueing model (serving/slo.py), and the profile object it was made from.
    service: tuple[object, ServiceModel | None] | None = None


@dataclass(slots=True)
class ModelEntry:
    name: str
    config: ModelConfig | None = None
    state: State = State.UNLOADED
    reason: str = ""
    units: dict[tuple[int, str | None], Unit] = field(default_factory=dict)

    def versions(self) -> list[int]:
        return sorted({v for v, var in self.units if var is None})

    def default_version(self) -> int | None:
        """The highest ready version, else the highest that can still load."""
        if len(self.units) == 1:  # the common case, on every request: one version, no variant
            (((version, variant), unit),) = self.units.items()
            if variant is None and unit.state is State.READY:
                return version
        originals = {v: u for (v, var), u in self.units.items() if var is None}
        for wanted in (State.READY, State.LOADING, State.UNLOADED):
            found = [v for v, u in originals.items() if u.state is wanted]
            if found:
                return max(found)
        return None


def default_budget() -> int:
    """Half of the memory available now (MemAvailable), or of physical memory."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def folder_bytes(target: Target) -> int:
    """Bytes on disk of a unit's files (a variant's own; a version's without its variants)."""
    total = 0
    for dirpath, dirnames, filenames in os.walk(target.path):
        if target.variant is None and os.path.samefile(dirpath, target.path):
            dirnames[:] = [d for d in dirnames if d != "variants"]
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in filenames)
    return total


class ModelManager:
    """Loads, tracks, evicts and unloads the units of a repository's models."""

    def __init__(
        self,
        repository: Repository,
        settings: Settings,
        infer_threads: InferenceThreads,
        load_executor: Executor,
        options: RuntimeOptions,
        runtime_factory: RuntimeFactory | None = None,
        clock: Clock = time.monotonic,
        on_batch: Callable[[Target], Callable[[int, list[float]], None]] | None = None,
    ) -> None:
        self.repository = repository
        self._on_batch = on_batch
        self.settings = settings
        self._infer_threads = infer_threads
        self._load_executor = load_executor
        self._factory = runtime_factory or create_runtime
        self._clock = clock
        self._options = options
        self.budget_bytes = settings.memory_budget_bytes or default_budget() // settings.workers
        self.policy = make_policy(settings.eviction_policy)
        self.used_bytes = 0  # resident sizes plus reservations of loads in progress
        self.loads = 0
        self.evictions = 0
        self.models: dict[str, ModelEntry] = {}
        self._room = asyncio.Lock()  # one make-room decision at a time
        self._locks: dict[str, asyncio.Lock] = {}
        self._watchers: list[Callable[[], None]] = []

    def watch_residency(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop) whenever a unit starts loading, becomes ready,
        fails to load or is unloaded: a Ray replica reports its residency to the router at
        once rather than on a timer (cluster.ray_replica)."""
        self._watchers.append(callback)

    def _residency_changed(self) -> None:
        for callback in self._watchers:
            callback()

    # -- discovery and lookup ----------------------------------------------------------------

    def discover(self, name: str) -> ModelEntry:
        """A fresh entry for `name` from the repository, nothing loaded."""
        entry = ModelEntry(name)
        try:
            entry.config = self.repository.config(name)
            versions = self.repository.versions(name)
            if not versions:
                raise ModelLoadError(
                    f"model '{name}' has no version folders; put the artifact in {name}/1/"
                )
            for v in versions:
                entry.units[(v, None)] = Unit(self.repository.target(name, v))
                for var in self.repository.variants(name, v):
                    entry.units[(v, var)] = Unit(self.repository.target(name, v, var))
        except SlimserveError as exc:
            entry.state, entry.reason = State.UNAVAILABLE, exc.message
            log.error("model %s cannot be served: %s", name, exc.message)
        return entry

    def entry(self, name: str) -> ModelEntry:
        """The model's entry; a model added to the repository since start is discovered."""
        # One stat for an unknown name, not a listing of the repository (names are validated
        # before they get here, so the path stays inside the root).
        if name not in self.models and self.repository.has_model(name):
            self.models[name] = self.discover(name)
        try:
            return self.models[name]
        except KeyError:
            raise NotFound(
                f"model '{name}' is not in the repository; known models: "
                f"{', '.join(sorted(self.models)) or 'none'}"
            ) from None

    def find(self, name: str, version: int | None, variant: str | None) -> Unit:
        entry = self.entry(name)
        if version is None:
            version = entry.default_version()
            if version is None:
                raise Unavailable(
                    f"model '{name}' has no version that can serve ({entry.state.value}"
                    + (f": {entry.reason}" if entry.reason else "")
                    + ")"
                )
        unit = entry.units.get((version, variant))
        if unit is None:
            what = f"version {version}" + (f" variant '{variant}'" if variant else "")
            raise NotFound(f"model '{name}' has no {what}")
        return unit

    # -- serving -------------------------------------------------------------------------------

    async def acquire_unit(self, unit: Unit) -> Unit:
        """`unit` READY (loaded now if needed) and held against eviction; pair with
        `release`."""
        if unit.state is not State.READY:
            await self.ensure_loaded(unit)
        resident = unit.resident
        assert resident is not None
        resident.in_use += 1
        self.policy.touch(resident, self._clock())
        return unit

    @staticmethod
    def release(unit: Unit) -> None:
        if unit.resident is not None:
            unit.resident.in_use -= 1

    async def ensure_loaded(self, unit: Unit, evict: bool = True) -> None:
        """Load `unit` unless it is resident; concurrent callers share one load."""
        while unit.state is not State.READY:
            if unit.loading is not None:
                await asyncio.shield(unit.loading)
                continue
            if unit.state in (State.UNAVAILABLE, State.UNLOADING):
                raise Unavailable(
                    f"{unit.target.key} is {unit.state.value}"
                    + (f": {unit.reason}" if unit.reason else "")
                )
            unit.loading = asyncio.get_running_loop().create_future()
            try:
                await self._load_unit(unit, evict)
            finally:
                unit.loading.set_result(None)
                unit.loading = None

    async def _load_unit(self, unit: Unit, evict: bool) -> None:
        # A model split over P x T worker processes: each process holds about 1/(P x T).
        generation = unit.target.config.generation
        processes = generation.processes if generation is not None else 1
        estimate = max(folder_bytes(unit.target) // processes, 1)
        if estimate > self.budget_bytes:  # can never succeed: 503 without Retry-After
            per = " per process" if processes > 1 else ""
            raise Unavailable(
                f"{unit.target.key} needs about {estimate / MiB:.1f} MiB{per} but the memory "
                f"budget is {self.budget_bytes / MiB:.1f} MiB; raise --memory-budget-bytes, "
                "serve a smaller variant, or split it (model.yaml generation: "
                "pipeline_parallel: 2)"
            )
        async with self._room:
            await self._make_room(estimate, evict)
            self.used_bytes += estimate  # reserved until the real size is known
        unit.state, unit.reason = State.LOADING, ""
        self._residency_changed()
        started = self._clock()
        try:
            loop = asyncio.get_running_loop()
            runtime = await loop.run_in_executor(self._load_executor, self._build, unit.target)
            executor = self._infer_threads.assign(unit.target.key, _thread_cost_ms(unit.target))
            try:  # warmed up on the thread that will run its batches (serving/threads.py)
                await loop.run_in_executor(executor, self._warm, runtime)
            except BaseException:
                self._infer_threads.release(unit.target.key)
                raise
        except Exception as exc:  # noqa: BLE001 - any load failure marks this unit unavailable
            self.used_bytes -= estimate
            unit.state = State.UNAVAILABLE
            unit.reason = exc.message if isinstance(exc, SlimserveError) else _describe(exc)
            log.error("failed to load %s: %s", unit.target.key, unit.reason)
            self._residency_changed()
            raise Unavailable(f"{unit.target.key} failed to load: {unit.reason}") from None
        self._activate(unit, runtime, executor, estimate, self._clock() - started)

    def _activate(
        self,
        unit: Unit,
        runtime: Runtime,
        executor: ThreadPoolExecutor,
        estimate: int,
        load_s: float,
    ) -> None:
        size = _memory_bytes(runtime) or estimate
        self.used_bytes += size - estimate
        unit.resident = Resident(
            unit.target.key,
            size,
            load_cost_s=max(load_s, 1e-3),
            pinned=unit.target.model in self.settings.pin_models,
        )
        self.policy.touch(unit.resident, self._clock())
        batching = unit.target.config.batching
        unit.executor = executor
        unit.batcher = Batcher(
            runtime.infer,
            executor,
            max_batch_size=batching.max_batch_size,
            max_delay_s=batching.max_queue_delay_ms / 1000.0,
            max_queue=batching.max_queue_size or self.settings.max_queue_size,
            stats=unit.stats,
            on_batch=self._on_batch(unit.target) if self._on_batch else None,
            clock=self._clock,
        )
        unit.batcher.start()
        unit.runtime, unit.cold_load_s = runtime, load_s
        unit.state = State.READY
        self.loads += 1
        self._residency_changed()
        log.info(
            "loaded %s (%s) in %.2f s, %.1f MiB; resident %.1f of %.1f MiB",
            unit.target.key,
            unit.target.backend,
            load_s,
            size / MiB,
            self.used_bytes / MiB,
            self.budget_bytes / MiB,
        )

    def _build(self, target: Target) -> Runtime:
        """Blocking, in the load pool: verify the manifest, load, warm up."""
        if self.settings.verify_manifests and not verify_manifest(target.path):
            digests = hash_tree(target.path)
            log.info(
                "%s has no MANIFEST.json; hashed at first load and accepted: %s",
                target.key,
                ", ".join(f"{name} sha256:{digest[:16]}" for name, digest in digests.items()),
            )
        runtime = self._factory(target, self._options)
        runtime.load()
        return runtime

    @staticmethod
    def _warm(runtime: Runtime) -> None:
        try:
            runtime.warmup()
        except Exception:
            runtime.unload()
            raise
        gc.collect(1)  # the young garbage (a few ms), so that freezing keeps none of it
        gc.freeze()  # see the module doc

    def resident_units(self) -> list[Unit]:
        return [u for e in self.models.values() for u in e.units.values() if u.state is State.READY]

    async def _make_room(self, need: int, evict: bool) -> None:
        short = self.used_bytes + need - self.budget_bytes
        if short <= 0:
            return
        units = {u.resident.key: u for u in self.resident_units() if u.resident is not None}
        held = [u.resident for u in units.values() if u.resident is not None]
        victims = self.policy.victims(held, short) if evict else None
        if victims is None:
            raise ResourceExhausted(
                f"no room for {need / MiB:.1f} MiB: {self.used_bytes / MiB:.1f} of "
                f"{self.budget_bytes / MiB:.1f} MiB are held by models that are pinned, "
                "serving requests or loading; retry shortly or raise --memory-budget-bytes",
                retry_after_s=1,
            )
        for victim in victims:
            self.evictions += 1
            log.info("evicting %s to make room (%s)", victim.key, self.policy.name)
            await self._unload_unit(units[victim.key], State.UNLOADED, "evicted")

    # -- explicit control ----------------------------------------------------------------------

    async def register_all(self) -> None:
        for name in self.repository.model_names():
            if name not in self.models:
                self.models[name] = self.discover(name)

    async def preload(self, names: list[str]) -> None:
        """Load the given models' units while they fit, without evicting anything. A name
        may also be one unit's key (NAME/VERSION or NAME/VERSION:VARIANT): only that unit."""
        for name in names:
            model, _, unit_key = name.partition("/")
            entry = self.models.get(model)
            if entry is None:
                continue
            ordered = sorted(entry.units.values(), key=_preload_order)
            if unit_key:
                ordered = [u for u in ordered if u.target.key == name]
                if not ordered:
                    log.error("startup unit %s is not in the repository", name)
            for unit in ordered:
                try:
                    await self.ensure_loaded(unit, evict=False)
                except ResourceExhausted as exc:
                    log.warning("not preloading %s: %s", unit.target.key, exc.message)
                except SlimserveError:
                    pass  # recorded on the unit and logged
            entry.state, entry.reason = _summarise(entry)

    async def load(self, name: str) -> ModelEntry:
        """(Re)load a model from the repository: all its units, then swap out the old ones."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            old = self.models.get(name)
            entry = self.discover(name)
            if old is None or not any(u.state is State.READY for u in old.units.values()):
                self.models[name] = entry  # nothing serving: requests join this load
            for unit in sorted(entry.units.values(), key=_preload_order):
                with contextlib.suppress(SlimserveError):  # recorded on the unit, logged
                    await self.ensure_loaded(unit)
            entry.state, entry.reason = _summarise(entry)
            self.models[name] = entry
            if old is not None and old is not entry:
                await self._unload_entry(old, State.UNAVAILABLE, "replaced by a reload")
            return entry

    async def unload(self, name: str) -> None:
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self.entry(name)
            await self._unload_entry(entry, State.UNAVAILABLE, "unloaded")
            entry.state, entry.reason = State.UNAVAILABLE, "unloaded"

    async def _unload_entry(self, entry: ModelEntry, state: State, reason: str) -> None:
        await asyncio.gather(*(self._unload_unit(u, state, reason) for u in entry.units.values()))

    async def _unload_unit(self, unit: Unit, state: State, reason: str) -> None:
        if unit.state is not State.READY:
            if unit.state in (State.UNLOADED, State.UNAVAILABLE) and state is State.UNAVAILABLE:
                unit.state, unit.reason = state, reason
            return
        unit.state = State.UNLOADING
        self._residency_changed()
        if unit.batcher is not None:
            await unit.batcher.close()  # queued requests finish first
        if unit.runtime is not None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._load_executor, unit.runtime.unload)
        if unit.resident is not None:
            self.used_bytes -= unit.resident.size_bytes
        if unit.executor is not None:
            self._infer_threads.release(unit.target.key)
        unit.runtime, unit.batcher, unit.resident, unit.executor = None, None, None, None
        unit.state, unit.reason = state, reason
        self._residency_changed()
        log.info("unloaded %s (%s)", unit.target.key, reason)

    async def close(self) -> None:
        """Unload every unit, then stop the thread pools it was given (it owns them)."""
        for entry in list(self.models.values()):
            await self._unload_entry(entry, State.UNAVAILABLE, "server stopping")
        self._infer_threads.shutdown(wait=False, cancel_futures=True)
        self._load_executor.shutdown(wait=False, cancel_futures=True)


def _preload_order(unit: Unit) -> tuple[int, int, str]:
    # Highest version first, the original before its variants.
    return (-unit.target.version, unit.target.variant is not None, unit.target.variant or "")


def _summarise(entry: ModelEntry) -> tuple[State, str]:
    states = [u.state for (v, var), u in entry.units.items() if var is None]
    if State.READY in states:
        return State.READY, ""
    if State.UNLOADED in states:
        return State.UNLOADED, "loads on its first request"
    reasons = [f"{u.target.key}: {u.reason}" for u in entry.units.values() if u.reason]
    return State.UNAVAILABLE, "; ".join(reasons) or "no version loaded"


def _memory_bytes(runtime: Runtime) -> int:
    try:
        return max(int(runtime.memory_bytes()), 0)
    except Exception:  # noqa: BLE001 - an estimate is optional
        return 0


def _describe(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}"


def _thread_cost_ms(target: Target) -> float | None:
    """How long the unit holds its inference thread per batch: its profiled batch-1 latency
    (serving/threads.py balances these); None without a profile."""
    profile = target.profile
    curve = profile.latency_curve() if profile is not None else ()
    return curve[0][1] if curve else None
