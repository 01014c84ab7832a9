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
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from .config import GPT2Config
from .kv import KVCache, KVPool, first_positions
from .options import MAX_TOP_LOGPROBS

if TYPE_CHECKING:
    from .sequence import Event, SequenceState

BLOCK = 16  # tokens per block
TOP = MAX_TOP_LOGPROBS  # alternatives kept per position: enough for any prompt_logprobs


@dataclass
class Stats:
    """What a block's positions answer prompt log-probabilities with (None where not scored)."""

    max_logit: np.ndarray  # [B] the largest logit of each position (float32)
    log_sum: np.ndarray  # [B] log Σ exp(logits − max) (float64)
    top_ids: np.ndarray  # [B, TOP] most likely tokens, most likely first (ties by id)
    top_logits: np.ndarray  # [B, TOP] their logits (float32)
    next_logit: np.ndarray  # [B] at position i < B - 1, the logit of the block's token i + 1


    @classmethod
    def zeros(cls, n: int) -> "Stats":
        return cls(np.zeros(n, np.float32), np.zeros(n), np.zeros((n, TOP), np.int64), np.zeros((n, TOP), np.float32),
                   np.zeros(n, np.float32))

    def rows(self, span: slice) -> "Stats":
        """Views of positions `span`, of the same type."""
        return type(self)(*(getattr(self, f.name)[span] for f in fields(self)))


STATS = tuple(f.name for f in fields(Stats))


@dataclass
class PromptRecord(Stats):
    """A prompt's scoring per position, kept while it is read (`SequenceState.score_prompt`) so that
    its blocks go into the cache with their `Stats`: what a sequence hands the cache."""

    scored: np.ndarray  # [n] which positions are scored

    @classmethod
    def zeros(cls, n: int) -> "PromptRecord":
        return cls(*vars(Stats.zeros(n)).values(), np.zeros(n, bool))

    def stats(self, a: int, b: int) -> Stats:
        """A copy of positions a..b-1 as a block keeps them."""
        return Stats(*(getattr(self, name)[a:b].copy() for name in STATS))


@dataclass
class PrefixSlot:
    """What the prefix cache tracks of one sequence (`SequenceState.prefix`)."""

    salt: str | None = None  # sequences with different salts never share cached positions
    keys: list[bytes] = field(default_factory=list)  # the keys of the prompt's blocks, hashed once
    cached_blocks: int = 0  # how many of them came from the cache
    record: PromptRecord | None = None  # its prompt's scoring, when it scores and may be cached
    lender: Any = None  # the sequence that lends this pass its first positions, if any


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


