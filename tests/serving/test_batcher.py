"""The dynamic batcher: exact row routing, limits, failures, deadlines."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from slimserve.errors import DeadlineExceeded, InvalidArgument, SlimserveError, Unavailable
from slimserve.serving.batcher import Batcher
from slimserve.testing import FakeClock


def _double(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = inputs["x"]
    return {"y": x * 2.0, "rowsum": x.sum(axis=1)}


@pytest.fixture
def pool():
    with ThreadPoolExecutor(2) as executor:
        yield executor


def _batcher(pool, infer=_double, **kw) -> Batcher:
    opts = {"max_batch_size": 16, "max_delay_s": 0.005, "max_queue": 10_000} | kw
    return Batcher(infer, pool, **opts)


async def _with(batcher: Batcher, coro):
    batcher.start()
    try:
        return await coro
    finally:
        await batcher.close()


def test_each_of_hundreds_of_concurrent_requests_gets_its_own_rows(pool):
    sizes: list[int] = []

    def infer(inputs):
        sizes.append(inputs["x"].shape[0])
        time.sleep(0.001)  # let requests pile up behind a running batch
        return _double(inputs)

    async def main():
        b = _batcher(pool, infer)
        rng = np.random.default_rng(0)
        requests = [rng.random((1 + i % 3, 4), dtype=np.float32) + i for i in range(400)]
        results = await _with(b, asyncio.gather(*(b.submit({"x": r}, len(r)) for r in requests)))
        return requests, results

    requests, results = asyncio.run(main())
    for x, out in zip(requests, results, strict=True):
        np.testing.assert_array_equal(out["y"], x * 2.0)
        np.testing.assert_allclose(out["rowsum"], x.sum(axis=1), rtol=1e-6)
    assert max(sizes) > 1, "concurrent requests should have been batched"
    assert max(sizes) <= 16
    assert sum(sizes) == sum(len(r) for r in requests)


def test_lone_request_does_not_wait_for_the_full_delay(pool):
    async def main():
        b = _batcher(pool, max_delay_s=5.0)
        start = time.monotonic()
        out = await _with(b, b.submit({"x": np.ones((1, 2), np.float32)}, 1))
        return out, time.monotonic() - start

    out, elapsed = asyncio.run(main())
    np.testing.assert_array_equal(out["y"], [[2.0, 2.0]])
    assert elapsed < 5.0  # dispatched when the queue went quiet, not after the delay


def test_request_larger_than_max_batch_size_is_refused(pool):
    async def main():
        b = _batcher(pool, max_batch_size=4)
        return await _with(b, b.submit({"x": np.ones((5, 2), np.float32)}, 5))

    with pytest.raises(InvalidArgument, match="max_batch_size is 4"):
        asyncio.run(main())


def test_full_queue_answers_unavailable_with_retry_after(pool):
    gate = threading.Event()

    def blocked(inputs):
        gate.wait(5)
        return _double(inputs)

    async def main():
        b = _batcher(pool, blocked, max_queue=2, max_batch_size=1)
        b.start()
        x = {"x": np.ones((1, 2), np.float32)}
        first = asyncio.ensure_future(b.submit(x, 1))
        while b.running_rows == 0:  # noqa: ASYNC110 - until first is inside the model (gated)
            await asyncio.sleep(0.001)
        queued = [asyncio.ensure_future(b.submit(x, 1)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Unavailable) as info:
            await b.submit(x, 1)
        gate.set()
        await asyncio.gather(first, *queued)
        await b.close()
        return info.value

    error = asyncio.run(main())
    assert error.retry_after_s and "queue is full" in error.message


def test_failed_batch_fails_its_requests_and_the_batcher_goes_on(pool):
    calls = {"n": 0}

    def flaky(inputs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return _double(inputs)

    async def main():
        b = _batcher(pool, flaky)
        b.start()
        x = {"x": np.ones((1, 2), np.float32)}
        with pytest.raises(SlimserveError, match="boom"):
            await b.submit(x, 1)
        out = await b.submit(x, 1)
        await b.close()
        return out, b.stats

    out, stats = asyncio.run(main())
    np.testing.assert_array_equal(out["y"], [[2.0, 2.0]])
    assert stats.fail_count == 1 and stats.success_count == 1


def test_expired_request_never_reaches_the_model(pool):
    seen: list[int] = []

    def infer(inputs):
        seen.append(int(inputs["x"][0, 0]))
        time.sleep(0.05)
        return _double(inputs)

    async def main():
        b = _batcher(pool, infer, max_batch_size=1)
        b.start()
        first = asyncio.ensure_future(b.submit({"x": np.full((1, 1), 1.0, np.float32)}, 1))
        await asyncio.sleep(0.01)
        late = b.submit({"x": np.full((1, 1), 2.0, np.float32)}, 1, time.monotonic() + 0.001)
        with pytest.raises(DeadlineExceeded):
            await late
        await first
        await b.close()

    asyncio.run(main())
    assert seen == [1]


def test_requests_with_different_trailing_shapes_are_not_mixed(pool):
    async def main():
        b = _batcher(pool)
        xs = [np.ones((1, 3), np.float32), np.ones((2, 5), np.float32), np.ones((1, 3), np.float32)]
        return xs, await _with(b, asyncio.gather(*(b.submit({"x": x}, len(x)) for x in xs)))

    xs, outs = asyncio.run(main())
    for x, out in zip(xs, outs, strict=True):
        assert out["y"].shape == x.shape


def test_output_without_batch_dimension_fails_the_batch_clearly(pool):
    async def main():
        b = _batcher(pool, lambda inputs: {"y": np.zeros(3, np.float32)[0]})
        return await _with(b, b.submit({"x": np.ones((2, 2), np.float32)}, 2))

    with pytest.raises(SlimserveError, match="batch dimension"):
        asyncio.run(main())


def test_closed_loop_clients_share_one_batch_instead_of_alternating_halves(pool):
    # 8 clients, each sending its next request as soon as the last is answered, against a
    # 20 ms model: dispatching whatever is queued when the model frees up splits them into
    # two alternating batches of 4; waiting (briefly) for the clients just answered makes
    # one batch of all 8.
    sizes: list[int] = []

    def infer(inputs):
        sizes.append(inputs["x"].shape[0])
        time.sleep(0.02)
        return _double(inputs)

    async def client(b: Batcher, index: int, rounds: int) -> None:
        await asyncio.sleep(index * 0.003)  # clients connect one after another
        for _ in range(rounds):
            await b.submit({"x": np.ones((1, 4), np.float32)}, 1)
            await asyncio.sleep(0.0005)  # the answer's way back and the next request's way in

    async def main():
        b = _batcher(pool, infer, max_batch_size=32, max_delay_s=0.01)
        await _with(b, asyncio.gather(*(client(b, i, 12) for i in range(8))))

    asyncio.run(main())
    steady = sizes[3:-3]  # past the first arrivals, before the clients finish
    assert sum(steady) / len(steady) > 6, sizes


def test_a_lone_client_is_not_held_back_by_an_earlier_crowd(pool):
    # After 8 clients leave, one client goes on alone: its requests must not wait for the
    # crowd's old peak (they go out after the short pause, not max_delay_s).
    waits: list[float] = []

    async def main():
        b = _batcher(pool, max_batch_size=32, max_delay_s=2.0)
        b.start()
        try:
            await asyncio.gather(
                *(b.submit({"x": np.ones((1, 4), np.float32)}, 1) for _ in range(8))
            )
            for _ in range(5):
                start = time.perf_counter()
                await b.submit({"x": np.ones((1, 4), np.float32)}, 1)
                waits.append(time.perf_counter() - start)
        finally:
            await b.close()

    asyncio.run(main())
    assert max(waits) < 1.0, waits  # max_delay_s is 2 s; the pause is milliseconds


def test_deadlines_follow_the_clock_passed_in(pool):
    """A queued request whose deadline the (fake) clock has passed fails before the model
    runs it; one still within its deadline is served. No sleeping on the real clock."""
    clock = FakeClock()
    gate = threading.Event()

    def held(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        gate.wait(10)
        return _double(inputs)

    async def main() -> tuple[object, object]:
        batcher = _batcher(pool, held, max_batch_size=1, clock=clock)
        batcher.start()
        try:
            x = np.ones((1, 2), np.float32)
            first = asyncio.ensure_future(batcher.submit({"x": x}, 1))
            while batcher.running_rows == 0:  # noqa: ASYNC110 - the first request holds the model
                await asyncio.sleep(0.001)
            late = asyncio.ensure_future(batcher.submit({"x": x}, 1, deadline=clock() + 1.0))
            kept = asyncio.ensure_future(batcher.submit({"x": x}, 1, deadline=clock() + 9.0))
            await asyncio.sleep(0)
            clock.advance(2.0)  # past the first deadline only
            gate.set()
            await first
            return (await asyncio.gather(late, kept, return_exceptions=True))[0], await kept
        finally:
            await batcher.close()

    late, kept = asyncio.run(main())
    assert isinstance(late, DeadlineExceeded)
    assert isinstance(kept, dict) and kept["y"].tolist() == [[2.0, 2.0]]
