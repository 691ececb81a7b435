"""Dynamic batching: one queue per served unit (a model version or one of its variants).

Requests carry one or more rows. The batcher concatenates the inputs of queued requests along
the batch dimension once, runs the runtime off the event loop, and hands each request back
views of exactly its own rows.

When to dispatch: when the runtime is free and the batch has reached its target, or the oldest
request has waited `max_delay_s`, or arrivals have paused. The target is the number of rows
recently in the batcher at once (queued plus running, the peak of the last half second), capped
at max_batch_size: it is how many requests the current clients keep in flight, so waiting for
it lets a batch take everyone instead of splitting the clients into halves that alternate
(16 clients of a 30 ms model ran as two batches of 8). A pause is no arrival for 10% of the
model's recent batch time (at least 0.2 ms): waiting longer than that costs more than a
batch of the rows at hand would. A lone client (target 1) is dispatched at once, after a few
event-loop turns so that requests already read from sockets join.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

from slimserve.errors import DeadlineExceeded, InvalidArgument, SlimserveError, Unavailable
from slimserve.policies.shedding import ServiceEstimate
from slimserve.types import Clock

Arrays = dict[str, np.ndarray]
# Event-loop turns without a new arrival after which a partial batch goes out.
_QUIET_TURNS = 2
# How long the peak of rows in the batcher is remembered (ns), and the pause in arrivals that
# ends a wait for the target: a share of the recent batch time, within bounds (s).
_PEAK_WINDOW_NS = 500_000_000
_PAUSE_SHARE, _PAUSE_MIN_S, _PAUSE_MAX_S = 0.1, 0.0002, 0.005
# Weight of each new gap between arrivals in their moving average (the arrival rate).
_GAP_WEIGHT = 0.05


@dataclass(slots=True)
class _Item:
    inputs: Arrays
    rows: int
    signature: tuple[tuple[int, ...], ...]  # non-batch dims per input: only equal ones batch
    future: asyncio.Future[Arrays]
    enqueued_ns: int
    deadline: float | None  # the batcher's clock, seconds; None: no deadline
    priority: int = 0  # higher goes first


@dataclass(slots=True)
class BatchStats:
    """Counters in the shape Triton's statistics API reports (nanoseconds)."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_ns: int = 0
    compute_ns: int = 0
    inference_count: int = 0  # rows
    execution_count: int = 0  # batches
    last_inference_ms: int = 0
    batch_sizes: dict[int, list[int]] = field(default_factory=dict)  # size -> [count, ns]

    def record_call(self, rows: int, elapsed: int, ok: bool) -> None:
        """One request served outside the batcher (a language model generates on its own
        schedule) in `elapsed` ns: counted as a batch of its rows, with no queue time."""
        if not ok:
            self.fail_count += 1
            self.fail_ns += elapsed
            return
        self.success_count += 1
        self.success_ns += elapsed
        self.compute_ns += elapsed
        self.inference_count += rows
        self.execution_count += 1
        entry = self.batch_sizes.setdefault(rows, [0, 0])
        entry[0] += 1
        entry[1] += elapsed
        self.last_inference_ms = int(time.time() * 1000)


