"""Which replica serves a request: model-aware routing across replicas (cluster.ray_router).

Each replica publishes what it holds (resident model:variants, free memory budget, queue
depth, for LLMs the hashes of prompt prefixes it has cached). A request goes, in order of
preference:

1. to a replica where its model:variant is resident (no load, no eviction), unless that
   replica's queue is far longer than the shortest one (`imbalance`): a hot model then spills
   to a second replica instead of queueing behind one;
2. for an LLM prompt, to the replica holding the longest cached prefix of it (its KV cache
   answers the prefill);
3. for a cold model, to a replica whose free budget holds it (nothing is evicted), or with
   its size unknown, to those with the most free budget;
4. by the power of two choices on queue depth among what is left.

`route` returns every replica ranked, best first, so the caller can fall back in order when
the first refuses or has died. Pure: the caller passes the random source.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

PREFIX_BLOCK_CHARS = 256  # a prompt is hashed per prefix of whole blocks of this many chars


@dataclass(frozen=True, slots=True)
class ReplicaStats:
    """What one replica published; `resident` holds "model:variant" keys ("model:" base)."""

    replica: str
    resident: frozenset[str] = frozenset()
    free_bytes: int = 0
    queue: int = 0  # requests waiting or running on it
    prefixes: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class RouteRequest:
    key: str | None = None  # "model:variant", None when the request names no model
    size_bytes: int = 0  # the model's size when it is cold (0: unknown, go for the most room)
    prefixes: tuple[str, ...] = ()  # prefix_hashes(prompt), shortest first


@dataclass(frozen=True, slots=True)
class RouteConfig:
    imbalance: int = 8  # queue length over the shortest at which residency no longer wins
    min_prefix_blocks: int = 1  # matched blocks that make prefix affinity count


@dataclass(frozen=True, slots=True)
class Route:
    ranked: tuple[str, ...]  # replica names, best first
    reason: str  # "resident" | "prefix" | "room" | "queue": which rule chose the first
    candidates: tuple[str, ...] = field(default=())  # the set the first was chosen from


def prefix_hashes(prompt: str, block: int = PREFIX_BLOCK_CHARS, most: int = 16) -> tuple[str, ...]:
    """Hashes of the prompt's first 1, 2, ... whole blocks (at most `most`), shortest first;
    replicas publish the same hashes for the prompts they cached."""
    out, digest = [], hashlib.blake2b(digest_size=8)
    for end in range(block, min(len(prompt), block * most) + 1, block):
        digest.update(prompt[end - block : end].encode())
        out.append(digest.copy().hexdigest())
    return tuple(out)


def route(
    config: RouteConfig,
    replicas: Sequence[ReplicaStats],
    request: RouteRequest,
    rng: random.Random,
) -> Route:
    """Rank `replicas` for `request` (see the module's rules). Empty when there are none."""
    if not replicas:
        return Route((), "none")
    shortest = min(r.queue for r in replicas)
    reason, pool = "queue", list(replicas)
    resident = [r for r in replicas if request.key is not None and request.key in r.resident]
    resident = [r for r in resident if r.queue - shortest < config.imbalance]
    matched = _longest_prefix(config, replicas, request.prefixes)
    if resident:
        reason, pool = "resident", resident
        matched = _longest_prefix(config, resident, request.prefixes) or resident
        pool = matched
    elif matched:
        reason, pool = "prefix", [r for r in matched if r.queue - shortest < config.imbalance]
        if not pool:
            reason, pool = "queue", list(replicas)
    elif request.key is not None:
        room = _room(replicas, request.size_bytes)
        if room:
            reason, pool = "room", room
    first = _two_choices(pool, rng)
    rest = sorted((r for r in replicas if r is not first), key=lambda r: r.queue)
    return Route(
        (first.replica, *(r.replica for r in rest)), reason, tuple(r.replica for r in pool)
    )


def _longest_prefix(
    config: RouteConfig, replicas: Sequence[ReplicaStats], prefixes: tuple[str, ...]
) -> list[ReplicaStats]:
    """The replicas holding the longest cached prefix of the prompt (empty: none holds one)."""
    best, holders = 0, list[ReplicaStats]()
    for r in replicas:
        n = 0
        while n < len(prefixes) and prefixes[n] in r.prefixes:
            n += 1
        if n >= config.min_prefix_blocks and n >= best:
            holders = holders if n == best else []
            best = n
            holders.append(r)
    return holders


def _room(replicas: Sequence[ReplicaStats], size: int) -> list[ReplicaStats]:
    """Replicas whose free budget holds `size` bytes; size unknown (0): those with the most."""
    if size > 0:
        return [r for r in replicas if r.free_bytes >= size]
    most = max(r.free_bytes for r in replicas)
    return [r for r in replicas if r.free_bytes == most] if most > 0 else []


def _two_choices(pool: Sequence[ReplicaStats], rng: random.Random) -> ReplicaStats:
    """Power of two choices: of two replicas drawn at random, the one with the shorter queue."""
    if len(pool) == 1:
        return pool[0]
    a, b = rng.sample(list(pool), 2)
    return a if a.queue <= b.queue else b
