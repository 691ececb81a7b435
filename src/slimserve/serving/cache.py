"""Response cache: the outputs of a unit for the exact same inputs and parameters.

Opt-in per model (`cache:` in model.yaml). Keys hash the unit (model, version, variant), the
input tensors (names, datatypes, shapes and bytes) and the parameters that can change an
answer. Two backends behind one small interface: in memory, bounded in bytes (LRU or LFU, from
cachetools, with an optional TTL), and Redis, shared by several server processes (bounded by
the Redis server's own `maxmemory`; entries expire after the TTL). A miss is computed once:
concurrent identical requests wait for the first one (single flight).
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, cast

import numpy as np
import orjson
from cachetools import LFUCache, LRUCache

from slimserve.errors import Unavailable
from slimserve.repository.schema import CacheSettings
from slimserve.types import Clock

Arrays = dict[str, np.ndarray]
# Parameters that change how a request is encoded, not what it computes (the controls,
# such as timeout and priority, are not parameters by the time a request gets here).
_NEUTRAL_PARAMETERS = frozenset({"binary_data_output", "headers"})


def cache_key(unit_key: str, inputs: Arrays, parameters: dict[str, Any]) -> str:
    """A stable digest of what determines the answer."""
    h = hashlib.blake2b(unit_key.encode(), digest_size=20)
    for name in sorted(inputs):
        array = inputs[name]
        h.update(f"|{name}|{array.dtype.str}|{array.shape}|".encode())
        if array.dtype == object:
            for item in array.ravel():
                data = item if isinstance(item, bytes) else str(item).encode()
                h.update(struct.pack("<I", len(data)))
                h.update(data)
        else:
            h.update(np.ascontiguousarray(array).data.cast("B"))
    relevant = {k: v for k, v in parameters.items() if k not in _NEUTRAL_PARAMETERS}
    if relevant:
        h.update(orjson.dumps(relevant, option=orjson.OPT_SORT_KEYS, default=str))
    return h.hexdigest()


def nbytes(outputs: Arrays) -> int:
    total = 0
    for array in outputs.values():
        if array.dtype == object:
            total += sum(len(x) if isinstance(x, bytes | str) else 8 for x in array.ravel())
        else:
            total += array.nbytes
    return total + 64 * len(outputs)


def encode(outputs: Arrays) -> bytes:
    """Arrays -> bytes without pickle: a JSON header, then each tensor's raw bytes."""
    header, parts = [], []
    for name, array in outputs.items():
        if array.dtype == object:
            items = [x if isinstance(x, bytes) else str(x).encode() for x in array.ravel()]
            raw = b"".join(struct.pack("<I", len(x)) + x for x in items)
            header.append([name, "BYTES", list(array.shape), len(raw)])
        else:
            raw = np.ascontiguousarray(array).tobytes()
            header.append([name, array.dtype.str, list(array.shape), len(raw)])
        parts.append(raw)
    head = orjson.dumps(header)
    return struct.pack("<I", len(head)) + head + b"".join(parts)


def decode(data: bytes) -> Arrays:
    (size,) = struct.unpack_from("<I", data)
    offset = 4 + size
    out: Arrays = {}
    for name, dtype, shape, length in orjson.loads(data[4:offset]):
        raw = data[offset : offset + length]
        offset += length
        if dtype == "BYTES":
            items, pos = [], 0
            while pos < len(raw):
                (n,) = struct.unpack_from("<I", raw, pos)
                items.append(raw[pos + 4 : pos + 4 + n])
                pos += 4 + n
            out[name] = np.array(items, dtype=object).reshape(shape)
        else:
            out[name] = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
    return out


class CacheBackend(Protocol):
    async def get(self, key: str) -> Arrays | None: ...

    async def set(self, key: str, value: Arrays) -> None: ...

    async def close(self) -> None: ...


