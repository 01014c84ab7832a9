"""BPE for long pieces: encoder.py's merges, done in NumPy rounds instead of one pair at a time.

One regex piece is a whole run of letters, digits or CJK characters, however long, and the
pair-at-a-time loop in `tokenizer.py` scans the piece once per merge: quadratic in its length
(16 KiB of one letter took 1.6 s). Here a piece of any length takes about 15 rounds of array
operations, each linear in the pairs it merges (4 MiB in about a second).

Why rounds give encoder.py's result exactly. encoder.py repeatedly takes the lowest-ranked pair
present and merges its occurrences left to right. Call the pairs present now "original", and let
T be the lowest rank of any pair that merging original pairs could create (each merge of a pair
makes at most two new pairs with its neighbours, which are original parts or merged original
pairs: four candidates per pair). Until encoder.py reaches rank T, every pair it merges is an
original pair below T, and it merges them in rank order, an occurrence losing its part to a
neighbour merged first (lower rank, or equal rank to its left). That outcome along each chain of
adjacent pairs has a closed form: a pair is merged exactly when the runs of ever-lower pairs on
its left and on its right both have even length. So one round merges all of those at once, and
the next round starts from what encoder.py would hold at rank T. (T is above the lowest rank
whenever merged tokens are made before the pairs that contain them, as in GPT-2; otherwise a
round merges the lowest-ranked pair alone, which is one step of encoder.py.)

Pairs are found in an open-addressing hash table of (left id, right id) -> (rank, merged id);
parts form a linked list over their first byte positions, so a round touches only what changes.
"""

from __future__ import annotations

import numpy as np

_HASH = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing: the high bits of key * 2^64 / phi


