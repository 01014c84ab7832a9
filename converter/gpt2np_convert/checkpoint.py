"""Read OpenAI's TensorFlow checkpoint variable by variable, under the model folder's names.

Only TensorFlow's checkpoint reader is used (`tf.train.load_checkpoint`): the graph in `.meta`
is never loaded. Every variable that hparams.json implies must be present with its shape and
dtype, and nothing else may be; the tensor list itself comes from `GPT2Config.tensor_shapes()`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from gpt2np import GPT2Config, GPT2Error

_LINEAR = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tf_name(name: str) -> str:
    """The checkpoint variable of a model folder tensor: `h.0.attn.c_attn.weight` -> `model/h0/attn/c_attn/w`."""
    parts = name.split(".")
    if parts[0] == "h":
        parts[:2] = ["h" + parts[1]]
    module = ".".join(parts[1:-1]) if parts[0].startswith("h") else ""
    if parts[-1] == "bias":
        parts[-1] = "b"
    elif module in _LINEAR:
        parts[-1] = "w"
    elif parts[0] in ("wte", "wpe"):
        parts.pop()
    else:
        parts[-1] = "g"  # layer norm gain
    return "model/" + "/".join(parts)


def config_from_hparams(path: Path) -> GPT2Config:
    """GPT2Config from OpenAI's hparams.json ({n_vocab, n_ctx, n_embd, n_head, n_layer})."""
    try:
        hp = json.loads(path.read_text(encoding="utf-8"))
        return GPT2Config(vocab_size=hp["n_vocab"], n_positions=hp["n_ctx"], n_embd=hp["n_embd"],
                          n_head=hp["n_head"], n_layer=hp["n_layer"])
    except FileNotFoundError:
        raise GPT2Error(f"{path}: not found") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GPT2Error(f"{path}: not a GPT-2 hparams.json ({type(e).__name__}: {e})") from None
    except GPT2Error as e:
        raise GPT2Error(f"{path}: {e}") from None


def import_tensorflow():
    """Import TensorFlow without the start-up chatter its C++ side writes straight to stderr."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow as tf
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    return tf


class Checkpoint:
    """An OpenAI GPT-2 checkpoint folder, checked against its hparams.json."""

    def __init__(self, folder: Path):
        tf = import_tensorflow()
        self.folder = folder
        self.config = config_from_hparams(folder / "hparams.json")
        prefix = folder / "model.ckpt"
        try:
            self._reader = tf.train.load_checkpoint(str(prefix))
            shapes = self._reader.get_variable_to_shape_map()
            dtypes = self._reader.get_variable_to_dtype_map()
        except Exception as e:  # TensorFlow raises its own error types for unreadable files
            raise GPT2Error(f"{prefix}: cannot read the TensorFlow checkpoint "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        self.expected = self.config.tensor_shapes()
        # Linear weights are stored as 1x1 convolutions: [1, in, out].
        wanted = {tf_name(n): (1, *s) if tf_name(n).endswith("/w") else s for n, s in self.expected.items()}
        for var, shape in wanted.items():
            if var not in shapes:
                raise GPT2Error(f"{folder}: checkpoint lacks variable {var}")
            if tuple(shapes[var]) != shape:
                raise GPT2Error(f"{folder}: variable {var} has shape {list(shapes[var])}, "
                                f"hparams.json implies {list(shape)}")
            if dtypes[var] != tf.float32:
                raise GPT2Error(f"{folder}: variable {var} is {dtypes[var].name}, expected float32")
        unexpected = sorted(set(shapes) - set(wanted))
        if unexpected:
            raise GPT2Error(f"{folder}: unexpected variable {unexpected[0]} "
                            f"({len(unexpected)} not part of GPT-2 for this hparams.json)")

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(model folder name, float32 array) in file order, reading one variable at a time."""
        for name, shape in self.expected.items():
            try:
                value = self._reader.get_tensor(tf_name(name))
            except Exception as e:
                raise GPT2Error(f"{self.folder}: cannot read variable {tf_name(name)} "
                                f"({type(e).__name__}); the checkpoint data file may be damaged") from None
            yield name, np.ascontiguousarray(value.reshape(shape), dtype=np.float32)
