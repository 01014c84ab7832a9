"""The prefix cache: positions already computed for a token-id prefix, reused by any later sequence
that starts with the same ids, so that only the rest of its prompt is computed.

Prefixes are cut into blocks of `BLOCK` tokens and keyed as vLLM keys them: a block's key hashes
its parent's key, its own ids and the sequence's salt, so a key names the whole prefix up to the
block's end, and sequences with different salts never share a block. Each block keeps its
positions' keys and values and, when the sequence that computed them scored its prompt, what it
takes to answer prompt log-probabilities from the cache: each position's log-normalizer, its
`TOP` most likely tokens with their logits, and the logit of the token that follows it. Cached
and computed positions so give the same floats (the same logits through the same expression).

A prompt's last, partial block is kept too, and a prompt whose next block is not cached reuses
the longest common start of any cached block that follows the same parent (a partial or a full
one): the 4 choices of a multiple-choice item share their context up to its last token, not only
up to its last full block. (vLLM reuses full blocks only.)

A sequence reuses all its cached positions, but computes the last one again when it needs that
position's logits: when the whole prompt is cached (they choose the first token) and when it
scores its prompt (the record holds the logit of the cached next token, not of its own). So every
logit a cache hit reports is one that a forward pass produced. A sequence reads its reused
positions where they lie (`KVCache.share`): no copy, as a segment is never written after it is
made. The least recently used blocks go first when the cache is over its byte budget; an evicted
block's memory lives on only while running sequences still read it. The blocks a sequence adds
share one allocation (a `KVSegment`), so that a later prompt reads a run of them as one piece, in
one product per layer rather than one per block. A segment is freed with its last block, and its
survivors move out once it is more than half unused, so the budget counts what is allocated.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass, fields

import numpy as np

from .config import GPT2Config
from .options import MAX_TOP_LOGPROBS

BLOCK = 16  # tokens per block
TOP = MAX_TOP_LOGPROBS  # alternatives kept per position: enough for any prompt_logprobs


@dataclass
class Stats:
    """What a block's positions answer prompt log-probabilities with (None where not scored)."""

    top: np.ndarray  # [B] max logit of each position (float32)
    log_sum: np.ndarray  # [B] log Σ exp(logits − max) (float64)
    top_ids: np.ndarray  # [B, TOP] most likely tokens, most likely first (ties by id)
    top_logits: np.ndarray  # [B, TOP] their logits (float32)
    next_logit: np.ndarray  # [B] at position i < B - 1, the logit of the block's token i + 1


STATS = tuple(f.name for f in fields(Stats))  # their names, as `SequenceState.record` names its arrays


class KVSegment:
    """Keys and values of consecutive positions of one prompt, which its blocks view."""

    def __init__(self, kT: np.ndarray, v: np.ndarray):
        self.kT, self.v = kT, v  # [n_layer, H, D, n], [n_layer, H, n, D]
        self.blocks: set[bytes] = set()  # the keys of its blocks in the cache

    @property
    def nbytes(self) -> int:
        return self.kT.nbytes + self.v.nbytes


@dataclass
class CachedBlock:
    key: bytes
    segment: KVSegment
    offset: int  # its first position in the segment
    size: int  # BLOCK, or fewer for a prompt's last, partial block
    entry_logit: float | None  # the logit, at the previous position, of this block's first token (None: unknown)
    stats: Stats | None  # for a partial block, its last position's may be missing (it is never reused)
    parent: bytes = b""  # the key of the block before it (for the first block: the salt's root)
    ids: np.ndarray | None = None  # its tokens (int64)

    @property
    def kT(self) -> np.ndarray:
        return self.segment.kT[..., self.offset:self.offset + self.size]

    @property
    def v(self) -> np.ndarray:
        return self.segment.v[:, :, self.offset:self.offset + self.size]

    @property
    def stats_bytes(self) -> int:
        return 0 if self.stats is None else sum(a.nbytes for a in vars(self.stats).values())


def root_key(salt: str | None) -> bytes:
    """The parent key of a prompt's first block."""
    return (salt or "").encode("utf-8")


def block_key(parent: bytes, ids: np.ndarray) -> bytes:
    """A block's key: its parent's key and its ids (int64), hashed; a partial block's differs
    from every full block's, as its ids are fewer."""
    return hashlib.blake2b(parent + ids.tobytes(), digest_size=16).digest()


