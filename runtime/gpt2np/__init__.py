"""gpt2np: OpenAI's GPT-2 in pure NumPy.

    >>> import gpt2np
    >>> model = gpt2np.load("models/124M")          # maps the weights; reads nothing yet
    >>> model.encode("Hello world")
    [15496, 995]
    >>> for piece in model.generate("The meaning of life is", n_tokens=20):
    ...     print(piece, end="", flush=True)

A model folder holds `config.json`, `model.safetensors`, `vocab.json` and `merges.txt` (the layout of
a Hugging Face GPT-2 folder; see README.md). This file re-exports the public API, and first sets
how long OpenBLAS's idle threads spin (`gpt2np.parallel` says why) unless it is set already.
"""

import os

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "20")  # read when NumPy loads OpenBLAS: before numpy

from .api import GPT2, TextStream, load, load_tokenizer
from .config import GPT2Config
from .constraint import Constraint
from .engine import Engine
from .errors import GPT2Error
from .options import Options
from .reference import Trace
from .sampling import Sampling
from .score import TextScore
from .sequence import STOP_REASONS, Event, Generation, SequenceState
from .tokenizer import Tokenizer

__all__ = ["Constraint", "Engine", "Event", "GPT2", "GPT2Config", "GPT2Error", "Generation", "Options", "STOP_REASONS", "Sampling",
           "SequenceState", "TextScore", "TextStream", "Tokenizer", "Trace", "load", "load_tokenizer"]
__version__ = "0.1.0"