class PrefixCacheManager:
    """What an engine asks of the prefix cache (one per engine; engines may share the cache).

    It owns, for the engine's sequences: the lookup at admission (a prompt starts after the
    positions the cache holds for it, read in place), the in-flight claims (a prompt whose next
    blocks a running sequence is computing waits for them, or borrows them inside that sequence's
    pass), the insertion of a read prompt's blocks (at the step after its first token, so that
    the copy is not on that token's way; its KV slot is held until then), and the counters of
    prompt tokens looked up and found. The engine keeps admission order, the step budget, the
    pass and scoring; it calls these methods and touches none of this state.
    """

    def __init__(self, cache: PrefixCache, config: GPT2Config, kv_pool: KVPool):
        self.cache, self.config, self.kv_pool = cache, config, kv_pool
        self._inflight: dict[bytes, SequenceState] = {}  # block keys a running sequence will add
        self._held: list[tuple[SequenceState, KVCache]] = []  # prompts read, cached at the next step

    @property
    def busy(self) -> bool:
        """Prompts are held, to be cached at the next step."""
        return bool(self._held)

    # ------------------------------------------------------------------------------ admission
    def cacheable(self, s: SequenceState) -> bool:
        return s.fresh and len(s.pending) == len(s.result.prompt_ids) > BLOCK

    def reader(self, s: SequenceState) -> SequenceState | None:
        """The running sequence computing the next uncached blocks of `s`'s prompt, if any: then
        `s` waits, and reads them from the cache, or from that sequence in the same pass, instead
        of computing them again."""
        if not self.cacheable(s):
            return None
        keys = self._keys(s)
        m = next((i for i, key in enumerate(keys) if key not in self.cache), len(keys))
        reader = self._inflight.get(keys[m]) if m < len(keys) else None
        if reader is None or reader.done or s.scoring and not reader.scoring:
            return None  # a scoring prompt needs positions whose scores are kept
        return reader

    def admit(self, s: SequenceState) -> None:
        """Give `s` its cache, reusing what the cache holds of its prompt: its cached full blocks,
        then the longest common start of a cached block after them (all but the last of those
        positions when that one's logits are needed: `_reusable`)."""
        if not self.cacheable(s):
            s.admit()
            return
        prompt = s.result.prompt_ids
        blocks = self.cache.lookup(self._keys(s), need_stats=s.scoring)
        self._track(s, len(blocks))
        start = len(blocks) * BLOCK
        parent = blocks[-1].key if blocks else root_key(s.prefix.salt)
        partial, n = self.cache.partial(parent, np.asarray(prompt[start:start + BLOCK], np.int64), s.scoring,
                                        not blocks)
        reused = _reusable(s, start + n)
        if reused <= 0:
            s.admit()
            return
        pieces = [(b, BLOCK) for b in blocks] + ([(partial, n)] if n else [])
        runs = [(seg.kT[..., at:at + m], seg.v[:, :, at:at + m]) for seg, at, m in _position_runs(pieces)]
        s.admit(first_positions(runs, reused))  # read in place: segments are never written again
        self._skip(s, reused)
        if s.scoring:
            s.take_cached(_record(pieces), reused)

    # -------------------------------------------------------------------------------- lending
    def lendable(self, s: SequenceState, reading_whole: set[int]) -> tuple[SequenceState, int] | None:
        """(lender, n) if a sequence that reads the rest of its prompt in this pass (its id in
        `reading_whole`) can lend waiting `s` its first n positions (the 4 choices of an item,
        arriving together, are read in the pass that reads their context, not one pass later)."""
        reader = self.reader(s)
        if reader is None or id(reader) not in reading_whole or (s.scoring and reader.prefix.record is None):
            return None
        n = _reusable(s, common_prefix(reader.result.prompt_ids, s.result.prompt_ids))
        return (reader, n) if n >= 1 else None

    def lend(self, s: SequenceState, reader: SequenceState, n: int) -> None:
        """Admit `s` with its first n positions lent by `reader`: those `reader` reads from the
        cache in place, `s` reads there too; the rest are copied in the pass."""
        s.admit(first_positions(reader.cache.prefix, n))
        self._track(s, n // BLOCK)  # those blocks are the reader's: it caches them
        self._skip(s, n)
        s.prefix.lender = reader

    def borrow(self, s: SequenceState) -> tuple[KVCache, int] | None:
        """For the pass: the lender's cache and where `s`'s own positions begin, if it borrows."""
        lender = s.prefix.lender
        return (lender.cache, s.cache.length) if lender is not None else None

    def lent(self, s: SequenceState) -> bool:
        return s.prefix.lender is not None

    def take_lent(self, s: SequenceState) -> None:
        """The lent positions' scoring, from the lender's record (scored in this pass)."""
        lender, s.prefix.lender = s.prefix.lender, None
        if not s.scoring:
            return
        if lender.done and lender.result.error is not None:
            raise RuntimeError("the sequence sharing its prompt failed")
        n = s.result.cached_tokens
        s.take_cached(lender.prefix.record.rows(slice(0, n)), n)

    # ------------------------------------------------------------------------------ insertion
    def hold(self, s: SequenceState) -> None:
        """`s` has read its prompt (this pass): its blocks go into the cache at the next step,
        and its KV slot stays held until then (`KVPool.keep`), even if `s` ends."""
        if s.fresh and not s.done:
            self.kv_pool.keep(s.cache)
            self._held.append((s, s.cache))

    def flush(self, events: list[Event]) -> None:
        """Keep the prompts read in the last step (`hold`). A failure is its sequence's alone."""
        for s, kv in self._held:
            try:
                self._insert(s, kv)
            except Exception as e:  # noqa: BLE001 -- one sequence's failure is its own
                self.forget(s)
                if not s.done:
                    s.fail(f"caching the prompt failed: {type(e).__name__}: {e}")
                    events.append(s.event())
            self.kv_pool.give(kv)
        self._held = []

    def _insert(self, s: SequenceState, kv: KVCache) -> None:
        """Keep the blocks of `s`'s prompt that the cache lacks, now that every position is
        computed (in `kv`), and its last, partial block."""
        prompt, rec, keys = s.result.prompt_ids, s.prefix.record, s.prefix.keys
        ids = np.asarray(prompt, np.int64)
        span, segment, first = self._segment_positions, None, 0  # a segment may not fill the budget alone
        for k in range(s.prefix.cached_blocks, (len(prompt) + BLOCK - 1) // BLOCK):
            a, b = k * BLOCK, min((k + 1) * BLOCK, len(prompt))
            if segment is None or a >= first + span:
                first = a
                end = min(first + span, len(prompt))
                segment = KVSegment(*kv.positions(first, end))
            parent = keys[k - 1] if k else root_key(s.prefix.salt)
            stats = entry = None
            # Stats need every position of the block scored (but a partial block's last: no one
            # reuses that one), and, after the first block, the logit leading into it.
            last = b if b - a == BLOCK else b - 1
            if rec is not None and last <= len(prompt) - 1 and rec.scored[a:last].all() and (k == 0 or rec.scored[a - 1]):
                stats = rec.stats(a, b)
                entry = float(rec.next_logit[a - 1]) if k else None
            key = keys[k] if k < len(keys) else block_key(parent, ids[a:b])
            self.cache.insert(CachedBlock(key, segment, a - first, b - a, entry, stats, parent, ids[a:b]))
        self.forget(s)
        s.prefix.record = None

    @property
    def _segment_positions(self) -> int:
        """The most positions one segment holds: whole blocks, at most a quarter of the budget."""
        per_position = self.cache.bytes_per_position(self.config)
        return max(1, self.cache.budget // (4 * per_position * BLOCK)) * BLOCK

    # ---------------------------------------------------------------------------- bookkeeping
    def forget(self, s: SequenceState) -> None:
        """`s` is done: its claims on blocks it would have added go."""
        for key in s.prefix.keys:
            if self._inflight.get(key) is s:
                del self._inflight[key]

    def clear(self) -> None:
        """Let go of everything (the engine failed every sequence it held)."""
        for _, kv in self._held:
            self.kv_pool.give(kv)
        self._held, self._inflight = [], {}

    def _keys(self, s: SequenceState) -> list[bytes]:
        """The cache keys of `s`'s prompt blocks, hashed once (a waiting sequence is checked every step)."""
        if not s.prefix.keys:
            s.prefix.keys = block_keys(s.result.prompt_ids, s.prefix.salt)
        return s.prefix.keys

    def _track(self, s: SequenceState, cached_blocks: int) -> None:
        """Count `s`'s prompt as looked up, keep its scoring for the cache, and claim the blocks
        after its first `cached_blocks` as ones it will add (others wait for them)."""
        self._keys(s)
        if s.scoring:
            s.prefix.record = PromptRecord.zeros(len(s.result.prompt_ids))
        s.prefix.cached_blocks = cached_blocks
        self.cache.queries += len(s.result.prompt_ids)
        for key in s.prefix.keys[cached_blocks:]:
            self._inflight.setdefault(key, s)

    def _skip(self, s: SequenceState, n: int) -> None:
        """`s` starts after its first n positions (a cache hit)."""
        s.skip_cached(n)
        self.cache.hits += n


def _reusable(s: SequenceState, shared: int) -> int:
    """Of the first `shared` positions of `s`'s prompt, already computed, how many it reuses: all
    but the last when that one's logits are needed, because it ends the prompt (they choose the
    first token) or because `s` scores its prompt (they score its next token, which the cached
    record does not hold for a token that differs); else all of them."""
    needs_last = s.scoring or shared >= len(s.result.prompt_ids)
    return max(shared - 1, 0) if needs_last else shared


def _position_runs(pieces: list[tuple[CachedBlock, int]]) -> Iterator[tuple[KVSegment, int, int]]:
    """(segment, offset, positions) of each run of consecutive positions of one segment among
    the first m positions of each block (`pieces`)."""
    run = None
    for b, m in pieces:
        if run is not None and run[0] is b.segment and run[1] + run[2] == b.offset:
            run[2] += m
        else:
            if run is not None:
                yield tuple(run)
            run = [b.segment, b.offset, m]
        if m < b.size:  # a partial reuse ends the prompt's reused positions
            break
    if run is not None:
        yield tuple(run)


def _record(pieces: list[tuple[CachedBlock, int]]) -> PromptRecord:
    """The scoring of the reused positions: the first m positions of each block (`pieces`)."""
    out = {name: np.concatenate([getattr(b.stats, name)[:m] for b, m in pieces]) for name in STATS}
    at = 0
    for b, m in pieces:  # the logit that leads into each block is kept with that block
        if at:
            out["next_logit"][at - 1] = b.entry_logit
        at += m
    return PromptRecord(**out, scored=np.ones(at, bool))