def block_keys(ids, salt: str | None) -> list[bytes]:
    """The key of each full block of `ids`: each hashes its parent's key, its ids and the salt."""
    keys, parent = [], root_key(salt)
    arr = np.asarray(ids, dtype=np.int64)
    for start in range(0, len(arr) - BLOCK + 1, BLOCK):
        parent = block_key(parent, arr[start:start + BLOCK])
        keys.append(parent)
    return keys


class PrefixCache:
    """Blocks of computed positions under a byte budget, least recently used evicted first.

    `queries` and `hits` count prompt tokens looked up and found (as vLLM counts them)."""

    def __init__(self, config: GPT2Config, budget_bytes: int):
        self.config, self.budget = config, int(budget_bytes)
        self.blocks: collections.OrderedDict[bytes, CachedBlock] = collections.OrderedDict()
        self.children: dict[bytes, set[bytes]] = {}  # parent key -> keys of the cached blocks after it
        self.bytes = 0
        self.queries = self.hits = 0

    @staticmethod
    def bytes_per_position(config: GPT2Config) -> int:
        """What one cached position costs: its keys and values, and its scoring record."""
        return config.kv_bytes_per_position + 4 + 8 + TOP * 12 + 4

    def lookup(self, keys: list[bytes], need_stats: bool) -> list[CachedBlock]:
        """The cached blocks that begin the prefix with these keys, in order (with `need_stats`,
        only blocks that can answer prompt log-probabilities)."""
        found = []
        for key in keys:
            block = self.blocks.get(key)
            if block is None or need_stats and not _answers(block, after_another=bool(found)):
                break
            self.blocks.move_to_end(key)
            found.append(block)
        return found

    def partial(self, parent: bytes, ids: np.ndarray, need_stats: bool, first: bool) -> tuple[CachedBlock | None, int]:
        """Of the cached blocks after `parent`, the one whose ids begin with the longest run of
        `ids` (the next ids of a prompt whose next full block is not cached), and that run's length."""
        best, n = None, 0
        for key in self.children.get(parent, ()):
            block = self.blocks[key]
            common = common_prefix(block.ids, ids)
            if common > n and (not need_stats or _answers(block, after_another=not first)):
                best, n = block, common
        if best is not None:
            self.blocks.move_to_end(best.key)
        return best, n

    def insert(self, block: CachedBlock) -> None:
        """Keep `block` (replacing one with its key, which it may know more than), evicting the
        least recently used blocks to stay within the budget."""
        old = self._remove(block.key)
        if old is not None and block.stats is None and old.stats is not None:  # keep what the older one knew
            block.stats, block.entry_logit = old.stats, old.entry_logit
        need = block.stats_bytes + (0 if block.segment.blocks else block.segment.nbytes)
        if need > self.budget:
            return
        while self.bytes + need > self.budget and self.blocks:
            self._remove(next(iter(self.blocks)))
            need = block.stats_bytes + (0 if block.segment.blocks else block.segment.nbytes)
        self.bytes += need
        block.segment.blocks.add(block.key)
        self.blocks[block.key] = block
        self.children.setdefault(block.parent, set()).add(block.key)

    def _remove(self, key: bytes) -> CachedBlock | None:
        block = self.blocks.pop(key, None)
        if block is None:
            return None
        self.bytes -= block.stats_bytes
        siblings = self.children[block.parent]
        siblings.discard(key)
        if not siblings:
            del self.children[block.parent]
        seg = block.segment
        seg.blocks.discard(key)
        if not seg.blocks:
            self.bytes -= seg.nbytes
        elif 2 * sum(self.blocks[k].size for k in seg.blocks) <= seg.v.shape[2]:
            self.bytes -= seg.nbytes  # more than half unused: its blocks move to their own
            for k in list(seg.blocks):
                b = self.blocks[k]
                b.segment = KVSegment(b.kT.copy(order="K"), b.v.copy())  # "K": keys stay position-major
                b.segment.blocks.add(k)
                b.offset = 0
                self.bytes += b.segment.nbytes
            seg.blocks.clear()
        return block

    def __contains__(self, key: bytes) -> bool:
        return key in self.blocks


def _answers(block: CachedBlock, after_another: bool) -> bool:
    """Whether `block` can answer prompt log-probabilities (after another block, the logit
    leading into it must be known too)."""
    return block.stats is not None and (not after_another or block.entry_logit is not None)


def common_prefix(a, b) -> int:
    """How many ids two sequences of token ids share from their start."""
    a, b = np.asarray(a), np.asarray(b)
    m = min(len(a), len(b))
    return int(np.argmin(np.append(a[:m] == b[:m], False)))
