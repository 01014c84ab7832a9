"""The KV memory: where the keys and values of every position processed so far live.

`KVCache` is one sequence's (preallocated, written in place, possibly beginning with positions
read in place from the prefix cache); `KVArena` holds several sequences' caches in one mapping,
a slot each, so that a step's decoding sequences attend together (`model.DecodeGroup`); `KVPool`
is where an engine's caches come from and go back to. `model.py` computes with these; it does
not manage memory.
"""

from __future__ import annotations

import mmap
from contextlib import contextmanager

import numpy as np

from .config import GPT2Config


@contextmanager
def small_pages():
    """Allocate without NumPy's huge-page hint (a KV cache's arrays). Huge pages buy little for
    arrays that are written a few positions at a time, and with the kernel's usual `defrag=madvise`
    a hinted array's first writes may stall in direct compaction: a fresh 75 MB cache took 56 ms
    to page in (median; up to 166), against 15 ms without the hint, all inside the step that began
    its prompt."""
    hint = getattr(np._core.multiarray, "_set_madvise_hugepage", None)  # NumPy's switch, if it has one
    before = hint(False) if hint is not None else None
    try:
        yield
    finally:
        if hint is not None:
            hint(before)


class KVCache:
    """Keys and values of every position processed so far, preallocated and written in place.

    `k` and `v` are [n_layer, H, capacity, D], position-major, so that memory is touched only as
    positions are written (`kT` is `k` seen as [n_layer, H, D, capacity], for q @ kT products).
    Positions [0, length) are valid. The arrays are the cache's own, or a slot of a `KVArena`
    (`slot` = (arena, index)), where a step's decoding sequences attend together.

    A cache may begin with a shared, read-only `prefix`: runs of positions that another array
    holds (the prefix cache's), read where they are instead of copied in: (kT [n_layer, H, D, m],
    v [n_layer, H, m, D]) each, `shared` positions in all. The own arrays then hold positions
    `shared` onwards, at index position − shared; `capacity` counts both.
    """

    def __init__(self, config: GPT2Config, capacity: int | None = None,
                 slot: tuple[KVArena, int] | None = None):
        if slot is not None:
            arena, i = slot
            self.k, self.v = arena.k[i], arena.v[i]
        else:
            capacity = config.n_positions if capacity is None else capacity
            L, H, D = config.n_layer, config.n_head, config.head_dim
            with small_pages():
                self.k = np.empty((L, H, capacity, D), dtype=np.float32)
                self.v = np.empty((L, H, capacity, D), dtype=np.float32)
        self.kT = self.k.swapaxes(2, 3)
        self.slot = slot
        self.touched = 0  # positions of the slot's pages that an earlier sequence touched (`KVPool`)
        self.length = 0
        self.prefix: list[tuple[np.ndarray, np.ndarray]] = []
        self.shared = 0

    @property
    def capacity(self) -> int:
        return self.shared + self.v.shape[2]

    def share(self, prefix: list[tuple[np.ndarray, np.ndarray]]) -> None:
        """Begin this (empty) cache with `prefix`'s positions, read in place."""
        self.prefix = list(prefix)
        self.shared = self.length = sum(v.shape[2] for _, v in self.prefix)

    def positions(self, first: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """New arrays with the keys [L, H, D, n] (a view of position-major [L, H, n, D], as `kT`)
        and values [L, H, n, D] of positions [first, end)."""
        runs = self.prefix + [(self.kT[..., :self.length - self.shared], self.v[:, :, :self.length - self.shared])]
        ks, vs, at = [], [], 0
        for kT, v in runs:
            n = v.shape[2]
            a, b = max(first - at, 0), min(end - at, n)
            if a < b:
                ks.append(kT[..., a:b].swapaxes(2, 3))
                vs.append(v[:, :, a:b])
            at += n
        with small_pages():  # the prefix cache keeps these: see `small_pages`
            return np.concatenate(ks, axis=2).swapaxes(2, 3), np.concatenate(vs, axis=2)


def first_positions(runs: list[tuple[np.ndarray, np.ndarray]], n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Of runs of consecutive positions (kT [L, H, D, m], v [L, H, m, D]), those that hold the
    first n positions (or all there are), the last one cut short: views, not copies."""
    out, left = [], n
    for kT, v in runs:
        if left <= 0:
            break
        out.append((kT[..., :left], v[:, :, :left]))
        left -= v.shape[2]
    return out


class KVArena:
    """The caches of several sequences in one array, a slot each, so that the sequences of a step
    that decode one position each attend in a few batched products (`DecodeGroup`) instead of
    one by one (64 sequences of 124M at context 64, side by side in one run: 194-199 ms a step
    against 204; what is left is mostly reading the keys and values, as `make bench` shows).

    Slot i holds keys `k[i]` and values `v[i]`, [n_layer, H, n_positions, D] each. The memory is
    an anonymous mapping: its pages are zero until a position is written (so a slot costs only
    the positions it holds, and what padding reads is zeros or an earlier sequence's keys and
    values, finite either way), and `release` gives a slot's pages back to the system.
    """

    BYTES = 2 * 2**30  # at most this much address space per arena (some systems refuse more at once)

    def __init__(self, config: GPT2Config, slots: int):
        L, H, D, P = config.n_layer, config.n_head, config.head_dim, config.n_positions
        half = config.kv_bytes_per_position * P // 2  # the keys (or values) of one slot, in bytes
        self.stride = -(-2 * half // mmap.PAGESIZE) * mmap.PAGESIZE  # slots begin on a page
        self.memory = mmap.mmap(-1, self.stride * slots, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        kv = np.ndarray((slots, 2, L, H, P, D), dtype=np.float32, buffer=self.memory,
                        strides=(self.stride, half, H * P * D * 4, P * D * 4, D * 4, 4))
        self.k, self.v = kv[:, 0], kv[:, 1]
        self.slots = slots

    @classmethod
    def slots_for(cls, config: GPT2Config) -> int:
        return max(1, min(16, cls.BYTES // (config.kv_bytes_per_position * config.n_positions)))

    def release(self, i: int) -> None:
        """Give slot i's pages back to the system (they read as zeros after)."""
        self.memory.madvise(mmap.MADV_DONTNEED, i * self.stride, self.stride)


class KVPool:
    """Where an engine's caches come from: slots of `KVArena`s, made as needed. `take` gives the
    free slot that comes first (so that the running sequences' slots stay close together, and
    their decode steps batch over few idle slots). A freed slot keeps its pages for the next
    sequence (a fresh cache's first writes page-fault its memory in: about 10 ms for a
    900-position cache of 124M, on the critical path of a cached prompt's first token) while the
    free slots hold at most `max_bytes`; beyond that, the last free slots give theirs back."""

    def __init__(self, config: GPT2Config, max_bytes: int):
        self.config, self.max_bytes = config, max_bytes
        self.arenas: list[KVArena] = []
        self.free: list[tuple[int, int]] = []  # (arena, slot) of the free slots, kept sorted
        self.touched: dict[tuple[int, int], int] = {}  # positions whose pages a free slot holds
        self.kept: dict[tuple[int, int], int] = {}  # holders beyond the first of a slot in use (`keep`)

    def take(self, capacity: int) -> KVCache:
        if capacity > self.config.n_positions:
            raise ValueError(f"a cache of {capacity} positions exceeds the model's context")
        if not self.free:
            self.arenas.append(KVArena(self.config, KVArena.slots_for(self.config)))
            self.free = [(len(self.arenas) - 1, i) for i in range(self.arenas[-1].slots)]
        a, i = self.free.pop(0)
        cache = KVCache(self.config, slot=(self.arenas[a], i))
        cache.touched = self.touched.pop((a, i), 0)
        return cache

    def keep(self, cache: KVCache) -> None:
        """One more holder of `cache` (taken, not yet given): its slot is free only when every
        holder has given it back."""
        at = self._at(cache)
        self.kept[at] = self.kept.get(at, 0) + 1

    def _at(self, cache: KVCache) -> tuple[int, int]:
        arena, i = cache.slot
        return self.arenas.index(arena), i

    def give(self, cache: KVCache) -> None:
        at = self._at(cache)
        if self.kept.get(at):  # another holder still reads it
            self.kept[at] -= 1
            return
        self.touched[at] = max(cache.touched, cache.length - cache.shared)
        cache.share([])  # let go of what it read in place
        self.free.append(at)
        self.free.sort()
        while sum(self.touched.values()) * self.config.kv_bytes_per_position > self.max_bytes:
            last = max(self.touched)
            self.arenas[last[0]].release(last[1])
            del self.touched[last]
