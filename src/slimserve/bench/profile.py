"""`slimserve profile`: measure one model or variant the way Triton's Model Analyzer does.

A sweep over the batching configuration (max_batch_size x max_queue_delay_ms) and, for each,
the client concurrency. Every configuration runs in a real `slimserve serve` process on a
private copy of the model (hard links, so no bytes are copied) whose model.yaml carries that
batching; `slimserve bench`'s closed loop drives it over HTTP (binary tensors). Recorded per
point: throughput, p50, p99, errors; per unit: resident memory (the runtime's own count), the
server's peak RSS, the median batch latency by batch size timed in this process (what the
per-request objective predicts from, policies/slo.py; the same measure `slimserve optimize`
writes for variants) and the mean batch time the server saw (its statistics API).

Then, per configuration, the serving path under the traffic a plan serves: an open loop
(Poisson arrivals over `connections` connections, `slimserve bench --rate`) at a few shares of
the best closed-loop throughput, recorded as `open_loop` points (offered rate, p50, p99). A
closed loop of N clients never sends a burst and keeps the server hot; an open loop does both,
and at high rates of a cheap model the server's own per-request work, not the model, decides
the p99. `slimserve plan` fits its serving-path term on these (policies/queueing.py).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import numpy as np
import orjson

from slimserve.bench import payload as pl
from slimserve.bench.drivers import HttpDriver, fetch_metadata, model_path
from slimserve.bench.http_client import build_request, connect
from slimserve.bench.local_server import LocalServer, local_server
from slimserve.bench.runner import Result, closed_loop, new_loop, open_loop, summarize
from slimserve.errors import InvalidArgument
from slimserve.repository.schema import BatchingConfig, ModelConfig, dump_model_config
from slimserve.repository.store import MODEL_YAML, VARIANTS_DIR, Repository, Target
from slimserve.runtimes import RuntimeOptions, create_runtime

# One thread inside each model call, in the sweep's servers and in the in-process timing
# alike: the figures then say what one call costs, whatever else shares the cores.
INTRA_OP_THREADS = 1
_OPEN_ARRIVALS, _OPEN_STRETCH = 1000, 5.0


@dataclass(frozen=True, slots=True)
class Grid:
    """What to sweep, and how long each point runs (seconds)."""

    concurrency: tuple[int, ...] = (1, 8, 32)
    max_batch_size: tuple[int, ...] = (8, 32)
    queue_delay_ms: tuple[float, ...] = (0.0, 2.0)
    duration_s: float = 1.0
    warmup_s: float = 0.3
    open_loop_shares: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)  # of the best throughput
    connections: int = 32  # the open loop's (as `slimserve bench --rate` uses by default)

    def configs(self, model: ModelConfig) -> list[tuple[int, float]]:
        """(max_batch_size, max_queue_delay_ms) pairs; a model without a batch dimension
        has one: (0, 0)."""
        if not model.batched:
            return [(0, 0.0)]
        return list(itertools.product(self.max_batch_size, self.queue_delay_ms))

    def points(self, model: ModelConfig) -> int:
        per_config = len(self.concurrency) + len(self.open_loop_shares)
        return len(self.configs(model)) * per_config


@dataclass(frozen=True, slots=True)
class Point:
    concurrency: int
    max_batch_size: int
    max_queue_delay_ms: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    errors: int


@dataclass(frozen=True, slots=True)
class OpenPoint(Point):
    """An open-loop point: Poisson arrivals at `rate_rps` over `concurrency` connections."""

    rate_rps: float
    sender_late_p99_ms: float  # the load generator's own lateness (no server in it)
    requests: int = 0  # answered in its window: how sure its p99 is


@dataclass
class Sweep:
    target: str  # NAME/VERSION[:VARIANT]
    points: list[Point] = field(default_factory=list)
    open_points: list[OpenPoint] = field(default_factory=list)
    batch_ms: dict[int, float] = field(default_factory=dict)  # in-process medians, by rows
    served_batch_ms: dict[int, float] = field(default_factory=dict)  # the server's means
    memory_bytes: int | None = None
    peak_rss_bytes: int | None = None

    def profile_fields(self, grid: Grid) -> dict[str, Any]:
        """What goes into the profile the server reads (variant.yaml / profile.yaml)."""
        ok = [p for p in self.points if p.errors == 0 and p.throughput_rps > 0]
        fields: dict[str, Any] = {
            "sweep": [_rounded(asdict(p)) for p in self.points],
            "open_loop": [_rounded(asdict(p)) for p in self.open_points],
            "sweep_settings": {
                "duration_s": grid.duration_s,
                "warmup_s": grid.warmup_s,
                "open_loop_connections": grid.connections,
                "protocol": "http-binary",
                "measured": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "cpu_count": os.cpu_count(),
                "intra_op_threads": INTRA_OP_THREADS,
                "load_average": round(os.getloadavg()[0], 2),
            },
        }
        if self.batch_ms:
            by_batch = {str(k): round(v, 4) for k, v in sorted(self.batch_ms.items())}
            fields["latency_ms_by_batch"] = by_batch
            if 1 in self.batch_ms:
                fields["latency_ms_batch1"] = round(self.batch_ms[1], 4)
        if self.served_batch_ms:
            served = {str(k): round(v, 4) for k, v in sorted(self.served_batch_ms.items())}
            fields["served_latency_ms_by_batch"] = served
        if ok:
            best = max(ok, key=lambda p: p.throughput_rps)
            fields["served_throughput_rps"] = round(best.throughput_rps, 2)
        if self.memory_bytes:
            fields["memory_bytes"] = self.memory_bytes
        if self.peak_rss_bytes:
            fields["server_peak_rss_bytes"] = self.peak_rss_bytes
        return fields


def _rounded(values: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}


def _link_tree(source: Path, dest: Path, skip_variants: bool) -> None:
    """Hard-link (copy where links fail) a unit folder; the original's without `variants/`."""

    def ignore(folder: str, names: list[str]) -> list[str]:
        top = Path(folder) == source
        return [VARIANTS_DIR] if skip_variants and top and VARIANTS_DIR in names else []

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, dest, ignore=ignore, copy_function=link)


