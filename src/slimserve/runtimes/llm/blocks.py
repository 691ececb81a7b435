"""The KV block allocator: which block of the pool holds which sequence's tokens (no torch).

The KV cache is a pool of `num_blocks` fixed-size blocks (`block_size` token positions each).
A sequence owns a block table (block ids in position order) that grows one block at a time.

Prefix caching: a block completely filled with tokens gets a key, the hash of its tokens
chained with the key of the block before it, so equal keys mean equal token prefixes and
therefore equal K/V values. A new prompt looks its full blocks up by key and shares the blocks
found (reference counts). Only full blocks are shared and never written again, so no
copy-on-write is needed. A shared block whose last user finished stays in the key table as
"evictable": reused on a later hit, recycled (least recently used first) when the free list
is empty.

Block 0 is never handed out: padded positions of a batch write their K/V there (scratch).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Sequence

from slimserve.errors import ResourceExhausted

SCRATCH_BLOCK = 0


def block_keys(tokens: Sequence[int], block_size: int, parent: int | None = None) -> list[int]:
    """Chained keys of the full blocks of `tokens` (a partial last block gets none)."""
    keys: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        keys.append(parent)
    return keys


class BlockAllocator:
    """Free list, reference counts and the prefix-key table of one KV pool."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ResourceExhausted(
                f"a KV pool of {num_blocks} blocks holds nothing; raise the KV memory budget"
            )
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.prefix_caching = prefix_caching
        self._free: deque[int] = deque(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._key_of: dict[int, int] = {}  # block id -> key, for full registered blocks
        self._block_of: dict[int, int] = {}  # key -> block id
        self._evictable: OrderedDict[int, None] = OrderedDict()  # unreferenced keyed blocks

    @property
    def capacity(self) -> int:
        """Blocks a sequence may ever use (all but the scratch block)."""
        return self.num_blocks - 1

    def free_count(self) -> int:
        """Blocks obtainable now: never used or unreferenced (evictable) cached ones."""
        return len(self._free) + len(self._evictable)

    def cached_prefix(self, tokens: Sequence[int]) -> list[int]:
        """Blocks already holding the longest keyed prefix of `tokens[:-1]`.

        The last prompt token is always recomputed (its logits give the first output token),
        so a block containing it is never taken from the cache.
        """
        if not self.prefix_caching:
            return []
        found: list[int] = []
        for key in block_keys(tokens[:-1], self.block_size):
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def blocks_to_admit(self, tokens: Sequence[int]) -> int:
        """Free-pool blocks that admitting a prompt of `tokens` would consume."""
        hits = self.cached_prefix(tokens)
        new = -(-len(tokens) // self.block_size) - len(hits)
        revived = sum(1 for block in hits if self._refs[block] == 0)
        return new + revived

    def allocate_prompt(self, tokens: Sequence[int]) -> tuple[list[int], int]:
        """A block table for a prompt and the number of its tokens whose K/V is cached."""
        hits = self.cached_prefix(tokens)
        for block in hits:
            self._take(block)
        table = hits + self.allocate(-(-len(tokens) // self.block_size) - len(hits))
        return table, len(hits) * self.block_size

    def allocate(self, count: int) -> list[int]:
        """`count` fresh blocks (reference count 1), evicting cached ones if needed."""
        if count > self.free_count():
            raise ResourceExhausted(f"{count} KV blocks asked, {self.free_count()} free")
        return [self._take(self._pop_free()) for _ in range(count)]

    def register(self, table: Sequence[int], keys: Sequence[int]) -> None:
        """Record the keys of a sequence's full blocks so later prompts can share them."""
        if not self.prefix_caching:
            return
        for block, key in zip(table, keys, strict=False):
            if block in self._key_of or key in self._block_of:
                continue  # already shared, or an equal block computed concurrently
            self._key_of[block] = key
            self._block_of[key] = block

    def unregister(self, table: Sequence[int]) -> None:
        """Forget the keys of blocks whose contents cannot be trusted (a failed forward)."""
        for block in table:
            key = self._key_of.pop(block, None)
            if key is not None:
                del self._block_of[key]

    def free(self, table: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced keyed blocks stay reusable."""
        for block in table:
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._key_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def freeable(self, table: Sequence[int]) -> int:
        """Blocks that freeing `table` would return to the pool (those not shared)."""
        return sum(1 for block in table if self._refs[block] == 1)

    def _pop_free(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)  # least recently used
        del self._block_of[self._key_of.pop(block)]
        return block

    def _take(self, block: int) -> int:
        self._refs[block] += 1
        self._evictable.pop(block, None)
        return block