class MemoryCache:
    """In-process, bounded in bytes; LRU or LFU; optional TTL with the timer passed in."""

    def __init__(
        self,
        max_bytes: int,
        policy: str = "lru",
        ttl_s: float | None = None,
        timer: Callable[[], float] = time.monotonic,
    ) -> None:
        kind = {"lru": LRUCache, "lfu": LFUCache}[policy]
        # Values are (expiry, outputs, size); size counts toward max_bytes.
        self._data = kind(maxsize=max_bytes, getsizeof=lambda v: v[2])
        self._ttl = ttl_s
        self._timer = timer
        self.max_bytes = max_bytes

    @property
    def current_bytes(self) -> int:
        return int(self._data.currsize)

    async def get(self, key: str) -> Arrays | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expiry, value, _ = entry
        if expiry is not None and self._timer() >= expiry:
            del self._data[key]
            return None
        return cast(Arrays, value)

    async def set(self, key: str, value: Arrays) -> None:
        size = nbytes(value)
        if size > self.max_bytes:
            return  # larger than the whole cache: not worth evicting everything for
        expiry = None if self._ttl is None else self._timer() + self._ttl
        self._data[key] = (expiry, value, size)

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """Shared by every server process using the same Redis; entries expire after ttl_s."""

    def __init__(self, url: str, namespace: str, ttl_s: float | None = None) -> None:
        import redis.asyncio as redis

        self._client = redis.from_url(url)
        self._prefix = f"slimserve:cache:{namespace}:"
        self._ttl_ms = None if ttl_s is None else max(1, int(ttl_s * 1000))

    async def get(self, key: str) -> Arrays | None:
        data = await self._client.get(self._prefix + key)
        return None if data is None else decode(data)

    async def set(self, key: str, value: Arrays) -> None:
        await self._client.set(self._prefix + key, encode(value), px=self._ttl_ms)

    async def close(self) -> None:
        await self._client.aclose()


class ResponseCache:
    """A backend plus single flight and hit/miss counters."""

    def __init__(self, backend: CacheBackend) -> None:
        self.backend = backend
        self.hits = 0
        self.misses = 0
        self._flights: dict[str, asyncio.Future[Arrays]] = {}

    async def get_or_compute(
        self,
        key: str,
        compute: Callable[[], Awaitable[Arrays]],
        keep: Callable[[Arrays], bool] | None = None,
    ) -> Arrays:
        """The cached value, or `compute()`'s, stored unless `keep` says otherwise."""
        flight = self._flights.get(key)
        if flight is not None:
            self.hits += 1
            return await asyncio.shield(flight)
        cached = await self.backend.get(key)
        if cached is not None:
            self.hits += 1
            return cached
        self.misses += 1
        flight = self._flights[key] = asyncio.get_running_loop().create_future()
        try:
            value = await compute()
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):  # the first caller left; others retry
                flight.set_exception(Unavailable("an identical request was cancelled; retry"))
            else:
                flight.set_exception(exc)
            flight.exception()  # retrieved: waiters re-raise it, nobody warns
            raise
        finally:
            del self._flights[key]
        flight.set_result(value)
        if keep is None or keep(value):
            await self.backend.set(key, value)
        return value


class ResponseCaches:
    """One response cache per model that asks for one (`cache:` in model.yaml), made on its
    first request: in memory, or in Redis when the server was given a `redis://` URL."""

    def __init__(self, redis_url: str | None = None, clock: Clock = time.monotonic) -> None:
        self._redis_url = redis_url
        self._clock = clock  # expiry of in-memory entries
        self._caches: dict[str, ResponseCache] = {}

    def for_model(self, model: str, settings: CacheSettings | None) -> ResponseCache | None:
        """The model's cache, or None when its model.yaml has no `cache:` section."""
        if settings is None:
            return None
        cache = self._caches.get(model)
        if cache is None:
            backend: CacheBackend
            if self._redis_url:
                backend = RedisCache(self._redis_url, model, settings.ttl_s)
            else:
                backend = MemoryCache(
                    settings.max_bytes, settings.policy, settings.ttl_s, timer=self._clock
                )
            cache = self._caches[model] = ResponseCache(backend)
        return cache

    def __getitem__(self, model: str) -> ResponseCache:
        return self._caches[model]

    def items(self) -> list[tuple[str, ResponseCache]]:
        return list(self._caches.items())

    async def close(self) -> None:
        for cache in self._caches.values():
            await cache.backend.close()
