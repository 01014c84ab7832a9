"""A small, strict safetensors reader: one read-only mmap, tensors as zero-copy NumPy views.

safetensors layout: an 8-byte little-endian header length N, N bytes of JSON mapping each tensor name
to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the header),
an optional "__metadata__" of string to string, then the raw little-endian tensor bytes.

Nothing here reads tensor data: opening a file parses and checks the header, and the OS pages the
weights in when the model first touches them. Every number taken from the file is checked against
the file's size before anything is allocated from it.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from .errors import GPT2Error

MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype -> NumPy dtype. BF16 has no NumPy dtype: it is exposed as its raw uint16 bits.
DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


def _element_count(shape: list[int], limit: int) -> int:
    """The product of `shape`, or limit + 1 as soon as it exceeds `limit` (so a hostile shape with
    huge or many dimensions costs no big-number arithmetic: it is simply a mismatch)."""
    if 0 in shape:
        return 0
    count = 1
    for d in shape:
        count *= d
        if count > limit:
            return limit + 1
    return count


class SafetensorsFile:
    """An opened safetensors file.

    `tensors` maps names to read-only arrays that are views of one mmap of the file (no copy);
    `dtypes` gives each tensor's safetensors dtype name; `metadata` is the `__metadata__` dict.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < 8:
                    raise self._error(f"file is {size} bytes, shorter than the 8-byte header length")
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except FileNotFoundError:
            raise GPT2Error(f"{self.path}: not found") from None
        except IsADirectoryError:
            raise GPT2Error(f"{self.path}: is a directory, not a safetensors file") from None
        except (OSError, ValueError) as e:
            raise GPT2Error(f"{self.path}: cannot map the file ({e})") from None

        (n,) = struct.unpack("<Q", self._mmap[:8])
        if n > MAX_HEADER_BYTES:
            raise self._error(f"header length {n} exceeds the limit of {MAX_HEADER_BYTES} bytes")
        if 8 + n > size:
            raise self._error(f"header length {n} runs past the end of the {size}-byte file")
        header = self._parse_header(bytes(self._mmap[8:8 + n]))
        self.metadata = self._parse_metadata(header.pop("__metadata__", None))
        data_start, data_size = 8 + n, size - 8 - n
        self.tensors: dict[str, np.ndarray] = {}
        self.dtypes: dict[str, str] = {}
        spans = []
        for name, info in header.items():
            dtype, shape, (begin, end) = self._parse_entry(name, info, data_size)
            spans.append((begin, end, name))
            count = _element_count(list(shape), data_size)
            arr = np.frombuffer(self._mmap, dtype=DTYPES[dtype], count=count, offset=data_start + begin)
            self.tensors[name] = arr.reshape(shape)
            self.dtypes[name] = dtype
        self._check_spans(spans, data_size)

    def _error(self, problem: str) -> GPT2Error:
        return GPT2Error(f"{self.path}: invalid safetensors file: {problem}")

    def _parse_header(self, raw: bytes) -> dict:
        def no_duplicates(pairs):
            out = {}
            for key, value in pairs:
                if key in out:
                    raise self._error(f"duplicate name {key[:100]!r} in header")
                out[key] = value
            return out

        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self._error(f"header is not valid JSON ({type(e).__name__})") from None
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        return header

    def _parse_metadata(self, meta: object) -> dict[str, str]:
        if meta is None:
            return {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise self._error("__metadata__ must map strings to strings")
        return meta

    def _parse_entry(self, name: str, info: object, data_size: int):
        name = name if len(name) <= 200 else name[:200] + "..."
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise self._error(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise self._error(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise self._error(f"tensor {name!r}: shape must be a list of non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int for o in offsets)):
            raise self._error(f"tensor {name!r}: data_offsets must be two integers")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise self._error(f"tensor {name!r}: data_offsets {offsets} outside the {data_size} data bytes")
        nbytes = _element_count(shape, limit=data_size) * DTYPES[dtype].itemsize
        if nbytes != end - begin:
            raise self._error(f"tensor {name!r}: shape {shape} x {dtype} is {nbytes} bytes "
                              f"but data_offsets span {end - begin}")
        return dtype, tuple(shape), (begin, end)

    def _check_spans(self, spans, data_size: int) -> None:
        position = 0
        for begin, end, name in sorted(spans):
            if begin != position:
                what = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
                raise self._error(f"tensor {name!r}: data {what}")
            position = end
        if position != data_size:
            raise self._error(f"{data_size - position} bytes after the last tensor belong to none")


# Keys a Hugging Face `save_pretrained` folder may hold besides the weights: the causal-mask buffers
# of older transformers versions, and the LM head, which GPT-2 ties to `wte`.
def _is_hf_extra(name: str) -> bool:
    return name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias"))


def load_gpt2_weights(path: str | Path, config) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Open a GPT-2 `model.safetensors` and return ({canonical name: float32 array}, metadata).

    Accepts our own files and Hugging Face GPT-2 files (`transformer.` prefix, mask buffers,
    `lm_head.weight`). Every tensor that `config.tensor_shapes()` names must be present with that
    shape; any other tensor is an error. F32 tensors are zero-copy views; F16 and BF16 tensors are
    converted to float32 copies (NumPy has no fast half-precision matmul).
    """
    st = SafetensorsFile(path)
    expected = config.tensor_shapes()
    found: dict[str, tuple[str, np.ndarray]] = {}
    for name, array in st.tensors.items():
        short = name.removeprefix("transformer.")
        if short not in expected and _is_hf_extra(short):
            continue
        if short not in expected:
            raise GPT2Error(f"{path}: unexpected tensor {name!r} (not part of GPT-2 for this config)")
        if short in found:
            raise GPT2Error(f"{path}: tensor {short!r} appears twice (with and without 'transformer.')")
        found[short] = (name, array)
    weights = {}
    for short, shape in expected.items():
        if short not in found:
            raise GPT2Error(f"{path}: missing tensor {short!r}")
        name, array = found[short]
        if array.shape != shape:
            raise GPT2Error(f"{path}: tensor {name!r} has shape {list(array.shape)}, "
                            f"config.json implies {list(shape)}")
        weights[short] = _as_float32(array, st.dtypes[name], name, path)
    return weights, st.metadata


def _as_float32(array: np.ndarray, dtype: str, name: str, path) -> np.ndarray:
    if dtype == "F32":
        return array
    if dtype == "F16":
        return array.astype(np.float32)
    if dtype == "BF16":
        return from_bfloat16(array)
    raise GPT2Error(f"{path}: tensor {name!r} has dtype {dtype}; GPT-2 weights must be F32, F16 or BF16")


def from_bfloat16(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exactly: bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


_PAGE = mmap.PAGESIZE
_byte_bounds = getattr(getattr(np.lib, "array_utils", None), "byte_bounds", None) or getattr(np, "byte_bounds")
_MADV_DONTNEED = 4


def release_pages(array: np.ndarray) -> None:
    """Let go of the resident pages of a memory-mapped array's whole pages (madvise DONTNEED): the
    mapping stays valid, and a later read faults them in again from the page cache. Used once a
    weight has a packed copy, so that its plain pages are not a second resident copy."""
    import ctypes

    start, end = _byte_bounds(array)
    first, last = -(-start // _PAGE) * _PAGE, end // _PAGE * _PAGE
    if last > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
