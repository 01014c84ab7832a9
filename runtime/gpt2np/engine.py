"""The decode loop: continuous batching of sequences, one forward pass per step.

Every front door drives this loop: `GPT2.generate`, `generate_batch` and `score`, `gpt-run`,
`gpt-serve`, the Ray stages and `gpt-explain`. Each `step()`:

1. drops cancelled sequences, then admits waiting ones while fewer than `max_batch` run (with a
   prefix cache, the engine asks its `PrefixCacheManager`: an admitted prompt starts after the
   positions the cache holds for it, and one whose next blocks a running sequence is computing
   waits for them);
2. gathers the positions each running sequence needs next: one token for a decoding sequence, and
   for those still reading their prompt as much of it as the step's budget allows: at most
   `max_batched_tokens` positions in the pass, at most `prefill_chunk` prompt tokens, and, while
   other sequences decode, a chunk that `PrefillPacer` sizes so that their step is not slowed more
   than `prefill_stall` times (a lone prompt is read whole);
3. runs them all through the model in one forward pass (one matrix product per weight), and the LM
   head once over the last position of every sequence whose prompt is read;
4. lets each of those sequences choose its token; finished ones leave at once.

Sequences never share state: each has its own cache, options, random stream, stop rules, timings
and error, so one that fails does not affect the others.
"""

from __future__ import annotations

import collections
import time
from typing import Any, Iterator

import numpy as np

from .config import GPT2Config
from .constraint import fill_masks
from .errors import GPT2Error
from .kv import KVPool
from .model import Params, lm_head, transformer
from .options import Options
from .prefix_cache import PrefixCache, PrefixCacheManager
from .sampling import log_normalizers
from .sequence import Event, SequenceState
from .tokenizer import Tokenizer

KV_POOL_BYTES = 256 * 2**20  # at most this much of finished sequences' KV slots keeps its pages
SCORE_ROWS = 384  # prompt logits for scoring are made at most this many rows at a time: [384, 50257] is 77 MB


class PrefillPacer:
    """How many prompt tokens a step may read while other sequences decode, from measured step
    times: a step that reads them should take at most `stall` times a step that only decodes, so
    that the decoding streams' inter-token times stay even while a long prompt joins them.

    vLLM's chunked prefill reads a fixed number of tokens per step (`--max-num-batched-tokens`);
    a fixed number is too many for one stream on a slow machine and too few for many streams on
    a fast one. Here the chunk follows two moving averages: the time of a step that only decodes,
    and the time each prompt token adds to a step. It starts at `START` tokens, grows at most
    2x per step (a noisy estimate cannot make one step far too long) and never goes below `MIN`.
    """

    START, MIN, SMOOTHING = 16, 8, 0.25

    def __init__(self, stall: float):
        if not stall > 1:
            raise ValueError("prefill_stall must be more than 1")
        self.stall = stall
        self.decode_s: float | None = None  # a step with decoding sequences only
        self.token_s: float | None = None  # what one prompt token adds to a step
        self.last = self.START

    def observe(self, n_decoding: int, n_prompt: int, seconds: float, full: bool = True) -> None:
        """Record a step's time: its decoding sequences and the prompt tokens it read. `full`:
        it read the whole chunk offered, and no prompt began in it. A step that read less ended a
        prompt, and one that began a prompt first touched its new cache: their one-off costs
        (a first token, caching a prompt, page faults) would look like dear tokens, so such a
        step teaches nothing about tokens."""
        if n_prompt == 0:
            if n_decoding:
                self.decode_s = _average(self.decode_s, seconds, self.SMOOTHING)
        elif full and n_decoding and self.decode_s is not None:
            added = max(seconds - self.decode_s, 1e-6) / n_prompt
            self.token_s = _average(self.token_s, added, self.SMOOTHING)
            self.last = n_prompt

    def chunk(self) -> int:
        """The prompt tokens for the next step that also decodes."""
        if self.decode_s is None or self.token_s is None:
            return self.START
        fits = int((self.stall - 1) * self.decode_s / self.token_s)
        return max(self.MIN, min(fits, 2 * self.last))


def _average(old: float | None, new: float, weight: float) -> float:
    return new if old is None else old + weight * (new - old)


