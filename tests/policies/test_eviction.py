"""One contract for every eviction policy, then what sets each apart."""

from __future__ import annotations

import pytest

from slimserve.policies.eviction import GDSF, LFU, LRU, POLICIES, Resident, make_policy

MB = 1 << 20


def table(policy, sizes, now=0.0):
    entries = []
    for i, size in enumerate(sizes):
        e = Resident(f"m{i}", size * MB)
        policy.touch(e, now + i)
        entries.append(e)
    return entries


@pytest.mark.parametrize("name", sorted(POLICIES))
class TestContract:
    def test_frees_at_least_what_is_needed(self, name):
        p = make_policy(name)
        entries = table(p, [10, 20, 30])
        chosen = p.victims(entries, 25 * MB)
        assert chosen is not None and sum(e.size_bytes for e in chosen) >= 25 * MB

    def test_nothing_needed_evicts_nothing(self, name):
        p = make_policy(name)
        assert p.victims(table(p, [10, 20]), 0) == []

    def test_never_pinned_or_in_use(self, name):
        p = make_policy(name)
        entries = table(p, [10, 10, 10])
        entries[0].pinned = True
        entries[1].in_use = 2
        chosen = p.victims(entries, 10 * MB)
        assert [e.key for e in chosen] == ["m2"]
        assert p.victims(entries, 11 * MB) is None  # cannot be done without them

    def test_impossible_is_none(self, name):
        p = make_policy(name)
        assert p.victims(table(p, [1, 2]), 100 * MB) is None


def test_lru_evicts_the_least_recently_used():
    p = LRU()
    entries = table(p, [10, 10, 10])
    p.touch(entries[0], 100)
    assert [e.key for e in p.victims(entries, 1)] == ["m1"]


def test_lfu_evicts_the_least_frequently_used():
    p = LFU()
    entries = table(p, [10, 10, 10])
    for t in range(5):
        p.touch(entries[1], 10 + t)
        p.touch(entries[2], 10 + t)
    assert [e.key for e in p.victims(entries, 1)] == ["m0"]


def test_gdsf_prefers_evicting_big_cheap_models_over_small_costly_ones():
    p = GDSF()
    big_cheap = Resident("big", 100 * MB, load_cost_s=0.1)
    small_costly = Resident("small", 10 * MB, load_cost_s=2.0)
    for e in (big_cheap, small_costly):
        p.touch(e, 0)
    # Even when the small one is older, the big cheap one goes first.
    p.touch(big_cheap, 5)
    assert [e.key for e in p.victims([big_cheap, small_costly], 1)] == ["big"]


def test_gdsf_clock_ages_old_popularity():
    p = GDSF()
    old = Resident("old", MB, load_cost_s=1.0)
    for t in range(10):
        p.touch(old, t)
    fresh = [Resident(f"f{i}", MB, load_cost_s=1.0) for i in range(3)]
    for round_ in range(20):  # a churn of one-use models raises the clock
        for e in fresh:
            p.touch(e, 100 + round_)
            e.uses = 0
        p.victims(fresh, 1)
    newcomer = Resident("new", MB, load_cost_s=1.0)
    p.touch(newcomer, 200)
    # The old model's ten early uses no longer outweigh one recent use.
    assert newcomer.priority > old.priority
    assert [e.key for e in p.victims([old, newcomer], 1)] == ["old"]


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="gdsf"):
        make_policy("fifo")