class Batcher:
    """Queue + dispatcher for one runtime. Use `submit` from the event loop.

    `clock` (monotonic seconds) times the batching window, deadlines and the statistics.
    """

    def __init__(
        self,
        infer: Callable[[Arrays], Arrays],
        executor: Executor,
        *,
        max_batch_size: int,
        max_delay_s: float,
        max_queue: int,
        stats: BatchStats | None = None,
        on_batch: Callable[[int, list[float]], None] | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._clock = clock
        # The same clock in integer nanoseconds; the server's real clock without a Python
        # frame per reading (several per request on the hot path).
        self._now_ns: Callable[[], int] = (
            time.monotonic_ns if clock is time.monotonic else lambda: int(clock() * 1e9)
        )
        self._infer = infer
        self._executor = executor
        self.max_batch_size = max_batch_size  # 0: no batch dimension, one request per call
        self.max_delay_s = max_delay_s
        self.max_queue = max_queue
        self.stats = stats if stats is not None else BatchStats()
        self.estimate = ServiceEstimate()  # batch latency and size, for shedding
        self._on_batch = on_batch  # (rows, each request's queue seconds), for metrics
        self.queued_rows = 0
        self.running_rows = 0
        # When the running batch started on its inference thread (ns; None: not yet, it waits
        # behind other units' batches on that thread, serving/threads.py).
        self.running_started_ns: int | None = None
        self._peak_rows, self._peak_ns = 0, 0  # most rows queued + running, and when seen
        self._last_arrival_ns: int | None = None
        self._gap_ns: float | None = None  # moving average of the gaps between arrivals (ns)
        self._arrival: asyncio.Future[bool] | None = None  # resolved by the next submit
        self._queue: deque[_Item] = deque()
        self._wakeup = asyncio.Event()
        self._closed = False
        self._busy = False
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        """Stop taking requests, finish the queued ones, then stop the dispatcher."""
        self._closed = True
        self._wakeup.set()
        if self._arrival is not None:
            _resolve(self._arrival, False)
        if self._task is not None:
            await self._task

    def expected_wait_s(self) -> float:
        """Seconds a request arriving now would wait for the rows queued ahead of it."""
        return self.estimate.expected_wait_s(self.queued_rows, self.max_batch_size)

    async def submit(
        self, inputs: Arrays, rows: int, deadline: float | None = None, priority: int = 0
    ) -> Arrays:
        """Queue one request of `rows` rows; return its outputs (views of the batch result)."""
        if self._closed:
            raise Unavailable("the model is being unloaded; retry shortly", retry_after_s=1)
        if self.max_batch_size and rows > self.max_batch_size:
            raise InvalidArgument(
                f"the request has {rows} rows but the model's max_batch_size is "
                f"{self.max_batch_size}; split it into requests of at most that many rows"
            )
        if len(self._queue) >= self.max_queue:
            raise Unavailable(
                f"the model's queue is full ({self.max_queue} requests waiting); retry later",
                retry_after_s=1,
            )
        signature = tuple(a.shape[1:] for a in inputs.values()) if self.max_batch_size else ()
        future: asyncio.Future[Arrays] = asyncio.get_running_loop().create_future()
        now_ns = self._now_ns()
        item = _Item(inputs, rows, signature, future, now_ns, deadline, priority)
        self._note_arrival(now_ns)
        if priority and self._queue and self._queue[-1].priority < priority:
            self._insert_by_priority(item)
        else:
            self._queue.append(item)
        self.queued_rows += rows
        self._note_peak(now_ns)
        self._wakeup.set()
        if self._arrival is not None:
            _resolve(self._arrival, True)
        return await future

    def _note_arrival(self, now_ns: int) -> None:
        last, self._last_arrival_ns = self._last_arrival_ns, now_ns
        if last is not None:
            gap, mean = now_ns - last, self._gap_ns
            self._gap_ns = gap if mean is None else mean + (gap - mean) * _GAP_WEIGHT

    def _note_peak(self, now_ns: int) -> None:
        rows = self.queued_rows + self.running_rows
        if rows >= self._peak_rows or now_ns - self._peak_ns > _PEAK_WINDOW_NS:
            self._peak_rows, self._peak_ns = rows, now_ns

    def arrival_rate_rps(self) -> float:
        """Requests per second arriving lately (a moving average of the gaps between them,
        which a silence since the last one lengthens); 0 before the first request."""
        last = self._last_arrival_ns
        if last is None:
            return 0.0
        gap = max(self._gap_ns or 0.0, float(self._now_ns() - last))
        return 1e9 / gap if gap > 0 else 0.0

    def running_for_s(self) -> float | None:
        """Seconds the running batch has been computing (None: no batch has started)."""
        started = self.running_started_ns
        return None if started is None else (self._now_ns() - started) / 1e9

    def fill_rows(self) -> int:
        """Rows a partial batch waits for now (at most max_delay_s): see the module doc."""
        return self._target_rows(self._now_ns()) if self.max_batch_size else 1

    def _target_rows(self, now_ns: int) -> int:
        """Rows worth waiting for: the recent peak in the batcher, at most max_batch_size."""
        if now_ns - self._peak_ns > _PEAK_WINDOW_NS:
            self._peak_rows, self._peak_ns = self.queued_rows, now_ns
        return min(self._peak_rows, self.max_batch_size)

    def _insert_by_priority(self, item: _Item) -> None:
        """Ahead of every queued item of lower priority, behind equal ones (FIFO within)."""
        for index, queued in enumerate(self._queue):
            if queued.priority < item.priority:
                self._queue.insert(index, item)
                return
        self._queue.append(item)

    async def _run(self) -> None:
        while True:
            if not self._queue:
                if self._closed:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._gather()
            batch = self._take()
            if batch:
                await self._execute(batch)

    async def _gather(self) -> None:
        """Let a partial batch fill toward its target, up to max_delay_s (see the module doc)."""
        if not self.max_batch_size:
            return
        # The delay counts from when the runtime is free for this queue: requests that queued
        # behind a running batch may still wait max_delay_s for the rest of their clients.
        start_ns = max(self._queue[0].enqueued_ns, self._now_ns())
        limit_ns = start_ns + int(self.max_delay_s * 1e9)
        await self._settle(limit_ns)
        pause_ns = int(self._pause_s() * 1e9)
        while self.queued_rows < self._target_rows(self._now_ns()) and not self._closed:
            wait_ns = min(limit_ns - self._now_ns(), pause_ns)
            if wait_ns <= 0 or not await self._next_arrival(wait_ns / 1e9):
                return

    async def _settle(self, limit_ns: int) -> None:
        """A few event-loop turns, until the queue stops growing: requests already read from
        sockets join at no cost."""
        quiet, seen = 0, len(self._queue)
        while quiet < _QUIET_TURNS and self.queued_rows < self.max_batch_size:
            if self._closed or self._now_ns() >= limit_ns:
                return
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(self._queue) == seen else 0
            seen = len(self._queue)

    def _pause_s(self) -> float:
        share = _PAUSE_SHARE * self.estimate.batch_s
        return min(_PAUSE_MAX_S, max(_PAUSE_MIN_S, share))

    async def _next_arrival(self, timeout_s: float) -> bool:
        """True when a request arrives within `timeout_s`, False on the timeout."""
        loop = asyncio.get_running_loop()
        self._arrival = arrival = loop.create_future()
        timer = loop.call_later(timeout_s, _resolve, arrival, False)
        try:
            arrived: bool = await arrival
            return arrived
        finally:
            timer.cancel()
            self._arrival = None

    def _take(self) -> list[_Item]:
        """Pop a compatible set of items (same non-batch dims) up to max_batch_size rows."""
        before = len(self._queue)
        batch = self._pick()
        if len(self._queue) != before:
            self.queued_rows = sum(item.rows for item in self._queue)
        return batch

    def _pick(self) -> list[_Item]:
        now = self._clock()
        first = None
        while self._queue and first is None:
            item = self._queue.popleft()
            if item.future.done():
                continue  # cancelled by its caller (client gone)
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(
                    DeadlineExceeded("the request's timeout passed before it reached the model")
                )
                continue
            first = item
        if first is None:
            return []
        batch, rows = [first], first.rows
        if not self.max_batch_size:
            return batch
        kept: deque[_Item] = deque()
        while self._queue:
            item = self._queue.popleft()
            if item.future.done():
                continue
            fits = rows + item.rows <= self.max_batch_size
            if fits and item.signature == first.signature:
                batch.append(item)
                rows += item.rows
            else:
                kept.append(item)
                if not fits:
                    break
        kept.extend(self._queue)
        self._queue = kept
        return batch

    def _timed_infer(self, inputs: Arrays) -> Arrays:
        """On the inference thread: note when the batch really starts (after the thread's
        other units' batches), so compute time excludes the wait for the thread."""
        self.running_started_ns = self._now_ns()
        return self._infer(inputs)

    async def _execute(self, batch: list[_Item]) -> None:
        start_ns = self._now_ns()
        inputs = _concat(batch) if self.max_batch_size else batch[0].inputs
        loop = asyncio.get_running_loop()
        self.running_rows = sum(item.rows for item in batch)
        try:
            outputs = await loop.run_in_executor(self._executor, self._timed_infer, inputs)
        except Exception as exc:  # noqa: BLE001 - a failed batch fails its requests only
            self._fail(batch, exc, start_ns)
            return
        finally:
            self.running_rows = 0
            if self.running_started_ns is not None:
                start_ns = max(start_ns, self.running_started_ns)
            self.running_started_ns = None
        end_ns = self._now_ns()
        self._deliver(batch, outputs, start_ns, end_ns)

    def _deliver(self, batch: list[_Item], outputs: Arrays, start_ns: int, end_ns: int) -> None:
        rows = sum(item.rows for item in batch)
        try:
            _check_rows(outputs, rows, bool(self.max_batch_size))
        except SlimserveError as exc:
            self._fail(batch, exc, start_ns)
            return
        offset = 0
        for item in batch:
            if not item.future.done():
                if self.max_batch_size and len(batch) > 1:
                    part = {k: v[offset : offset + item.rows] for k, v in outputs.items()}
                else:
                    part = outputs
                item.future.set_result(part)
            offset += item.rows
        self._record(batch, rows, start_ns, end_ns)

    def _record(self, batch: list[_Item], rows: int, start_ns: int, end_ns: int) -> None:
        s = self.stats
        s.execution_count += 1
        s.inference_count += rows
        s.success_count += len(batch)
        s.compute_ns += end_ns - start_ns
        for item in batch:
            s.queue_ns += start_ns - item.enqueued_ns
            s.success_ns += end_ns - item.enqueued_ns
        self.estimate.update(rows, (end_ns - start_ns) / 1e9)
        if self._on_batch is not None:
            self._on_batch(rows, [(start_ns - item.enqueued_ns) / 1e9 for item in batch])
        entry = s.batch_sizes.setdefault(rows, [0, 0])
        entry[0] += 1
        entry[1] += end_ns - start_ns
        s.last_inference_ms = int(time.time() * 1000)

    def _fail(self, batch: list[_Item], exc: Exception, start_ns: int) -> None:
        now = self._now_ns()
        error = exc if isinstance(exc, SlimserveError) else _runtime_error(exc)
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)
            self.stats.fail_count += 1
            self.stats.fail_ns += now - item.enqueued_ns


def _resolve(future: asyncio.Future[bool], value: bool) -> None:
    if not future.done():
        future.set_result(value)


def _concat(batch: list[_Item]) -> Arrays:
    if len(batch) == 1:
        return batch[0].inputs
    names = batch[0].inputs.keys()
    return {n: np.concatenate([item.inputs[n] for item in batch]) for n in names}


def _check_rows(outputs: Arrays, rows: int, batched: bool) -> None:
    if not batched:
        return
    for name, value in outputs.items():
        if value.ndim == 0 or value.shape[0] != rows:
            raise SlimserveError(
                f"the model returned output '{name}' with shape {value.shape} for a batch of "
                f"{rows} rows; a batched model must keep the batch dimension first"
            )


def _runtime_error(exc: Exception) -> SlimserveError:
    # The framework's message helps the model's owner; its type says where it came from.
    return SlimserveError(f"inference failed: {type(exc).__name__}: {exc}")