class Engine:
    """A set of sequences decoded together. Not thread-safe: one thread calls `add` and `step`
    (`SequenceState.cancel` is the exception: any thread may call it).

    `max_batch`: the most sequences in one forward pass (None: no limit); others wait in order.
    The budget of a step, in positions of one forward pass (each decoding sequence takes one;
    prompts being read share the rest, in order of arrival):
    `max_batched_tokens`: the most positions in a pass (vLLM's `--max-num-batched-tokens`;
    decoding sequences always run, so prompts wait while they alone fill it). `prefill_chunk`: the
    most prompt tokens read per step. `prefill_stall`: while sequences decode, prompts are read
    in chunks that keep their step within about this many times a step that only decodes (see
    `PrefillPacer`; a server sets it so that running streams are not held up). None for each:
    no limit, so whole prompts at once, the fastest for offline batches.
    `prefix_cache`: a `gpt2np.prefix_cache.PrefixCache` (engines may share one; None: none).
    With one, a prompt starting with ids already computed reuses those positions, and a prompt
    whose next blocks another running sequence is computing waits for them instead of computing
    them again.
    """

    def __init__(self, params: Params, config: GPT2Config, tokenizer: Tokenizer,
                 max_batch: int | None = None, prefill_chunk: int | None = None,
                 prefix_cache: PrefixCache | None = None, max_batched_tokens: int | None = None,
                 prefill_stall: float | None = None):
        if any(n is not None and n < 1 for n in (max_batch, prefill_chunk, max_batched_tokens)):
            raise ValueError("max_batch, prefill_chunk and max_batched_tokens must be at least 1")
        full_cache = config.kv_bytes_per_position * config.n_positions
        self.kv_pool = KVPool(config, min(2 * full_cache, KV_POOL_BYTES))  # every sequence's cache: arena slots
        self.pacer = PrefillPacer(prefill_stall) if prefill_stall is not None else None
        self._offered = 0  # the prompt tokens the pacer allowed this step
        self.max_batched_tokens = max_batched_tokens
        self.prefix_cache = prefix_cache
        self.prefix = PrefixCacheManager(prefix_cache, config, self.kv_pool) if prefix_cache is not None else None
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.waiting: collections.deque[SequenceState] = collections.deque()
        self.running: list[SequenceState] = []
        self._ended: list[SequenceState] = []  # done before they ran: reported at the next step
        self._held: dict[int, SequenceState] = {}  # every sequence submitted, until its last event is out

    def add(self, prompt_ids: list[int], options: Options, tag=None, score_from: int = 1,
            salt: str | None = None) -> SequenceState:
        """Queue a prompt. Raises `GPT2Error` if it cannot run (nothing is queued then)."""
        return self.submit(self.sequence(prompt_ids, options, score_from, salt), tag)

    def add_failed(self, prompt_ids: list[int], options: Options, error: str, tag=None) -> SequenceState:
        """Queue a prompt that is already known to fail: it ends at the next step with `error`."""
        return self.submit(SequenceState(list(prompt_ids), options, self.config, self.tokenizer, error=error), tag)

    def sequence(self, prompt_ids: list[int], options: Options, score_from: int = 1,
                 salt: str | None = None) -> SequenceState:
        """A new sequence for this engine's model, checked but not queued (`GPT2Error` if it
        cannot run). Another thread may make it and hand it to the engine's thread to `submit`.
        `score_from`: with `prompt_logprobs`, the first prompt token to score (a scoring window
        scores only the tokens no earlier window scored). `salt`: sequences with different salts
        never share cached positions."""
        return SequenceState(list(prompt_ids), options, self.config, self.tokenizer, score_from=score_from, salt=salt)

    def submit(self, seq: SequenceState, tag=None) -> SequenceState:
        """Queue a sequence made by `sequence`; it joins the batch at a coming step."""
        if tag is not None:
            seq.tag = tag
        seq.kv_pool = self.kv_pool
        self._held[id(seq)] = seq
        (self._ended if seq.done else self.waiting).append(seq)
        return seq

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self._ended or self.prefix is not None and self.prefix.busy)

    @property
    def n_running(self) -> int:
        """Sequences in the batch (after the last step)."""
        return len(self.running)

    def cancel_all(self) -> None:
        """Cancel every sequence the engine holds: they end at the next step."""
        for s in self._held.values():
            s.cancel()

    def fail_all(self, message: str) -> list[Event]:
        """End every sequence the engine holds (submitted, and its last event not yet returned)
        with `message` and let go of them: the way out when a step itself broke (a bug), so that
        no caller waits for an event that will not come."""
        held = list(self._held.values())
        self._held, self._ended, self.running, self.waiting = {}, [], [], collections.deque()
        if self.prefix is not None:
            self.prefix.clear()
        for s in held:
            if not s.done:
                s.fail(message)
        return [s.event() for s in held]

    def step(self) -> list[Event]:
        """Admit, run one forward pass, choose tokens; return this step's events in order.

        Never raises for a failure in the model or in one sequence: what failed ends with an
        error event (a failed pass fails the sequences in it, a failed choice only its own)."""
        events: list[Event] = [s.event() for s in self._ended]
        self._ended = []
        if self.prefix is not None:
            self.prefix.flush(events)
        for s in [*self.running, *self.waiting]:
            if s.cancelled and not s.done:
                s.drop()
                events.append(s.event())
        self.running = [s for s in self.running if not s.done]
        self.waiting = collections.deque(s for s in self.waiting if not s.done)
        blocked = []
        while self.waiting and (self.max_batch is None or len(self.running) < self.max_batch):
            s = self.waiting.popleft()
            if self.prefix is not None and self.prefix.reader(s) is not None:  # it waits for a running one's blocks
                blocked.append(s)
            elif _guarded(s, events, "allocating its cache", self._admit, s)[0]:
                self.running.append(s)
        self.waiting.extendleft(reversed(blocked))
        if self.running:
            self._pass(events)
            self.running = [s for s in self.running if not s.done]
        for e in events:
            if e.sequence.done:
                self._held.pop(id(e.sequence), None)
                if self.prefix is not None:
                    self.prefix.forget(e.sequence)
        return events

    def _pass(self, events: list[Event]) -> None:
        batch = self._positions()
        batch += self._borrowers(batch)
        if not batch:  # every running sequence is reading a prompt and the budget is spent
            return
        reading = [n for s, n in batch if s.reading]  # before the pass: it ends their reading
        began = any(s.reading and s.cache.length == (s.result.cached_tokens if s.fresh else 0) for s, _ in batch)
        started = time.perf_counter()
        self._pass_positions(batch, events)
        if self.pacer is not None:
            self.pacer.observe(len(batch) - len(reading), sum(reading), time.perf_counter() - started,
                               full=sum(reading) == self._offered and not began)

    def _pass_positions(self, batch: list[tuple[SequenceState, int]], events: list[Event]) -> None:
        try:
            hidden = transformer(self.params, self.config, [(s.pending[:n], s.cache) for s, n in batch],
                                 all_positions=[s.scoring or bool(s.forced) for s, _ in batch],
                                 borrows=[self.prefix.borrow(s) if self.prefix else None for s, _ in batch])
            scored = []
            for (s, n), h in zip(batch, hidden):
                scored.append((s, h, s.cache.length - n))
                s.pending = s.pending[n:]
            ready = [(s, h) for s, h, _ in scored if len(s.pending) == 0]
            # The last positions of those that now choose a token (and of tokens a constraint
            # forced, for their log-probabilities): their logits come from the scoring product (one
            # LM head product serves them all).
            choosing = [h[-1 - len(s.forced):] for s, h in ready if s.options.n_tokens]
            rows = self._score([job for job in scored if job[0].scoring], events,
                               np.concatenate(choosing) if choosing else None)
            if self.prefix is not None:
                for s, _ in batch:
                    if self.prefix.lent(s):
                        _guarded(s, events, "reading a shared prompt", self.prefix.take_lent, s)
                for s, _ in ready:  # their prompts go into the prefix cache at the next step
                    self.prefix.hold(s)
            norms = log_normalizers(rows) if rows is not None else None
        except Exception as e:  # noqa: BLE001 -- a failed pass fails its sequences, never the loop
            for s, _ in batch:
                if not s.done:
                    s.fail(f"the forward pass failed: {type(e).__name__}: {e}")
                    events.append(s.event())
            return
        guided = [s for s, _ in ready if s.guide is not None and s.guide.allowed is None and not s.done]
        if guided:  # the batch's constraint masks, together
            try:
                fill_masks([s.guide for s in guided])
            except Exception:  # noqa: BLE001 -- each then fills its own in `accept`, and fails alone
                pass
        at = 0
        for s, _ in ready:
            n = 1 + len(s.forced) if s.options.n_tokens else 0
            block = (rows[at:at + n], (norms[0][at:at + n], norms[1][at:at + n])) if n else (None, None)
            at += n
            if s.done:  # its scoring failed
                continue
            ok, taken = _guarded(s, events, "choosing a token", s.accept, *block)
            if ok:
                events += s.events(taken)

    def _positions(self) -> list[tuple[SequenceState, int]]:
        """How many pending positions of each running sequence go into this step's pass: a
        decoding sequence's one, and of the prompts being read (a prompt, or a sliding window's
        restart) what the step's budget leaves, in order."""
        decoding = sum(1 for s in self.running if not s.reading and len(s.pending))
        budget = min(self.prefill_chunk or np.inf, (self.max_batched_tokens or np.inf) - decoding)
        if decoding and self.pacer is not None:
            budget = self._offered = min(budget, self.pacer.chunk())
        batch = []
        for s in self.running:
            n = len(s.pending)
            if s.reading:
                n = int(min(n, max(budget, 0)))
                budget -= n
            if n:
                batch.append((s, n))
        return batch

    def _score(self, jobs: list[tuple[SequenceState, np.ndarray, int]], events: list[Event],
               also: np.ndarray | None = None) -> np.ndarray | None:
        """Score the prompt positions just read by each scoring sequence (`jobs`: the sequence, its
        hidden states, the position of their first row); return the logits of the hidden states
        `also` [n, E], made in the same products. The LM head runs only over the rows that score,
        of every sequence together, in products of equal size up to `SCORE_ROWS` rows: a step that
        reads the short tails of several prompts makes one product, not one each."""
        jobs = [(s, h[rows], first + rows.start) for s, h, first in jobs for rows in [s.score_rows(first, len(h))]]
        if also is not None:
            jobs.append((None, also, 0))
        total = sum(len(h) for _, h, _ in jobs)
        # Equal products: the LM head costs twice as much a row at 64 rows as at 256 or more.
        size = -(-total // -(-total // SCORE_ROWS)) if total else 0
        chunk: list[tuple[SequenceState | None, int, np.ndarray]] = []
        room, rows = size, []
        for s, h, position in jobs:
            while len(h):
                chunk.append((s, position, h[:room]))
                taken = len(chunk[-1][2])
                h, position, room = h[taken:], position + taken, room - taken
                if room == 0:
                    rows += self._score_chunk(chunk, events)
                    chunk, room = [], size
        if chunk:
            rows += self._score_chunk(chunk, events)
        return None if also is None else np.concatenate(rows) if len(rows) > 1 else rows[0]

    def _score_chunk(self, chunk: list[tuple[SequenceState | None, int, np.ndarray]],
                     events: list[Event]) -> list[np.ndarray]:
        """One LM head product over the chunk's rows: the sequences' scored, and the logits of the
        rows of no sequence (`_score`'s `also`) returned."""
        logits = lm_head(self.params, np.concatenate([h for _, _, h in chunk]) if len(chunk) > 1 else chunk[0][2])
        row, out = 0, []
        for s, position, h in chunk:
            if s is None:
                out.append(logits[row:row + len(h)])
            else:
                if self.prefix is not None and self.prefix.lent(s) and not s.done:  # lent positions' scores first
                    _guarded(s, events, "reading a shared prompt", self.prefix.take_lent, s)
                if not s.done:
                    _guarded(s, events, "scoring the prompt", s.score_prompt, logits[row:row + len(h)], position)
            row += len(h)
        return out

    def _borrowers(self, batch: list[tuple[SequenceState, int]]) -> list[tuple[SequenceState, int]]:
        """Waiting sequences that join this pass, lent their shared prefix by a sequence in it that
        reads the rest of its prompt in this pass (the prefix cache decides who may lend what)."""
        if self.prefix is None:
            return []
        whole = {id(s) for s, n in batch if s.reading and s.fresh and n == len(s.pending)}
        rows, joined = sum(n for _, n in batch), []
        for s in list(self.waiting):
            if self.max_batch is not None and len(self.running) >= self.max_batch:
                break
            lend = self.prefix.lendable(s, whole)
            if lend is None:
                continue
            reader, n = lend
            if self.max_batched_tokens is not None and rows + len(s.result.prompt_ids) - n > self.max_batched_tokens:
                continue
            if not _guarded(s, [], "allocating its cache", self.prefix.lend, s, reader, n)[0]:
                continue  # it failed: its last event comes from the waiting queue's check next step
            self.waiting.remove(s)
            self.running.append(s)
            joined.append((s, len(s.pending)))
            rows += len(s.pending)
        return joined

    def _admit(self, s: SequenceState) -> None:
        """Give `s` its place and cache (with a prefix cache, after the positions it holds for it)."""
        if self.prefix is not None:
            self.prefix.admit(s)
        else:
            s.admit()

    def events(self) -> Iterator[Event]:
        """Step until every sequence is done, yielding events as they come."""
        while not self.idle:
            yield from self.step()

    def run(self) -> None:
        """Step until every sequence is done."""
        for _ in self.events():
            pass


def _guarded(s: SequenceState, events: list[Event], what: str, f, *args) -> tuple[bool, Any]:
    """(True, f(*args)); or, if it raises, fail `s` alone, add its last event, (False, None)."""
    try:
        return True, f(*args)
    except Exception as e:  # noqa: BLE001 -- one sequence's failure is its own
        s.fail(f"{what} failed: {e}" if isinstance(e, GPT2Error) else f"{what} failed: {type(e).__name__}: {e}")
        events.append(s.event())
        return False, None
