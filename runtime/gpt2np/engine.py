"""The decode loop: continuous batching of sequences, one forward pass per step.

Every front door drives this loop: `GPT2.generate`, `generate_batch` and `score`, `gpt-run`,
`gpt-serve`, the Ray stages and `gpt-explain`. Each `step()`:

1. drops cancelled sequences, then admits waiting ones while fewer than `max_batch` run;
2. gathers the positions each running sequence needs next: one token for a decoding sequence, a
   chunk of its prompt for one still reading it (at most `prefill_chunk` prompt tokens per step in
   all, so that decoding sequences keep moving while a long prompt is read);
3. runs them all through the model in one forward pass (one matrix product per weight), and the LM
   head once over the last position of every sequence whose prompt is read;
4. lets each of those sequences choose its token; finished ones leave at once.

Sequences never share state: each has its own cache, options, random stream, stop rules, timings
and error, so one that fails does not affect the others.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator, NamedTuple

import numpy as np

from .config import GPT2Config
from .model import Params, lm_head, transformer
from .options import Options
from .sampling import log_normalizers
from .sequence import SequenceState
from .tokenizer import Tokenizer

SCORE_ROWS = 256  # prompt logits for scoring are made this many rows at a time: [256, 50257] is 51 MB


class Event(NamedTuple):
    """What one step did to one sequence. A sequence's last event comes when it is done
    (`sequence.done`); one that ends without a token (cancelled, failed, or only scoring its
    prompt) gets an event whose `token` is None."""

    sequence: SequenceState
    token: int | None = None  # the token it chose
    text: str = ""  # the text that token releases (held back while it may begin a stop string)
    token_text: str = ""  # the token's own decoded text (`Generation.token_texts`)


class Engine:
    """A set of sequences decoded together. Not thread-safe: one thread calls `add` and `step`
    (`SequenceState.cancel` is the exception: any thread may call it).

    `max_batch`: the most sequences in one forward pass (None: no limit); others wait in order.
    `prefill_chunk`: the most prompt tokens read per step (None: whole prompts at once, the
    fastest for offline batches; a server sets it so that running streams are not held up).
    """

    def __init__(self, params: Params, config: GPT2Config, tokenizer: Tokenizer,
                 max_batch: int | None = None, prefill_chunk: int | None = None):
        if max_batch is not None and max_batch < 1 or prefill_chunk is not None and prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be at least 1")
        self.params, self.config, self.tokenizer = params, config, tokenizer
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.waiting: collections.deque[SequenceState] = collections.deque()
        self.running: list[SequenceState] = []
        self._ended: list[SequenceState] = []  # done before they ran: reported at the next step
        self._held: dict[int, SequenceState] = {}  # every sequence submitted, until its last event is out

    def add(self, prompt_ids: list[int], options: Options, tag=None, score_from: int = 1) -> SequenceState:
        """Queue a prompt. Raises `GPT2Error` if it cannot run (nothing is queued then)."""
        return self.submit(self.sequence(prompt_ids, options, score_from), tag)

    def add_failed(self, prompt_ids: list[int], options: Options, error: str, tag=None) -> SequenceState:
        """Queue a prompt that is already known to fail: it ends at the next step with `error`."""
        return self.submit(SequenceState(list(prompt_ids), options, self.config, self.tokenizer, error=error), tag)

    def sequence(self, prompt_ids: list[int], options: Options, score_from: int = 1) -> SequenceState:
        """A new sequence for this engine's model, checked but not queued (`GPT2Error` if it
        cannot run). Another thread may make it and hand it to the engine's thread to `submit`.
        `score_from`: with `prompt_logprobs`, the first prompt token to score (a scoring window
        scores only the tokens no earlier window scored)."""
        return SequenceState(list(prompt_ids), options, self.config, self.tokenizer, score_from=score_from)

    def submit(self, seq: SequenceState, tag=None) -> SequenceState:
        """Queue a sequence made by `sequence`; it joins the batch at a coming step."""
        if tag is not None:
            seq.tag = tag
        self._held[id(seq)] = seq
        (self._ended if seq.done else self.waiting).append(seq)
        return seq

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self._ended)

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
        for s in held:
            if not s.done:
                s.fail(message)
        return [Event(s) for s in held]

    def step(self) -> list[Event]:
        """Admit, run one forward pass, choose tokens; return this step's events in order.

        Never raises for a failure in the model or in one sequence: what failed ends with an
        error event (a failed pass fails the sequences in it, a failed choice only its own)."""
        events: list[Event] = [Event(s) for s in self._ended]
        self._ended = []
        for s in [*self.running, *self.waiting]:
            if s.cancelled and not s.done:
                s.drop()
                events.append(Event(s))
        self.running = [s for s in self.running if not s.done]
        self.waiting = collections.deque(s for s in self.waiting if not s.done)
        while self.waiting and (self.max_batch is None or len(self.running) < self.max_batch):
            s = self.waiting.popleft()
            if _guarded(s, events, "allocating its cache", s.admit)[0]:
                self.running.append(s)
        if self.running:
            self._pass(events)
            self.running = [s for s in self.running if not s.done]
        for e in events:
            if e.sequence.done:
                self._held.pop(id(e.sequence), None)
        return events

    def _pass(self, events: list[Event]) -> None:
        batch = self._positions()
        try:
            hidden = transformer(self.params, self.config, [(s.pending[:n], s.cache) for s, n in batch],
                                 all_positions=[s.scoring for s, _ in batch])
            ready = []
            for (s, n), h in zip(batch, hidden):
                first = s.cache.length - n
                s.pending = s.pending[n:]
                if s.scoring and not _guarded(s, events, "scoring the prompt", self._score, s, h, first)[0]:
                    continue
                if len(s.pending) == 0:
                    ready.append((s, h[-1:]))
            logits = norms = ()
            if ready:  # one LM head product serves them all
                logits = lm_head(self.params, np.concatenate([h for _, h in ready]))
                norms = zip(*log_normalizers(logits))
        except Exception as e:  # noqa: BLE001 -- a failed pass fails its sequences, never the loop
            for s, _ in batch:
                if not s.done:
                    s.fail(f"the forward pass failed: {type(e).__name__}: {e}")
                    events.append(Event(s))
            return
        for (s, _), row, norm in zip(ready, logits, norms):
            ok, chosen = _guarded(s, events, "choosing a token", s.accept, row, norm)
            if ok:
                events.append(Event(s, *chosen))

    def _positions(self) -> list[tuple[SequenceState, int]]:
        """How many pending positions of each running sequence go into this step's pass: all of a
        decoding sequence's one, and of the prompts being read at most `prefill_chunk` in all."""
        budget = self.prefill_chunk if self.prefill_chunk is not None else float("inf")
        batch = []
        for s in self.running:
            n = len(s.pending)
            if s.reading:  # a prompt (or a sliding window's restart)
                n = int(min(n, budget))
                budget -= n
            if n:
                batch.append((s, n))
        return batch

    def _score(self, s: SequenceState, h: np.ndarray, first: int) -> None:
        rows = s.score_rows(first, len(h))  # the LM head runs only over the positions that score
        for lo in range(rows.start, rows.stop, SCORE_ROWS):
            s.score_prompt(lm_head(self.params, h[lo:min(lo + SCORE_ROWS, rows.stop)]), first + lo)

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
        s.fail(f"{what} failed: {type(e).__name__}: {e}")
        events.append(Event(s))
        return False, None

