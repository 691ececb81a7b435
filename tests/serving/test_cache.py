"""The response cache: one contract for every backend, then keys, single flight, engine."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from slimserve.serving.cache import (
    MemoryCache,
    RedisCache,
    ResponseCache,
    cache_key,
    decode,
    encode,
)
from slimserve.testing import FakeClock
from tests.redis_server import redis_server


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


def out(value: float) -> dict[str, np.ndarray]:
    return {
        "y": np.full((2, 3), value, np.float32),
        "label": np.array([b"cat", "d\u00f6g".encode()], dtype=object),
    }


def _same(a, b) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype
        assert a[k].tolist() == b[k].tolist()


@pytest.fixture(params=["memory-lru", "memory-lfu", "redis"])
def backend(request):
    if request.param == "redis":
        namespace = request.node.name
        return RedisCache(request.getfixturevalue("redis_url"), namespace, ttl_s=60)
    return MemoryCache(1 << 20, request.param.split("-")[1])


class TestContract:
    def test_miss_then_hit_round_trips_exactly(self, backend):
        async def main():
            assert await backend.get("k") is None
            await backend.set("k", out(1.5))
            got = await backend.get("k")
            await backend.close()
            return got

        _same(asyncio.run(main()), out(1.5))

    def test_keys_are_independent(self, backend):
        async def main():
            await backend.set("a", out(1))
            await backend.set("b", out(2))
            got = await backend.get("a"), await backend.get("b")
            await backend.close()
            return got

        a, b = asyncio.run(main())
        assert a["y"][0, 0] == 1 and b["y"][0, 0] == 2


def test_memory_cache_is_bounded_in_bytes_and_evicts_lru():
    one = MemoryCache(10_000)

    async def main():
        for i in range(10):
            await one.set(str(i), {"y": np.zeros(250, np.float32)})  # ~1 KB each
            assert one.current_bytes <= 10_000
        return [await one.get(str(i)) is not None for i in range(10)]

    present = asyncio.run(main())
    assert present[-1] and not present[0]


def test_memory_cache_ttl_expires_with_the_timer():
    clock = FakeClock(0.0)
    cache = MemoryCache(1 << 20, ttl_s=5, timer=clock)

    async def main():
        await cache.set("k", out(1))
        clock.now = 4.9
        fresh = await cache.get("k")
        clock.now = 5.0
        return fresh, await cache.get("k")

    fresh, stale = asyncio.run(main())
    assert fresh is not None and stale is None


def test_single_flight_computes_a_miss_once():
    calls = {"n": 0}
    cache = ResponseCache(MemoryCache(1 << 20))

    async def compute():
        calls["n"] += 1
        await asyncio.sleep(0.01)
        return out(7)

    async def main():
        return await asyncio.gather(*(cache.get_or_compute("k", compute) for _ in range(10)))

    results = asyncio.run(main())
    assert calls["n"] == 1 and cache.misses == 1 and cache.hits == 9
    assert all(r["y"][0, 0] == 7 for r in results)


def test_a_failed_computation_is_not_cached_and_reaches_every_waiter():
    cache = ResponseCache(MemoryCache(1 << 20))

    async def boom():
        await asyncio.sleep(0.01)
        raise ValueError("model failed")

    async def main():
        results = await asyncio.gather(
            *(cache.get_or_compute("k", boom) for _ in range(3)), return_exceptions=True
        )
        return results, await cache.backend.get("k")

    results, stored = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in results) and stored is None


def test_keys_depend_on_inputs_unit_and_relevant_parameters_only():
    x = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    base = cache_key("m/1", x, {})
    assert base == cache_key("m/1", {"x": x["x"].copy()}, {"binary_data_output": True})
    assert base != cache_key("m/2", x, {})
    assert base != cache_key("m/1", {"x": x["x"] + 1}, {})
    assert base != cache_key("m/1", {"x": x["x"].reshape(3, 2)}, {})
    assert base != cache_key("m/1", {"x": x["x"].astype(np.float64)}, {})
    assert base != cache_key("m/1", x, {"temperature": 0.5})


def test_encoding_has_no_pickle_and_round_trips():
    data = encode(out(3))
    assert b"pickle" not in data and not data.startswith(b"\x80")
    _same(decode(data), out(3))


def test_two_caches_share_entries_through_redis(redis_url):
    async def main():
        a = RedisCache(redis_url, "shared", ttl_s=30)
        b = RedisCache(redis_url, "shared", ttl_s=30)
        await a.set("k", out(9))
        got = await b.get("k")
        await a.close()
        await b.close()
        return got

    assert asyncio.run(main())["y"][0, 0] == 9
