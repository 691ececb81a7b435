"""Which loaded models to evict when a new one needs room under the memory budget.

Three policies behind one interface, each a pure decision over a table the caller keeps:
- LRU: the least recently used goes first.
- LFU: the least frequently used goes first (ties: least recently used).
- GDSF (GreedyDual-Size-Frequency): priority = clock + uses x load_cost / size; the lowest
  goes first and the clock rises to the evicted priority, so large models that are cheap to
  reload and rarely used leave before small, costly, popular ones, and old popularity ages out.
Pinned entries and entries serving requests are never chosen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class Resident:
    """What the policy knows of one loaded unit."""

    key: str
    size_bytes: int
    load_cost_s: float = 1.0  # measured cold-load time: what an eviction costs to undo
    last_used: float = 0.0
    uses: int = 0
    pinned: bool = False
    in_use: int = 0  # requests in flight
    priority: float = 0.0  # GDSF's H value


class EvictionPolicy(Protocol):
    name: str

    def touch(self, entry: Resident, now: float) -> None:
        """A request used `entry` (also called once when it is loaded)."""

    def victims(self, entries: list[Resident], need_bytes: int) -> list[Resident] | None:
        """Entries to evict to free `need_bytes`, in order; None if it cannot be done."""


def _evictable(entries: list[Resident]) -> list[Resident]:
    return [e for e in entries if not e.pinned and e.in_use == 0]


def _take(ordered: list[Resident], need_bytes: int) -> list[Resident] | None:
    chosen, freed = [], 0
    for entry in ordered:
        if freed >= need_bytes:
            break
        chosen.append(entry)
        freed += entry.size_bytes
    return chosen if freed >= need_bytes else None


class LRU:
    name = "lru"

    def touch(self, entry: Resident, now: float) -> None:
        entry.last_used = now
        entry.uses += 1

    def victims(self, entries: list[Resident], need_bytes: int) -> list[Resident] | None:
        if need_bytes <= 0:
            return []
        return _take(sorted(_evictable(entries), key=lambda e: e.last_used), need_bytes)


class LFU(LRU):
    name = "lfu"

    def victims(self, entries: list[Resident], need_bytes: int) -> list[Resident] | None:
        if need_bytes <= 0:
            return []
        order = sorted(_evictable(entries), key=lambda e: (e.uses, e.last_used))
        return _take(order, need_bytes)


class GDSF:
    name = "gdsf"

    def __init__(self) -> None:
        self.clock = 0.0  # "L": rises to each evicted priority (ageing)

    def touch(self, entry: Resident, now: float) -> None:
        entry.last_used = now
        entry.uses += 1
        entry.priority = self.clock + entry.uses * entry.load_cost_s / max(entry.size_bytes, 1)

    def victims(self, entries: list[Resident], need_bytes: int) -> list[Resident] | None:
        if need_bytes <= 0:
            return []
        order = sorted(_evictable(entries), key=lambda e: (e.priority, e.last_used))
        chosen = _take(order, need_bytes)
        if chosen:
            self.clock = max(self.clock, chosen[-1].priority)
        return chosen


POLICIES: dict[str, type[LRU] | type[GDSF]] = {"lru": LRU, "lfu": LFU, "gdsf": GDSF}


def make_policy(name: str) -> EvictionPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown eviction policy {name!r}; use one of {sorted(POLICIES)}"
        ) from None
