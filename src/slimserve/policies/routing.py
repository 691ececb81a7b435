"""Which replica serves a request: model-aware routing across replicas (cluster.ray_router).

Each replica publishes what it holds (resident model:variants and their sizes, free memory
budget, queue depth, for LLMs the hashes of prompt prefixes it has cached). Every model also
has a home order over the replicas (rendezvous hashing of the model key with each replica's
name): every router computes the same order without talking to the others, and adding or
removing a replica moves only the models whose first choice it was. Its home is the first
in that order that is not already home to its share of the models seen (balanced_homes).
A request goes, in order of preference:

1. to a replica where its model:variant is resident (no load, no eviction), unless that
   replica's queue is far longer than the shortest one (`imbalance`): a hot model then spills
   to a second replica instead of queueing behind one. Among several, to the first in the
   model's home order unless another's queue is `spread` shorter: a model's requests keep to
   one copy (the others age out of their budgets) until load asks for more;
2. for an LLM prompt, to the replica holding the longest cached prefix of it (its KV cache
   answers the prefill); a client's affinity key (prefix_key_hash) counts as a one-block
   prefix, and the same ranking also narrows the choice among resident replicas in 1;
3. for a cold model of known size, to a replica whose free budget holds it (nothing is
   evicted); otherwise, or with no room anywhere, to its home: the first in its home order
   whose queue is not far behind. So cold models do not scatter over replicas (which would
   load each everywhere) but partition the repository between them;
4. with no model named, by the power of two choices on queue depth.

`route` returns every replica ranked, best first, so the caller can fall back in order when
the first refuses or has died. Pure: the caller passes the random source.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
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
    home: str | None = None  # the replica the key is assigned to (balanced_homes), if known
    size_bytes: int = 0  # the model's size when it is cold (0: unknown, go for the most room)
    prefixes: tuple[str, ...] = ()  # prefix_hashes(prompt), shortest first


@dataclass(frozen=True, slots=True)
class RouteConfig:
    imbalance: int = 8  # queue length over the shortest at which residency no longer wins
    spread: int = 2  # among resident copies, a queue this much shorter beats the home order
    min_prefix_blocks: int = 1  # matched blocks that make prefix affinity count


@dataclass(frozen=True, slots=True)
class Route:
    ranked: tuple[str, ...]  # replica names, best first
    reason: str  # "resident" | "prefix" | "room" | "home" | "queue": which rule chose the first
    candidates: tuple[str, ...] = field(default=())  # the set the first was chosen from


def prefix_hashes(prompt: str, block: int = PREFIX_BLOCK_CHARS, most: int = 16) -> tuple[str, ...]:
    """Hashes of the prompt's first 1, 2, ... whole blocks (at most `most`), shortest first;
    replicas publish the same hashes for the prompts they cached."""
    out, digest = [], hashlib.blake2b(digest_size=8)
    for end in range(block, min(len(prompt), block * most) + 1, block):
        digest.update(prompt[end - block : end].encode())
        out.append(digest.copy().hexdigest())
    return tuple(out)


def prefix_key_hash(key: bytes) -> str:
    """The prefix hash of a client's own affinity key (the `slimserve-prefix-key` header: a
    conversation id, a hash of the system prompt): a one-block "prefix" that replicas publish
    and the router matches like the hash of a prompt's first block."""
    return hashlib.blake2b(b"key\0" + key, digest_size=8).hexdigest()


def home_order(key: str, names: Sequence[str]) -> list[str]:
    """Replica names in `key`'s rendezvous-hash order (highest random weight first): the same
    in every router, and only the models whose first choice a replica was move when it
    comes or goes."""

    def weight(name: str) -> bytes:
        return hashlib.blake2b(f"{key}\0{name}".encode(), digest_size=8).digest()

    return sorted(names, key=weight, reverse=True)


def balanced_homes(keys: Iterable[str], names: Sequence[str], slack: float = 1.0) -> dict[str, str]:
    """A home replica for each key: its first in home_order with fewer than
    ceil(slack x keys / replicas) keys so far, keys taken in hash order. Rendezvous hashing
    alone is lumpy for few models (six models on two replicas split 5/1 one time in five);
    this bounds the split (consistent hashing with bounded loads) and stays the same in every
    router that has seen the same keys."""
    ordered = sorted(set(keys), key=lambda k: hashlib.blake2b(k.encode(), digest_size=8).digest())
    if not names or not ordered:
        return {}
    cap = math.ceil(slack * len(ordered) / len(names))
    count = dict.fromkeys(names, 0)
    out = {}
    for key in ordered:
        home = next(n for n in home_order(key, names) if count[n] < cap)
        count[home] += 1
        out[key] = home
    return out


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
    near = [r for r in replicas if r.queue - shortest < config.imbalance]
    key = request.key
    resident = [r for r in near if key in r.resident] if key is not None else []
    matched = [r for r in _longest_prefix(config, replicas, request.prefixes) if r in near]
    if resident and key is not None:
        pool = _longest_prefix(config, resident, request.prefixes) or resident
        first, reason = _home_first(config, key, request.home, pool), "resident"
    elif matched:
        first, reason, pool = _two_choices(matched, rng), "prefix", matched
    elif key is not None:
        room = [r for r in near if request.size_bytes > 0 and r.free_bytes >= request.size_bytes]
        reason, pool = ("room", room) if room else ("home", near)
        first = _by_home(key, request.home, pool)[0]
    else:
        first, reason, pool = _two_choices(replicas, rng), "queue", list(replicas)
    rest = sorted((r for r in replicas if r is not first), key=lambda r: r.queue)
    return Route(
        (first.replica, *(r.replica for r in rest)), reason, tuple(r.replica for r in pool)
    )


def _by_home(key: str, home: str | None, pool: Sequence[ReplicaStats]) -> list[ReplicaStats]:
    """`pool` in the key's home order, its assigned home (if in `pool`) first."""
    by_name = {r.replica: r for r in pool}
    order = home_order(key, list(by_name))
    if home in by_name:
        order.remove(home)
        order.insert(0, home)
    return [by_name[name] for name in order]


def _home_first(
    config: RouteConfig, key: str, home: str | None, pool: Sequence[ReplicaStats]
) -> ReplicaStats:
    """The first of `pool` in the model's home order, unless another's queue is `spread`
    shorter (then the shortest)."""
    first = _by_home(key, home, pool)[0]
    shortest = min(pool, key=lambda r: r.queue)
    return shortest if first.queue - shortest.queue >= config.spread else first


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


def _two_choices(pool: Sequence[ReplicaStats], rng: random.Random) -> ReplicaStats:
    """Power of two choices: of two replicas drawn at random, the one with the shorter queue."""
    if len(pool) == 1:
        return pool[0]
    a, b = rng.sample(list(pool), 2)
    return a if a.queue <= b.queue else b
