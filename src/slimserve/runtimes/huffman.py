"""Canonical Huffman coding of small-alphabet integer streams (numpy, no per-bit Python).

A code is described by one length per symbol (0 = symbol absent); canonical codes are assigned
in (length, symbol) order, so the lengths alone reconstruct the code (as in DEFLATE). Lengths
are capped at `MAX_LENGTH` bits by halving the frequencies until they fit, which keeps the
decoding table at 2^MAX_LENGTH entries and lets each length be written as one hex digit.

Bits are packed most significant first into bytes (`np.packbits` order).
"""

from __future__ import annotations

import heapq

import numpy as np

MAX_LENGTH = 15  # one hex digit per symbol in a stored code description


def lengths_to_text(lengths: np.ndarray) -> str:
    """Code lengths as hex digits, one per symbol, trailing absent symbols dropped: "3302"."""
    text = "".join(f"{int(n):x}" for n in lengths)
    return text.rstrip("0")


def lengths_from_text(text: str, alphabet: int) -> np.ndarray:
    """Inverse of `lengths_to_text`, padded with zeros to `alphabet` symbols."""
    if len(text) > alphabet:
        raise ValueError(f"{len(text)} code lengths for an alphabet of {alphabet}")
    lengths = np.zeros(alphabet, dtype=np.int64)
    lengths[: len(text)] = [int(c, 16) for c in text]
    return lengths


def code_lengths(freqs: np.ndarray, limit: int = MAX_LENGTH) -> np.ndarray:
    """Huffman code length per symbol (int64, 0 where the frequency is 0)."""
    freqs = np.asarray(freqs, dtype=np.int64)
    while True:
        lengths = _lengths(freqs)
        if lengths.max(initial=0) <= limit:
            return lengths
        freqs = np.where(freqs > 0, np.maximum(freqs // 2, 1), 0)  # flatten, then retry


def _lengths(freqs: np.ndarray) -> np.ndarray:
    lengths = np.zeros(len(freqs), dtype=np.int64)
    present = np.flatnonzero(freqs)
    if len(present) == 1:  # one symbol still needs one bit per occurrence
        lengths[present] = 1
    if len(present) <= 1:
        return lengths
    # Heap of (weight, tie-break, symbols under this node); merging adds 1 to their depth.
    heap = [(int(freqs[s]), int(s), [int(s)]) for s in present]
    heapq.heapify(heap)
    while len(heap) > 1:
        w1, t1, s1 = heapq.heappop(heap)
        w2, t2, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (w1 + w2, min(t1, t2), s1 + s2))
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Code value per symbol (uint64), given the lengths; absent symbols get 0."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(len(lengths), dtype=np.uint64)
    code, prev_len = 0, 0
    for s in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[s]) - prev_len
        codes[s] = code
        code, prev_len = code + 1, int(lengths[s])
    return codes


def encoded_bits(freqs: np.ndarray, lengths: np.ndarray) -> int:
    """Bits the stream takes with this code."""
    return int((np.asarray(freqs, dtype=np.int64) * lengths).sum())


def encode(symbols: np.ndarray, lengths: np.ndarray) -> tuple[bytes, int]:
    """(packed bytes, number of bits) of `symbols` under the canonical code of `lengths`."""
    symbols = np.asarray(symbols, dtype=np.int64)
    if symbols.size == 0:
        return b"", 0
    codes = canonical_codes(lengths)[symbols]
    lens = lengths[symbols]
    total = int(lens.sum())
    starts = np.cumsum(lens) - lens
    owner = np.repeat(np.arange(len(symbols)), lens)  # which symbol each output bit belongs to
    j = np.arange(total) - starts[owner]  # bit index within that symbol's code, MSB first
    shift = (lens[owner] - 1 - j).astype(np.uint64)
    bits = ((codes[owner] >> shift) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits).tobytes(), total


def decode(data: bytes, nbits: int, count: int, lengths: np.ndarray) -> np.ndarray:
    """`count` symbols from the first `nbits` bits of `data` (int64 array).

    Vectorised: the code starting at every bit position is looked up in one table, then the
    chain of start positions (p -> p + length) is followed by pointer doubling, O(n log n).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    width = int(lengths.max(initial=0))
    if width == 0 or width > MAX_LENGTH or len(data) * 8 < nbits:
        raise ValueError("corrupt Huffman section: bad code lengths or too few bytes")
    sym_table, len_table = _table(lengths, width)
    bits = np.zeros(nbits + width, dtype=np.int64)
    bits[:nbits] = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[:nbits]
    window = np.zeros(nbits, dtype=np.int64)  # the `width` bits starting at each position
    for j in range(width):
        window = (window << 1) | bits[j : j + nbits]
    starts = _chain(np.minimum(np.arange(nbits) + len_table[window], nbits), count)
    if starts[-1] >= nbits or len_table[window[starts]].min() == 0:
        raise ValueError("corrupt Huffman section: the stream ends before its last symbol")
    decoded: np.ndarray = sym_table[window[starts]]
    return decoded


def _table(lengths: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Symbol and code length for every `width`-bit prefix (length 0: no code)."""
    sym_table = np.zeros(1 << width, dtype=np.int64)
    len_table = np.zeros(1 << width, dtype=np.int64)
    codes = canonical_codes(lengths)
    for s in np.flatnonzero(lengths):
        pad = width - int(lengths[s])
        lo = int(codes[s]) << pad
        sym_table[lo : lo + (1 << pad)] = s
        len_table[lo : lo + (1 << pad)] = lengths[s]
    return sym_table, len_table


def _chain(nxt: np.ndarray, count: int) -> np.ndarray:
    """Positions 0, nxt[0], nxt[nxt[0]], ... (`count` of them), by pointer doubling."""
    nxt = np.append(nxt, len(nxt))  # the end maps to itself
    pos = np.zeros(count, dtype=np.int64)
    steps = np.arange(count)
    jump = nxt
    k = 0
    while (1 << k) < count:
        take = (steps >> k) & 1 == 1
        pos[take] = jump[pos[take]]
        jump = jump[jump]
        k += 1
    return pos
