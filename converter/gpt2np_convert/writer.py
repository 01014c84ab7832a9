"""Write a model folder: safetensors streamed tensor by tensor (the folder is made whole atomically
by `gpt2np.outdir`)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from gpt2np import GPT2Error
from gpt2np.outdir import writing

from .progress import SILENT, Progress



def safetensors_header(shapes: dict[str, tuple[int, ...]], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and JSON header for float32 tensors laid out in the given order.

    The JSON is padded with spaces to a multiple of 8 bytes so that every tensor starts aligned.
    """
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape in shapes.items():
        end = offset + 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], tensors: Iterable[tuple[str, np.ndarray]],
                      metadata: dict[str, str], progress: Progress = SILENT) -> str:
    """Write the header from `shapes`, then each tensor as it arrives, in the same order.

    Memory stays at one tensor at a time. Each arriving tensor must match its declared name and
    shape, so the header can never describe something other than the data. Returns the file's
    SHA-256, computed on the way.
    """
    total = sum(4 * math.prod(s) for s in shapes.values())
    expected = iter(shapes.items())
    digest = hashlib.sha256()
    with progress.transfer(path.name, total) as advance, \
            writing(path), open(path, "wb") as f:
        header = safetensors_header(shapes, metadata)
        f.write(header)
        digest.update(header)
        for name, array in tensors:
            want_name, want_shape = next(expected, (None, None))
            if name != want_name or array.shape != want_shape or array.dtype != np.float32:
                raise GPT2Error(f"internal error: got tensor {name} {array.shape} {array.dtype}, "
                                f"expected {want_name} {want_shape} float32")
            data = np.ascontiguousarray(array, dtype="<f4").data
            f.write(data)
            digest.update(data)
            advance(array.nbytes)
        if next(expected, None) is not None:
            raise GPT2Error("internal error: fewer tensors than the header declares")
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def write_file(path: Path, data: bytes) -> str:
    """Write `data` durably; return its SHA-256."""
    with writing(path), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def copy_file(src: Path, dst: Path) -> str:
    """Copy durably; return the SHA-256 of what was written."""
    try:
        data = src.read_bytes()
    except OSError as e:
        raise GPT2Error(f"cannot read {src}: {e.strerror}") from None
    return write_file(dst, data)
