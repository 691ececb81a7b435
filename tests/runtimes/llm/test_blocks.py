"""The KV block allocator: growth, freeing, prefix sharing and eviction."""

from __future__ import annotations

import pytest

from slimserve.errors import ResourceExhausted
from slimserve.runtimes.llm.blocks import SCRATCH_BLOCK, BlockAllocator, block_keys


def test_blocks_are_taken_as_needed_and_returned() -> None:
    pool = BlockAllocator(num_blocks=5, block_size=4)
    table, cached = pool.allocate_prompt(list(range(9)))  # 9 tokens: 3 blocks
    assert (len(table), cached, pool.free_count()) == (3, 0, 1)
    assert SCRATCH_BLOCK not in table
    pool.free(table)
    assert pool.free_count() == 4


def test_running_out_of_blocks_is_resource_exhausted() -> None:
    pool = BlockAllocator(num_blocks=3, block_size=4)
    with pytest.raises(ResourceExhausted, match="3 KV blocks asked, 2 free"):
        pool.allocate(3)


def test_a_shared_prefix_reuses_full_blocks_only() -> None:
    pool = BlockAllocator(num_blocks=10, block_size=4)
    first = list(range(10))  # blocks [0-3] [4-7] and a partial one
    table, _ = pool.allocate_prompt(first)
    pool.register(table, block_keys(first, 4))
    second = [*list(range(8)), 99, 98, 97]
    assert pool.blocks_to_admit(second) == 1  # 3 blocks, 2 of them cached
    shared, cached = pool.allocate_prompt(second)
    assert cached == 8 and shared[:2] == table[:2] and shared[2] != table[2]
    pool.free(table)
    assert pool.freeable(shared) == 3  # the first sequence's references are gone


def test_the_last_prompt_token_is_never_served_from_the_cache() -> None:
    pool = BlockAllocator(num_blocks=10, block_size=4)
    tokens = list(range(8))
    table, _ = pool.allocate_prompt(tokens)
    pool.register(table, block_keys(tokens, 4))
    _, cached = pool.allocate_prompt(tokens)
    assert cached == 4  # its logits are needed: the block holding it is recomputed


def test_unreferenced_cached_blocks_are_reused_then_evicted_lru() -> None:
    pool = BlockAllocator(num_blocks=4, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    table, _ = pool.allocate_prompt(tokens)
    pool.register(table, block_keys(tokens, 2))
    pool.free(table)
    assert pool.free_count() == 3  # cached blocks count as free
    assert pool.allocate_prompt(tokens)[1] == 4  # and still serve hits
    pool.free(pool.allocate(0))
    again = BlockAllocator(num_blocks=3, block_size=2)
    keyed, _ = again.allocate_prompt([1, 2, 3])
    again.register(keyed, block_keys([1, 2, 3], 2))
    again.free(keyed)
    again.allocate(2)  # needs the evictable block too
    assert again.cached_prefix([1, 2, 3]) == []


def test_prefix_caching_off_shares_nothing() -> None:
    pool = BlockAllocator(num_blocks=10, block_size=4, prefix_caching=False)
    tokens = list(range(12))
    table, _ = pool.allocate_prompt(tokens)
    pool.register(table, block_keys(tokens, 4))
    assert pool.allocate_prompt(tokens)[1] == 0


def test_block_keys_chain_the_whole_prefix() -> None:
    assert block_keys([1, 2, 3, 4], 2)[1] != block_keys([9, 9, 3, 4], 2)[1]
    assert block_keys([1, 2, 3], 2) == block_keys([1, 2], 2)
