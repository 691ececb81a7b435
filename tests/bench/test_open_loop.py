"""The open loop of `slimserve bench --rate` and request parameters in every encoding."""

from __future__ import annotations

import asyncio
import gc

import numpy as np
import orjson

from slimserve.bench import payload as pl
from slimserve.bench.command import _parameter
from slimserve.bench.profile import open_seconds
from slimserve.bench.runner import closed_loop, open_loop


def test_open_loop_sends_the_poisson_schedule_over_few_connections():
    in_flight, peak = 0, 0

    def sender():
        async def send() -> str:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.002)
            in_flight -= 1
            return "ok"

        return send

    rec, _ = asyncio.run(open_loop([sender(), sender()], 400.0, 0.25, 0.05, seed=3))
    # The same seed's arrivals inside the window [0.05 s, 0.30 s]: all answered, each once.
    gaps = np.random.default_rng(3).exponential(1 / 400.0, size=1000).cumsum()
    expected = int(((gaps >= 0.05) & (gaps < 0.30)).sum())
    assert len(rec.latencies_ns) == expected and not rec.errors
    assert peak <= 2  # never more requests in flight than connections


def test_parameters_travel_in_json_binary_and_grpc():
    key, value = _parameter("latency_slo_ms=2.5")
    assert (key, value) == ("latency_slo_ms", 2.5)
    assert _parameter("max_quality_loss=1") == ("max_quality_loss", 1)
    tensor = pl.Tensor("input", "FP32", np.zeros((1, 4), np.float32))
    p = pl.Payload((tensor,), (), (("latency_slo_ms", 2.5), ("degrade", True)))
    assert orjson.loads(pl.json_body(p))["parameters"] == {"latency_slo_ms": 2.5, "degrade": True}
    body, head = pl.binary_body(p)
    params = orjson.loads(body[:head])["parameters"]
    assert params == {"binary_data_output": True, "latency_slo_ms": 2.5, "degrade": True}
    message = pl.grpc_messages().ModelInferRequest.FromString(pl.grpc_request(p, "m"))
    assert message.parameters["latency_slo_ms"].double_param == 2.5
    assert message.parameters["degrade"].bool_param is True


def test_profile_open_loop_points_run_long_enough_for_a_p99_within_a_bound():
    assert open_seconds(1.0, 2000.0) == 1.0  # 2,000 arrivals already
    assert open_seconds(1.0, 250.0) == 4.0  # 1,000 arrivals take 4 s
    assert open_seconds(1.0, 10.0) == 5.0  # 100 s would be needed; at most 5x the duration


def test_the_load_generator_runs_without_collector_pauses_and_restores_the_collector():
    seen = []

    async def send() -> str:
        seen.append(gc.isenabled())
        return "ok"

    assert gc.isenabled()
    rec, _ = asyncio.run(closed_loop([send], 0.05, 0.0))
    assert rec.latencies_ns and seen and not any(seen)  # off while it measured
    assert gc.isenabled() and gc.get_freeze_count() == 0  # as it was, nothing left frozen
    gc.disable()
    try:
        asyncio.run(open_loop([send], 200.0, 0.05, 0.0))
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()