@contextmanager
def private_repository(target: Target, batching: BatchingConfig) -> Iterator[Path]:
    """A repository holding only the target's model (its original, and the variant when the
    target is one) with model.yaml's batching replaced."""
    with TemporaryDirectory(prefix="slimserve-profile-") as tmp:
        root = Path(tmp) / "models"
        model_dir = root / target.model
        version_dir = model_dir / str(target.version)
        config = target.config.model_copy(update={"batching": batching})
        model_dir.mkdir(parents=True)
        (model_dir / MODEL_YAML).write_text(dump_model_config(config))
        original = target.path if target.variant is None else target.path.parent.parent
        _link_tree(original, version_dir, skip_variants=True)
        if target.variant is not None:
            _link_tree(target.path, version_dir / VARIANTS_DIR / target.variant, False)
        yield root


async def _batch_stats(server: LocalServer, served: str, version: int) -> dict[int, list[int]]:
    """{batch rows: [count, ns]} from the server's statistics API."""
    host, port = "127.0.0.1", server.http_port
    conn = await connect(host, port, keep_body=True)
    try:
        path = model_path(served, str(version)) + "/stats"
        status, body = await conn.request(build_request("GET", host, port, path))
    finally:
        conn.close()
    if status != 200:
        return {}
    out: dict[int, list[int]] = {}
    for stats in orjson.loads(body).get("model_stats", []):
        for row in stats.get("batch_stats", []):
            infer = row["compute_infer"]
            out[int(row["batch_size"])] = [int(infer["count"]), int(infer["ns"])]
    return out


def open_seconds(duration_s: float, rate_rps: float) -> float:
    """An open-loop point's window: long enough for _OPEN_ARRIVALS expected arrivals (a p99
    needs samples: of 1,000, ten lie above it; a low rate sends few), at most _OPEN_STRETCH x
    the sweep's duration."""
    return min(max(duration_s, _OPEN_ARRIVALS / rate_rps), duration_s * _OPEN_STRETCH)


