"""Model-aware routing decisions, one rule at a time."""

from __future__ import annotations

import random
from collections import Counter

from slimserve.policies.routing import (
    ReplicaStats,
    RouteConfig,
    RouteRequest,
    balanced_homes,
    home_order,
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
    assert decision.ranked[0] == "a" and decision.reason == "home"


def test_among_resident_replicas_the_home_wins_until_another_queue_is_spread_shorter():
    home, other = home_order("m:", ["a", "b"])
    for queues in ((0, 0), (1, 0), (0, 1)):  # gaps under spread (2): always the home
        replicas = [stats(home, ["m:"], queue=queues[0]), stats(other, ["m:"], queue=queues[1])]
        for seed in range(5):
            decision = route(CONFIG, replicas, RouteRequest("m:"), random.Random(seed))
            assert decision.ranked[0] == home
    replicas = [stats(home, ["m:"], queue=2), stats(other, ["m:"], queue=0), stats("c", queue=0)]
    assert route(CONFIG, replicas, RouteRequest("m:"), random.Random(0)).ranked[0] == other


def test_cold_models_partition_over_their_homes_the_same_in_every_router():
    names = ["r1", "r2", "r3"]
    replicas = [stats(n) for n in names]
    keys = [f"m{i}:" for i in range(60)]
    firsts = {k: route(CONFIG, replicas, RouteRequest(k), random.Random(i)).ranked[0]
              for i, k in enumerate(keys)}  # fmt: skip
    assert all(
        route(CONFIG, replicas[::-1], RouteRequest(k), random.Random(7)).ranked[0] == f
        for k, f in firsts.items()
    )  # another router, another order: the same homes
    assert all(route(CONFIG, replicas, RouteRequest(k), random.Random(0)).reason == "home"
               for k in keys)  # fmt: skip
    assert min(Counter(firsts.values()).values()) >= 10  # each replica is home to some
    # A replica leaving moves only the models whose home it was.
    without = {k: route(CONFIG, replicas[:2], RouteRequest(k), random.Random(0)).ranked[0]
               for k in keys}  # fmt: skip
    assert all(without[k] == f for k, f in firsts.items() if f != "r3")


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
    assert unknown_size.reason == "home"  # no size known: its home, not wherever is emptiest
    assert unknown_size.ranked[0] == home_order("big:", ["a", "b", "c"])[0]


def test_a_cold_models_home_far_behind_the_others_is_passed_over():
    home, other = home_order("m:", ["a", "b"])
    replicas = [stats(home, queue=4), stats(other, queue=0)]
    assert route(CONFIG, replicas, RouteRequest("m:"), random.Random(0)).ranked[0] == other


def test_without_a_model_two_choices_spread_the_load_to_shorter_queues():
    replicas = [stats("a", queue=0), stats("b", queue=5), stats("c", queue=9)]
    rng = random.Random(1)
    firsts = Counter(route(CONFIG, replicas, RouteRequest(None), rng).ranked[0] for _ in range(300))
    assert firsts["c"] == 0  # the longest queue never wins a pair
    assert firsts["a"] > firsts["b"] > 0


def test_no_replicas_no_route():
    assert route(CONFIG, [], RouteRequest("m:"), random.Random(0)).ranked == ()


def test_balanced_homes_share_the_models_out_evenly_and_agree_across_routers():
    keys = [f"m{i}:" for i in range(6)]
    for names in (["a", "b"], ["x1", "y2"], ["p", "q", "r"]):
        homes = balanced_homes(keys, names)
        assert set(homes) == set(keys)
        assert max(Counter(homes.values()).values()) == 6 // len(names)  # no 5/1 split
        assert balanced_homes(reversed(keys), names[::-1]) == homes  # any order: the same
    loose = balanced_homes(keys, ["a", "b"], slack=2.0)  # plain rendezvous: may be lumpy
    assert all(loose[k] == home_order(k, ["a", "b"])[0] for k in keys)
    # The assigned home goes first for a cold model, ahead of its rendezvous order.
    other = home_order("m0:", ["a", "b"])[1]
    request = RouteRequest("m0:", home=other)
    assert route(CONFIG, [stats("a"), stats("b")], request, random.Random(0)).ranked[0] == other
