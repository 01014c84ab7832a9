"""Write a model folder: safetensors streamed tensor by tensor, the folder made whole atomically."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from gpt2np import GPT2Error

from .progress import Progress


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
                      metadata: dict[str, str], progress: bool = True) -> None:
    """Write the header from `shapes`, then each tensor as it arrives, in the same order.

    Memory stays at one tensor at a time. Each arriving tensor must match its declared name and
    shape, so the header can never describe something other than the data.
    """
    total = sum(4 * math.prod(s) for s in shapes.values())
    bar = Progress(path.name, total, enabled=progress)
    expected = iter(shapes.items())
    with open(path, "wb") as f:
        f.write(safetensors_header(shapes, metadata))
        for name, array in tensors:
            want_name, want_shape = next(expected, (None, None))
            if name != want_name or array.shape != want_shape or array.dtype != np.float32:
                raise GPT2Error(f"internal error: got tensor {name} {array.shape} {array.dtype}, "
                                f"expected {want_name} {want_shape} float32")
            f.write(np.ascontiguousarray(array, dtype="<f4").data)
            bar.update(array.nbytes)
        if next(expected, None) is not None:
            raise GPT2Error("internal error: fewer tensors than the header declares")
        f.flush()
        os.fsync(f.fileno())
    bar.close()


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; on success it replaces `out` in one rename.

    On any failure the temporary folder is removed and `out` is as it was. An existing `out`
    that is not an empty folder is refused unless `force`.
    """
    if out.exists() and not _is_empty_dir(out) and not force:
        raise GPT2Error(f"{out} already exists and is not empty (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise GPT2Error(f"{out} exists and is not a folder")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model folder should not be
    except OSError as e:
        raise GPT2Error(f"cannot create the output folder next to {out}: {e.strerror}") from None
    try:
        yield tmp
        _fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)  # move aside first: the rename below needs the name free
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync_dir(parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def copy_file(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())
