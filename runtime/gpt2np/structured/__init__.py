"""Structured outputs: token masks for a `Constraint`, from llguidance (the extra `gpt2np[structured]`).

`compiler.py` turns a constraint into a checked llguidance grammar for GPT-2's vocabulary (a
bounded cache keyed by the constraint's text); `guide.py` follows one generation through it: the
tokens allowed next (`fill_masks`, a batch's masks together), what was generated, and the text
the constraint forces. The rule that applies the masks is the core's (`SequenceState`).
"""

from .compiler import CompileStats, compile_constraint, stats
from .guide import Guide, fill_masks

__all__ = ["CompileStats", "Guide", "compile_constraint", "fill_masks", "stats"]
