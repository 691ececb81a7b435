"""What the engine says about its models: metadata, serving settings, statistics, the
repository index and health, as the typed results of slimserve.types (the codecs turn them
into JSON or protobuf). Pure reads of the residency table and admission state.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from slimserve.errors import InvalidArgument, NotFound, SlimserveError
from slimserve.repository.store import Repository, split_served_name
from slimserve.serving.admission import Admission
from slimserve.serving.models import ModelEntry, ModelManager, State, Unit
from slimserve.types import (
    BatchStatistics,
    Duration,
    HealthReport,
    ModelMetadata,
    ModelSettings,
    ModelStatistics,
    RepositoryEntry,
)

PLATFORMS = {
    "onnx": "onnxruntime_onnx",
    "torch": "pytorch_torch",
    "transformers": "transformers",
    "python": "python",
}
Public = Callable[[str], str]  # a message made fit for clients


def hide_path(root: Path) -> Public:
    """Messages for clients: the repository's location on disk is not theirs to know (the
    server log keeps full paths for operators)."""
    shown = str(root)

    def public(text: str) -> str:
        return text.replace(shown, "<repository>") if text else text

    return public


def parse_version(version: str | int | None) -> int | None:
    """'' / None -> None (the default version); '3' -> 3; anything else is an error."""
    if version is None or version == "":
        return None
    text = str(version)
    if not text.isdigit() or int(text) <= 0 or len(text) > 9:
        raise InvalidArgument(f"model version {text[:32]!r} is not a positive integer")
    return int(text)


class Catalog:
    """Answers the describing questions of the v2 protocol from the residency table."""

    def __init__(
        self, repository: Repository, models: ModelManager, admission: Admission, public: Public
    ) -> None:
        self.repository, self.models, self.admission = repository, models, admission
        self.public = public

    def resolve(
        self, served: str, version: str | None
    ) -> tuple[ModelEntry, int | None, str | None]:
        name, variant = split_served_name(served)
        return self.models.entry(name), parse_version(version), variant

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

    def metadata(self, name: str, version: str | None = None) -> ModelMetadata:
        entry, v, variant = self.resolve(name, version)
        unit = self._describe_unit(entry, v, variant)
        config = unit.target.config if unit is not None else entry.config
        variants: tuple[str, ...] = ()
        if unit is not None and unit.target.variant is None:
            version_of = unit.target.version
            variants = tuple(sorted(var for (ver, var) in entry.units if ver == version_of and var))
        return ModelMetadata(
            name=name,
            versions=tuple(str(x) for x in entry.versions()),
            platform=PLATFORMS.get(unit.target.backend if unit else "", ""),
            inputs=tuple(config.input_specs()) if config else (),
            outputs=tuple(config.output_specs()) if config else (),
            state=(unit.state if unit else entry.state).value,
            reason=self.public(unit.reason if unit else entry.reason),
            variants=variants,
        )

    def ready(self, name: str, version: str | None = None) -> bool:
        entry, v, variant = self.resolve(name, version)
        try:
            unit = self.models.find(entry.name, v, variant)
        except NotFound:
            if v is None and variant is None:
                return False
            raise
        except SlimserveError:
            return False
        return unit.state is State.READY

    def settings(self, name: str, version: str | None = None) -> ModelSettings:
        entry, v, variant = self.resolve(name, version)
        unit = self._describe_unit(entry, v, variant)
        config = unit.target.config if unit else entry.config
        if config is None:
            raise NotFound(f"model '{name}' has no readable model.yaml: {entry.reason}")
        backend = unit.target.backend if unit else config.backend
        return ModelSettings(
            name=name,
            platform=PLATFORMS.get(backend, backend),
            backend=backend,
            max_batch_size=config.batching.max_batch_size,
            inputs=tuple(config.input_specs()),
            outputs=tuple(config.output_specs()),
            batched=config.batched,
            max_queue_delay_us=int(config.batching.max_queue_delay_ms * 1000),
        )

    def statistics(
        self, name: str | None = None, version: str | None = None
    ) -> list[ModelStatistics]:
        if name:
            entry, v, variant = self.resolve(name, version)
            units = [
                u
                for (ver, var), u in entry.units.items()
                if var == variant and (v is None or ver == v)
            ]
        else:
            units = self._all_units()
        return [unit_statistics(u) for u in units]

    def index(self, ready_only: bool = False) -> list[RepositoryEntry]:
        rows: list[RepositoryEntry] = []
        for name in self.repository.model_names():
            entry = self.models.models.get(name)
            if entry is None:
                if not ready_only:
                    rows.append(RepositoryEntry(name, "", "UNLOADED", "new"))
                continue
            for (ver, var), unit in sorted(
                entry.units.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")
            ):
                if ready_only and unit.state is not State.READY:
                    continue
                served = name if var is None else f"{name}:{var}"
                rows.append(
                    RepositoryEntry(served, str(ver), unit.state.value, self.public(unit.reason))
                )
            if not entry.units and not ready_only:
                rows.append(RepositoryEntry(name, "", entry.state.value, self.public(entry.reason)))
        return rows

    def health(self, live: bool, ready: bool) -> HealthReport:
        units = self._all_units()
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
        if not ready:
            status = "starting" if live else "stopping"
        return HealthReport(
            status=status,
            live=live,
            ready=ready,
            breakers_open=tuple(open_breakers),
            failed_units=tuple(failed),
            degraded_models=tuple(degraded),
            resident_bytes=self.models.used_bytes,
            memory_budget_bytes=self.models.budget_bytes,
        )

    def _all_units(self) -> list[Unit]:
        return [u for e in self.models.models.values() for u in e.units.values()]


def unit_statistics(unit: Unit) -> ModelStatistics:
    s, t = unit.stats, unit.target
    return ModelStatistics(
        name=t.model if t.variant is None else f"{t.model}:{t.variant}",
        version=str(t.version),
        last_inference_ms=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        success=Duration(s.success_count, s.success_ns),
        fail=Duration(s.fail_count, s.fail_ns),
        queue=Duration(s.success_count, s.queue_ns),
        compute=Duration(s.execution_count, s.compute_ns),
        batches=tuple(
            BatchStatistics(size, Duration(c, ns))
            for size, (c, ns) in sorted(s.batch_sizes.items())
        ),
    )
