"""A model of PyTorch's CUDA caching allocator: what `max_memory_reserved` becomes.

Fed the allocation/free sequence of a training step (the execution path records it),
it replays the allocator's documented policy (c10/cuda/CUDACachingAllocator.cpp, defaults,
no PYTORCH_CUDA_ALLOC_CONF):

- every request is rounded up to a multiple of 512 bytes (kMinBlockSize);
- requests up to 1 MiB come from the small pool, whose segments are 2 MiB (kSmallBuffer);
  larger ones from the large pool, whose new segments are 20 MiB for requests under 10 MiB
  (kLargeBuffer) and the request rounded up to 2 MiB otherwise (kRoundLarge);
- a request takes the smallest free block of its pool that is big enough (best fit) and
  splits it when the rest is at least 512 bytes (small pool) or more than 1 MiB (large
  pool); an unsplit remainder stays with the block and counts as allocated;
- freed blocks merge with free neighbours of the same segment; segments are never given
  back (no empty_cache, no OOM retry), so reserved only grows.

What this does not model: expandable segments, per-stream pools (one stream assumed), the
cuBLAS workspace the allocator also serves, and allocations made before the model existed.
These constants are the allocator's defaults; the model has not been fitted on a GPU yet
(bench/gpu_estimator.py compares it with max_memory_reserved when one is available).
"""

from __future__ import annotations

import bisect

MIN_BLOCK = 512
SMALL_SIZE = 1 << 20
SMALL_BUFFER = 2 << 20
LARGE_BUFFER = 20 << 20
MIN_LARGE_ALLOC = 10 << 20
ROUND_LARGE = 2 << 20


def round_size(n: int) -> int:
    return MIN_BLOCK if n < MIN_BLOCK else -(-n // MIN_BLOCK) * MIN_BLOCK


def segment_size(n: int) -> int:
    if n <= SMALL_SIZE:
        return SMALL_BUFFER
    if n < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return -(-n // ROUND_LARGE) * ROUND_LARGE


class _Block:
    __slots__ = ("size", "seg", "offset", "prev", "next", "free", "small")

    def __init__(self, size, seg, offset, small):
        self.size, self.seg, self.offset, self.small = size, seg, offset, small
        self.prev = self.next = None
        self.free = True


class CachingAllocator:
    """Replays malloc/free by key; tracks allocated and reserved bytes and their peaks."""

    def __init__(self) -> None:
        self._pools: dict[bool, list[tuple]] = {True: [], False: []}   # small? -> sorted [(size, seg, offset, block)]
        self._live: dict = {}                 # key -> block
        self._segs = 0
        self.allocated = self.reserved = 0
        self.peak_allocated = self.peak_reserved = 0

    def malloc(self, key, nbytes: int) -> None:
        if nbytes <= 0 or key in self._live:
            return
        size = round_size(nbytes)
        small = size <= SMALL_SIZE
        block = self._best_fit(size, small) or self._new_segment(size, small)
        self._split(block, size)
        block.free = False
        self._live[key] = block
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)

    def free(self, key) -> None:
        block = self._live.pop(key, None)
        if block is None:
            return
        self.allocated -= block.size
        block.free = True
        for nb in (block.prev, block.next):
            if nb is not None and nb.free:
                block = self._merge(block, nb)
        self._insert(block)

    def reset_peaks(self) -> None:
        self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

    # ------------------------------------------------------------------ internals

    def _best_fit(self, size: int, small: bool):
        pool = self._pools[small]
        i = bisect.bisect_left(pool, (size, -1, -1))
        if i == len(pool):
            return None
        return pool.pop(i)[3]

    def _new_segment(self, size: int, small: bool) -> _Block:
        seg_bytes = SMALL_BUFFER if small else segment_size(size)
        self._segs += 1
        self.reserved += seg_bytes
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        return _Block(seg_bytes, self._segs, 0, small)

    def _split(self, block: _Block, size: int) -> None:
        rest = block.size - size
        if rest >= MIN_BLOCK if block.small else rest > SMALL_SIZE:
            tail = _Block(rest, block.seg, block.offset + size, block.small)
            tail.prev, tail.next = block, block.next
            if block.next is not None:
                block.next.prev = tail
            block.next = tail
            block.size = size
            self._insert(tail)

    def _insert(self, block: _Block) -> None:
        bisect.insort(self._pools[block.small], (block.size, block.seg, block.offset, block))

    def _remove(self, block: _Block) -> None:
        pool = self._pools[block.small]
        i = bisect.bisect_left(pool, (block.size, block.seg, block.offset))
        if i < len(pool) and pool[i][3] is block:
            pool.pop(i)

    def _merge(self, block: _Block, nb: _Block) -> _Block:
        self._remove(nb)
        first, second = (block, nb) if nb.offset > block.offset else (nb, block)
        first.size += second.size
        first.next = second.next
        if second.next is not None:
            second.next.prev = first
        return first
