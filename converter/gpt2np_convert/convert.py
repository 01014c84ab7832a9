"""Checkpoint folder -> model folder: the whole conversion, in one function."""

from __future__ import annotations

import json
from pathlib import Path

import gpt2np
from gpt2np import GPT2Error
from gpt2np.integrity import SUMS_FILE, format_sums
from gpt2np.outdir import atomic_output_dir

from .checkpoint import Checkpoint
from .download import FILES
from .progress import SILENT, Progress
from .writer import copy_file, write_file, write_safetensors

FORMAT_VERSION = "1"


def convert(checkpoint_dir: Path, out: Path, *, source: str, force: bool = False,
            progress: Progress = SILENT) -> None:
    """Write the model folder `out` from an OpenAI checkpoint folder; `out` appears only when whole."""
    missing = [name for name in FILES if not (checkpoint_dir / name).is_file()]
    if missing:
        raise GPT2Error(f"{checkpoint_dir}: not a GPT-2 checkpoint folder: missing {', '.join(missing)}")
    checkpoint = Checkpoint(checkpoint_dir)
    config = checkpoint.config
    metadata = {"format": "pt", "gpt2np.format_version": FORMAT_VERSION, "gpt2np.source": source,
                "gpt2np.converter": f"gpt2np {gpt2np.__version__}"}
    with atomic_output_dir(out, force=force) as tmp:
        digests = {
            "model.safetensors": write_safetensors(tmp / "model.safetensors", config.tensor_shapes(),
                                                   checkpoint.tensors(), metadata, progress=progress),
            "config.json": write_file(tmp / "config.json", (json.dumps(config.to_dict(), indent=2) + "\n").encode()),
            "vocab.json": copy_file(checkpoint_dir / "encoder.json", tmp / "vocab.json"),
            "merges.txt": copy_file(checkpoint_dir / "vocab.bpe", tmp / "merges.txt"),
        }
        write_file(tmp / SUMS_FILE, format_sums(digests).encode())
        gpt2np.load(tmp, matmul_backend="numpy")  # the runtime must accept what we wrote: header, shapes, tokenizer, config
    progress.note(f"wrote {out}")
