"""What the web console's live view costs the server: GET /ui/api/live (read the engine's
Prometheus registry into per-unit counters and histogram buckets, encode as JSON) against
GET /metrics (the same registry as Prometheus text), in process over httpx.ASGITransport.

    python benchmarks/console_live.py --models 10 --variants 2 --calls 300

Each model is a toy echo runtime (python backend) with `--variants` variants; every unit
serves a few requests first, so each has latency, queue and batch-size series.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from slimserve.app import build_engine
from slimserve.config import Settings
from slimserve.testing import ECHO_ROW, echo_model
from slimserve.transport.asgi import create_app


def build(root: Path, models: int, variants: int) -> list[str]:
    served = []
    for m in range(models):
        echo_model(root, f"m{m}", {f"v{v}": 0.995 for v in range(variants)})
        served += [f"m{m}", *(f"m{m}:v{v}" for v in range(variants))]
    return served


async def timed(client: httpx.AsyncClient, path: str, calls: int) -> tuple[float, float, int]:
    """Median wall milliseconds per GET, CPU milliseconds per GET (this process's CPU time:
    on a shared, loaded machine wall times of long calls grow with preemption), body bytes."""
    times, size = [], 0
    cpu = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        response = await client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        size = len(response.content)
    cpu_ms = (time.process_time() - cpu) * 1000 / calls
    return statistics.median(times), cpu_ms, size


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "models"
        served = build(root, args.models, args.variants)
        settings = Settings(repository=root)
        engine = build_engine(settings)
        await engine.start(wait=True)
        transport = httpx.ASGITransport(app=create_app(engine, settings))
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                for name in served:
                    for _ in range(5):
                        await client.post(f"/v2/models/{name}/infer", json=ECHO_ROW)
                await timed(client, "/ui/api/live", 20)  # warm-up
                print(f"units: {len(served)}; load average {os.getloadavg()[0]:.1f}")
                for path in ("/ui/api/live", "/metrics", "/ui/api/models"):
                    ms, cpu_ms, size = await timed(client, path, args.calls)
                    print(
                        f"GET {path:<15} median {ms:6.2f} ms wall, {cpu_ms:6.2f} ms CPU "
                        f"per call, {size / 1024:6.1f} KiB"
                    )
        finally:
            await engine.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=10)
    parser.add_argument("--variants", type=int, default=2)
    parser.add_argument("--calls", type=int, default=300)
    asyncio.run(main(parser.parse_args()))
