"""One generation's place in its constraint: the tokens allowed next, and the text it forces."""

from __future__ import annotations

import os
import time

import llguidance as llg
import llguidance.numpy as lln
import numpy as np

from ..constraint import Constraint
from ..errors import GPT2Error
from ..tokenizer import Tokenizer
from .compiler import compile_constraint, limits, ll_tokenizer, unpack

_executor: llg.LLExecutor | None = None


class Guide:
    """An llguidance matcher for one sequence, fed every token the sequence takes.

    `allowed` is the mask of the next token (booleans over the model's vocabulary), set by
    `fill_masks`; `compile_s` and `mask_s` are the seconds this sequence spent compiling its
    constraint (nothing on a cache hit but the matcher) and computing masks."""

    def __init__(self, constraint: Constraint, tokenizer: Tokenizer, n_vocab: int):
        started = time.perf_counter()
        grammar = compile_constraint(constraint, tokenizer)
        self.constraint, self.n_vocab = constraint, n_vocab
        lt = ll_tokenizer(tokenizer)
        self.matcher = llg.LLMatcher(lt, grammar, log_level=0, limits=limits())
        self.mask_width = lt.vocab_size  # llguidance's vocabulary: the bitmask's bits
        self.mask_s = 0.0
        self.masks = 0
        self.allowed: np.ndarray | None = None
        self.fill()  # the first mask (where a lexer warms up) here, on the caller's thread, not the engine's
        self.compile_s = time.perf_counter() - started

    @property
    def error(self) -> str | None:
        """What went wrong in the matcher (a limit of work reached), as one line; None if nothing."""
        return " ".join(self.matcher.get_error().split())[:300] or None if self.matcher.is_error() else None

    @property
    def accepting(self) -> bool:
        """The output so far is complete: the end of text is allowed."""
        return self.matcher.is_accepting()

    @property
    def finished(self) -> bool:
        """Complete and unable to go on: nothing but the end of text is allowed."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    def consume(self, tokens: list[int]) -> None:
        """Advance over tokens the sequence took (each allowed by the mask it was chosen from)."""
        self.matcher.consume_tokens(list(tokens))
        self.check()
        self.allowed = None

    def check(self) -> None:
        """Raise `GPT2Error` (field "constraint") if the matcher has failed (a limit of its work)."""
        if self.error:
            raise GPT2Error(f"the constraint failed: {self.error}", "constraint")

    def fill(self) -> None:
        """Set `allowed` (`fill_masks` of this guide alone)."""
        fill_masks([self])

    def forced(self) -> list[int]:
        """The tokens the constraint forces from here, that stay the same whatever follows them:
        the canonical tokens of the forced bytes, without a last token that could merge with the
        free text after it (llguidance's fast-forward tokens)."""
        return self.matcher.compute_ff_tokens()


def fill_masks(guides: list[Guide]) -> None:
    """Set each guide's `allowed` mask for its next token: one bitmask array for the batch, the
    masks computed in parallel (llguidance's executor, off the GIL), unpacked in one operation.
    A guide whose matcher fails gets `allowed` None (see `error`)."""
    global _executor
    started = time.perf_counter()
    bits = lln.allocate_token_bitmask(len(guides), guides[0].mask_width)  # one model: one vocabulary
    if len(guides) == 1:
        lln.fill_next_token_bitmask(guides[0].matcher, bits, 0)
    else:
        if _executor is None:
            _executor = llg.LLExecutor(num_threads=os.cpu_count() or 1)
        lln.fill_next_token_bitmask_par(_executor, [(g.matcher, i) for i, g in enumerate(guides)], bits)
    rows = unpack(bits, guides[0].n_vocab)
    share = (time.perf_counter() - started) / len(guides)
    for g, row in zip(guides, rows):
        g.mask_s += share
        g.masks += 1
        g.allowed = None if g.matcher.is_error() else row
