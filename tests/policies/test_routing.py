"""Model-aware routing decisions, one rule at a time."""

from __future__ import annotations

import random
from collections import Counter

from slimserve.policies.routing import (
    ReplicaStats,
    RouteConfig,
    RouteRequest,
    prefix_hashes,
    route,
)

CONFIG = RouteConfig(imbalance=4)


def stats(name: str, resident=(), free=0, queue=0, prefixes=()) -> ReplicaStats:
    return ReplicaStats(name, frozenset(resident), free, queue, frozenset(prefixes))


def test_a_resident_model_goes_where_it_is_resident_even_with_a_longer_queue():
    replicas = [stats("a", queue=0), stats("b", ["mlp:int8"], queue=3), stats("c", queue=1)]
    decision = route(CONFIG, replicas, RouteRequest("mlp:int8"), random.Random(0))
    assert decision.ranked[0] == "b" and decision.reason == "resident"
    assert set(decision.ranked) == {"a", "b", "c"}  # the rest follow as fallbacks
    assert decision.ranked[1:] == ("a", "c")  # by queue length


def test_a_resident_replica_far_behind_the_others_spills_to_the_shortest_queue():
    replicas = [stats("a", queue=0), stats("b", ["mlp:"], queue=4)]
    decision = route(CONFIG, replicas, RouteRequest("mlp:"), random.Random(0))
    assert decision.ranked[0] == "a" and decision.reason == "queue"


def test_among_resident_replicas_the_shorter_queue_wins():
    replicas = [stats("a", ["m:"], queue=2), stats("b", ["m:"], queue=0), stats("c", queue=0)]
    for seed in range(10):
        decision = route(CONFIG, replicas, RouteRequest("m:"), random.Random(seed))
        assert decision.ranked[0] == "b"


def test_prefix_affinity_picks_the_longest_cached_prefix():
    prompt = "You are a helpful assistant. " * 40  # several blocks
    hashes = prefix_hashes(prompt)
    assert len(hashes) >= 3 and prefix_hashes(prompt) == hashes
    assert prefix_hashes(prompt + " more")[: len(hashes)] == hashes  # a longer prompt extends
    replicas = [
        stats("a", ["llm:"], prefixes=hashes[:1]),
        stats("b", ["llm:"], prefixes=hashes[:3]),
        stats("c", ["llm:"]),
    ]
    decision = route(CONFIG, replicas, RouteRequest("llm:", prefixes=hashes), random.Random(0))
    assert decision.ranked[0] == "b" and decision.reason == "resident"
    without_model = route(CONFIG, replicas, RouteRequest(None, prefixes=hashes), random.Random(0))
    assert without_model.ranked[0] == "b" and without_model.reason == "prefix"


def test_a_cold_model_goes_where_the_budget_has_room():
    replicas = [stats("a", free=10, queue=0), stats("b", free=1000, queue=2), stats("c", free=5)]
    decision = route(CONFIG, replicas, RouteRequest("big:", size_bytes=500), random.Random(0))
    assert decision.ranked[0] == "b" and decision.reason == "room"
    unknown_size = route(CONFIG, replicas, RouteRequest("big:"), random.Random(0))
    assert unknown_size.ranked[0] == "b" and unknown_size.reason == "room"


def test_otherwise_two_choices_spread_the_load_to_shorter_queues():
    replicas = [stats("a", queue=0), stats("b", queue=5), stats("c", queue=9)]
    rng = random.Random(1)
    firsts = Counter(route(CONFIG, replicas, RouteRequest("m:"), rng).ranked[0] for _ in range(300))
    assert firsts["c"] == 0  # the longest queue never wins a pair
    assert firsts["a"] > firsts["b"] > 0


def test_no_replicas_no_route():
    assert route(CONFIG, [], RouteRequest("m:"), random.Random(0)).ranked == ()