async def _measure_config(
    server: LocalServer,
    target: Target,
    batching: BatchingConfig,
    grid: Grid,
    step: Callable[[], None],
) -> tuple[list[Point], list[OpenPoint], dict[int, list[int]]]:
    served = target.model if target.variant is None else f"{target.model}:{target.variant}"
    version = str(target.version)
    meta = await fetch_metadata("127.0.0.1", server.http_port, served, version)
    payload = pl.from_metadata(meta, batch_size=1)
    size, delay = batching.max_batch_size, batching.max_queue_delay_ms

    async def run(clients: int, rate: float | None) -> Result:
        driver = HttpDriver("http-binary", "127.0.0.1", server.http_port, served, version, payload)
        seconds = grid.duration_s
        try:
            sends = await driver.senders(clients)
            if rate is None:
                rec, cpu = await closed_loop(sends, seconds, grid.warmup_s)
            else:
                seconds = open_seconds(grid.duration_s, rate)
                rec, cpu = await open_loop(sends, rate, seconds, grid.warmup_s)
        finally:
            await driver.close()
        step()
        return summarize("http-binary", clients, seconds, rec, cpu)

    points = []
    for n in grid.concurrency:
        r = await run(n, None)
        errors = sum(r.errors.values())
        points.append(Point(n, size, delay, r.rps, r.p50_ms, r.p99_ms, errors))
    best = max((p.throughput_rps for p in points if not p.errors), default=0.0)
    opened = []
    for share in grid.open_loop_shares if best > 0 else ():
        rate = round(best * share, 1)
        r = await run(grid.connections, rate)
        opened.append(
            OpenPoint(
                grid.connections,
                size,
                delay,
                r.rps,
                r.p50_ms,
                r.p99_ms,
                sum(r.errors.values()),
                rate,
                r.late_p99_ms,
                r.requests,
            )
        )
    return points, opened, await _batch_stats(server, served, target.version)


def sweep(
    repository: Path,
    name: str,
    version: int | None,
    variant: str | None,
    grid: Grid,
    step: Callable[[], None] = lambda: None,
) -> Sweep:
    """Run the whole grid against real servers; `step` is called after each point."""
    repo = Repository(repository)
    versions = repo.versions(name)
    if not versions:
        raise InvalidArgument(f"model '{name}' has no version folder to profile")
    version = version or versions[-1]
    target = repo.target(name, version, variant)
    result = Sweep(target.key)
    totals: dict[int, list[int]] = {}
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for size, delay in grid.configs(target.config):
        batching = target.config.batching.model_copy(
            update={"max_batch_size": size, "max_queue_delay_ms": delay}
        )
        with (
            private_repository(target, batching) as root,
            local_server(
                root, "--load-models", name, "--intra-op-threads", str(INTRA_OP_THREADS), env=env
            ) as server,
        ):
            # uvloop, as `slimserve bench` runs: the open-loop figures are what a plan is
            # checked against with it
            loop = new_loop()
            try:
                measure = _measure_config(server, target, batching, grid, step)
                points, opened, stats = loop.run_until_complete(measure)
            finally:
                loop.close()
            rss = server.peak_rss_bytes()
        result.points.extend(points)
        result.open_points.extend(opened)
        result.peak_rss_bytes = max(result.peak_rss_bytes or 0, rss or 0) or None
        for rows, (count, ns) in stats.items():
            entry = totals.setdefault(rows, [0, 0])
            entry[0] += count
            entry[1] += ns
    result.served_batch_ms = {
        rows: ns / count / 1e6 for rows, (count, ns) in totals.items() if count
    }
    result.memory_bytes, result.batch_ms = measure_in_process(
        target, max(grid.max_batch_size, default=1)
    )
    return result


def measure_in_process(
    target: Target, max_batch: int, min_time_s: float = 0.2
) -> tuple[int | None, dict[int, float]]:
    """The unit's resident memory (its runtime's `memory_bytes`, as the server counts it) and
    its median latency (ms) per batch size 1, 2, 4, ... max_batch, timed in this process on one
    intra-op thread (optimize times variants the same way): medians, so that a neighbour's
    burst on a shared machine does not move them (the server's batch times are kept beside)."""
    runtime = create_runtime(target, RuntimeOptions(intra_op_threads=INTRA_OP_THREADS))
    runtime.load()
    try:
        meta = {"inputs": [spec.to_dict() for spec in target.config.input_specs()]}
        sizes = [1]
        while sizes[-1] * 2 <= max(1, max_batch):
            sizes.append(sizes[-1] * 2)
        latency = {}
        for size in sizes if target.config.batched else [1]:
            payload = pl.from_metadata(meta, batch_size=size)
            inputs = {t.name: t.array for t in payload.inputs}
            runtime.infer(inputs)  # warm
            times: list[float] = []
            start = time.perf_counter()
            while len(times) < 5 or (time.perf_counter() - start < min_time_s and len(times) < 500):
                t0 = time.perf_counter()
                runtime.infer(inputs)
                times.append((time.perf_counter() - t0) * 1e3)
            latency[size] = float(np.median(times))
        return int(runtime.memory_bytes()) or None, latency
    finally:
        runtime.unload()