class PairTable:
    """The merges of a byte-level BPE vocabulary as arrays: `lookup(a, b)` gives the rank of
    each pair of token ids and the id it merges into (`none` and `stop` where no merge applies)."""

    def __init__(self, ranks: dict[tuple[str, str], int], encoder: dict[str, int], byte_tokens: list[int]):
        """`ranks`: merge pair (of token strings) -> rank; `encoder`: token string -> id;
        `byte_tokens[b]`: the id of the token for byte b."""
        self.n_vocab = max(encoder.values()) + 1
        self.none = max(ranks.values(), default=0) + 1  # the rank of a pair that does not merge
        self.stop = self.n_vocab  # a token id that merges with nothing: the ends of a piece
        self.ids = np.array(byte_tokens, np.int32)
        n = len(ranks)
        a, b, rank, merged = (np.empty(n, np.int64) for _ in range(4))
        for k, ((left, right), r) in enumerate(ranks.items()):
            a[k], b[k], rank[k], merged[k] = encoder[left], encoder[right], r, encoder[left + right]
        self.radix = self.n_vocab + 1  # keys: a * radix + b, for ids up to `stop`
        keys = a * self.radix + b

        # Open addressing with linear probing, load factor at most 1/2; key and value side by
        # side in one record (value: rank << shift | merged id), so that a probe reads one line.
        self.bits = max(int(2 * len(keys) - 1).bit_length(), 4)
        self.shift = int(self.radix).bit_length()
        self.slots = np.full((1 << self.bits, 2), -1, np.int64)
        slot = self._hash(keys)
        pending = np.arange(len(keys))
        while pending.size:
            free = self.slots[slot[pending], 0] == -1
            _, first = np.unique(slot[pending[free]], return_index=True)  # one key per free slot
            placed = pending[free][first]
            self.slots[slot[placed], 0] = keys[placed]
            self.slots[slot[placed], 1] = rank[placed] << self.shift | merged[placed]
            pending = np.setdiff1d(pending, placed, assume_unique=True)
            slot[pending] = (slot[pending] + 1) & ((1 << self.bits) - 1)
        # The lowest rank of any merge whose left (right) token is t: a pair (t, u) ranks at least
        # max(min_left[t], min_right[u]), which rules out most pairs without a probe.
        self.min_left = np.full(self.radix, self.none, np.int32)
        np.minimum.at(self.min_left, a, rank.astype(np.int32))
        self.min_right = np.full(self.radix, self.none, np.int32)
        np.minimum.at(self.min_right, b, rank.astype(np.int32))
        # The first round's pairs are pairs of byte tokens: a table of all 65,536.
        self.byte_rank, self.byte_merged = self.lookup(np.repeat(self.ids, 256), np.tile(self.ids, 256))

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        return (keys.view(np.uint64) * _HASH >> np.uint64(64 - self.bits)).view(np.int64)

    def _values(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """rank << shift | merged id of each pair (a[i], b[i]); none << shift | stop where it does not merge."""
        keys = a.astype(np.int64)
        keys *= self.radix
        keys += b
        slot = self._hash(keys)
        found = np.take(self.slots, slot, axis=0)  # (far faster than self.slots[slot])
        values = found[:, 1]
        missed = found[:, 0] != keys
        values[missed] = self.none << self.shift | self.stop
        pending = np.flatnonzero(missed & (found[:, 0] != -1))
        while pending.size:  # probe on past other keys, to the key or a free slot
            slot_p = (slot[pending] + 1) & ((1 << self.bits) - 1)
            slot[pending] = slot_p
            found = np.take(self.slots, slot_p, axis=0)
            hit = found[:, 0] == keys[pending]
            values[pending[hit]] = found[hit, 1]
            pending = pending[~hit & (found[:, 0] != -1)]
        return values

    def lookup(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rank, merged id) of each pair (a[i], b[i]) as int32: (`none`, `stop`) where it does not merge."""
        values = self._values(a, b)
        return (values >> self.shift).astype(np.int32), (values & ((1 << self.shift) - 1)).astype(np.int32)

    def lowest(self, a: np.ndarray, b: np.ndarray, below: int) -> int:
        """The lowest rank among the pairs (a[i], b[i]) if it is below `below`; else `below`.
        Only pairs whose tokens could start and end a merge below the answer are looked up:
        first those that could rank near the lowest possible, then any that could beat them."""
        bound = np.maximum(self.min_left[a], self.min_right[b])
        least = int(bound.min()) if bound.size else below
        if least >= below:
            return below
        cut = min(2 * least + 16, below)
        maybe = np.flatnonzero(bound < cut)
        best = min(int(self._values(a[maybe], b[maybe]).min()) >> self.shift, below)
        if best > cut:
            maybe = np.flatnonzero((bound >= cut) & (bound < best))
            if maybe.size:
                best = min(int(self._values(a[maybe], b[maybe]).min()) >> self.shift, best)
        return best


def _run_lengths(step: np.ndarray) -> np.ndarray:
    """For each i, how many consecutive True values of `step` end at i."""
    index = np.arange(len(step))
    last_false = np.where(step, -1, index)
    np.maximum.accumulate(last_false, out=last_false)
    return index - last_false


def merge(table: PairTable, data: bytes) -> np.ndarray:
    """The token ids of one piece (its UTF-8 bytes), exactly as encoder.py's merge loop gives them."""
    raw = np.frombuffer(data, np.uint8)
    n = len(raw)
    if n < 2:
        return table.ids[raw]
    none, stop = table.none, table.stop
    # Part i is the token that starts at byte i (while `alive[i]`); rank[i] and merged[i] are
    # those of its pair with the next part, nxt[i]. Node n stands for "no part" at both ends.
    parts = np.append(table.ids[raw], np.int32(stop))
    rank = np.full(n + 1, none, np.int32)
    merged = np.full(n + 1, stop, np.int32)
    code = raw[:-1].astype(np.int32)
    code <<= 8
    code |= raw[1:]
    rank[:n - 1], merged[:n - 1] = table.byte_rank[code], table.byte_merged[code]
    nxt = np.arange(1, n + 2, dtype=np.int32)
    nxt[n] = n
    prv = np.arange(-1, n, dtype=np.int32)
    prv[0] = n
    alive = np.ones(n, bool)
    while True:
        low = int(rank.min())
        if low == none:
            break
        # T, found by bands of rank: the candidates of the pairs below `band` bound T; pairs
        # from the band up to that bound may lower it further, so they are looked at next.
        threshold, band, seen = none, low + 1, -1
        while True:
            pairs = np.flatnonzero((rank < band) & (rank > seen))
            if pairs.size:
                x = merged[pairs]
                left, right = prv[pairs], nxt[nxt[pairs]]
                # each neighbour as it is, or merged with its own neighbour (if that may merge too)
                left2 = prv[left]
                left_merged = np.where(rank[left2] < band, merged[left2], stop)
                right_merged = np.where(rank[right] < band, merged[right], stop)
                threshold = table.lowest(np.concatenate((parts[left], left_merged, x, x)),
                                         np.concatenate((x, x, parts[right], right_merged)), threshold)
            if threshold <= band:
                break
            seen, band = band - 1, threshold
        threshold = max(threshold, low + 1)
        active = np.flatnonzero(rank < threshold)  # all of them were looked at above
        # Which active pairs merge: along each chain of adjacent pairs, those whose runs of
        # lower pairs (ties: the left one is lower) are of even length on both sides.
        r = rank[active]
        adjacent = nxt[active[:-1]] == active[1:]
        lower_left = np.zeros(len(active), bool)
        lower_left[1:] = adjacent & (r[:-1] <= r[1:])
        lower_right = np.zeros(len(active), bool)
        lower_right[:-1] = adjacent & (r[1:] < r[:-1])
        taken = active[(_run_lengths(lower_left) % 2 == 0) & (_run_lengths(lower_right[::-1])[::-1] % 2 == 0)]
        # Merge them: part i becomes the merged token, the part after it leaves the list.
        gone = nxt[taken]
        after = nxt[gone]
        parts[taken] = merged[taken]
        nxt[taken] = after
        prv[after] = taken
        prv[n] = n
        alive[gone] = False
        rank[gone] = none
        # The pairs that changed: each merged part's own, and the one of the part before it.
        changed = np.concatenate((taken, prv[taken]))
        changed = changed[changed < n]
        rank[changed], merged[changed] = table.lookup(parts[changed], parts[nxt[changed]])
    return parts[:n][alive]
