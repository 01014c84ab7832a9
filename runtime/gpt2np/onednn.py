"""oneDNN's matmul primitive through its stable C API (ctypes): the optional backend of the matmul seam.

The library comes from the extra `gpt2np[onednn]` (PyPI's `onednn-cpu-gomp`, oneDNN 3.2, CPU only,
OpenMP from the system's libgomp), or from `GPT2NP_DNNL_LIB`, a path to any `libdnnl.so` of the
3.x API. Nothing here runs unless the seam asks for it (`gpt2np.matmul.prepare`).

A weight [K, N] is reordered once into the blocked layout oneDNN picks for it (the same for every
row count: checked, and a row count that would want another falls back to NumPy), and the
primitives are made per product shape and row count, shared by every weight of that shape (a
model's 12 or 48 layers use four shapes). Activations and outputs are float32 NumPy arrays handed
to oneDNN by pointer, with no copies, except where the weights are held at bfloat16 or int8 and
each product's activations are converted to match (`matmul.PRECISIONS`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading
from pathlib import Path

import numpy as np

from .matmul import PRECISIONS
from .weights import from_bfloat16  # noqa: F401 -- the inverse of `to_bfloat16`, beside it for its users

ENV_LIB = "GPT2NP_DNNL_LIB"
BF16, F32, S8 = 2, 3, 5  # dnnl_bf16, dnnl_f32, dnnl_s8
FORMAT_ANY, CPU, IN_ORDER = 1, 1, 1  # dnnl_format_tag_any, dnnl_cpu, dnnl_stream_in_order
ARG_SRC, ARG_WEIGHTS, ARG_DST = 1, 33, 17
ARG_ATTR_SCALES = 4096  # DNNL_ARG_ATTR_SCALES, or'ed with the argument the scales are of
QUERY_EXEC_ARG_MD = 255

_P = ctypes.c_void_p
_Dims = ctypes.c_int64 * 12


class _Arg(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_int), ("memory", _P)]


class OneDNNError(RuntimeError):
    pass


class LibraryMissing(OneDNNError):
    """No libdnnl to load: the extra is not installed."""


def library_path() -> str:
    """Where libdnnl is: `GPT2NP_DNNL_LIB`, else the extra's wheel (the environment's lib/), else
    the system's."""
    given = os.environ.get(ENV_LIB)
    if given:
        return given
    for prefix in {sys.prefix, sys.base_prefix}:
        for name in ("libdnnl.so.3", "libdnnl.so"):
            if (Path(prefix) / "lib" / name).exists():
                return str(Path(prefix) / "lib" / name)
    found = ctypes.util.find_library("dnnl")
    if found is None:
        raise LibraryMissing("libdnnl not found (pip install 'gpt2np[onednn]', or set GPT2NP_DNNL_LIB)")
    return found


class OneDNN:
    """One CPU engine and stream of a loaded libdnnl."""

    def __init__(self, path: str | None = None):
        try:
            self.lib = lib = ctypes.CDLL(path or library_path())
        except OSError as e:
            raise OneDNNError(f"cannot load libdnnl: {e}") from None
        lib.dnnl_primitive_desc_query_md.restype = _P
        lib.dnnl_memory_desc_get_size.restype = ctypes.c_size_t
        lib.dnnl_memory_desc_equal.restype = ctypes.c_int
        # The calls of every product, typed: ctypes then converts plain ints without a wrapper each.
        lib.dnnl_memory_set_data_handle.argtypes = [_P, _P]
        lib.dnnl_primitive_execute.argtypes = [_P, _P, ctypes.c_int, _P]
        lib.dnnl_stream_wait.argtypes = [_P]
        self.set_data_handle = lib.dnnl_memory_set_data_handle
        self.engine, self.stream = _P(), _P()
        self.check(lib.dnnl_engine_create(ctypes.byref(self.engine), CPU, 0), "creating the CPU engine")
        self.check(lib.dnnl_stream_create(ctypes.byref(self.stream), self.engine, IN_ORDER), "creating a stream")
        self.lock = threading.Lock()  # one stream: one product at a time
        self.shapes: dict[tuple, _Shape] = {}
        version = lib.dnnl_version
        version.restype = ctypes.POINTER(ctypes.c_int * 3)
        major, minor, patch = version().contents
        self.version = f"{major}.{minor}.{patch}"

    @staticmethod
    def check(status: int, what: str) -> None:
        if status != 0:
            raise OneDNNError(f"oneDNN failed {what} (status {status})")

    def desc(self, shape: tuple[int, ...], strides: tuple[int, ...] | None, dtype: int = F32) -> _P:
        """A memory descriptor: plain with these strides (in elements), or `any` layout (None)."""
        md = _P()
        if strides is None:
            self.check(self.lib.dnnl_memory_desc_create_with_tag(ctypes.byref(md), len(shape), _Dims(*shape), dtype,
                                                                   FORMAT_ANY), "describing a weight")
        else:
            self.check(self.lib.dnnl_memory_desc_create_with_strides(ctypes.byref(md), len(shape), _Dims(*shape),
                                                                       dtype, _Dims(*strides)), "describing an array")
        return md

    def memory(self, md, data: int | None = None) -> _P:
        mem = _P()
        self.check(self.lib.dnnl_memory_create(ctypes.byref(mem), md, self.engine, _P(data or 0)),
                   "creating a memory object")
        return mem

    def arguments(self, args: list[tuple[int, _P]]) -> tuple:
        """A primitive's arguments as `run` takes them (made once per product, not per call)."""
        return len(args), (_Arg * len(args))(*[_Arg(a, m) for a, m in args])

    def run(self, primitive: _P, arguments: tuple) -> None:
        self.check(self.lib.dnnl_primitive_execute(primitive, self.stream, *arguments), "running a primitive")
        self.check(self.lib.dnnl_stream_wait(self.stream), "waiting for its stream")

    def execute(self, primitive: _P, args: list[tuple[int, _P]]) -> None:
        self.run(primitive, self.arguments(args))

    def shape(self, K: int, N: int, precision: str = "float32") -> "_Shape":
        key = (K, N, precision)
        if key not in self.shapes:
            self.shapes[key] = _Shape(self, K, N, precision)
        return self.shapes[key]

    def pack(self, w: np.ndarray, precision: str = "float32") -> "PackedWeight":
        """w [K, N] (any strides: a transposed view too) reordered into oneDNN's layout, once, stored
        at `precision` (one of PRECISIONS)."""
        return PackedWeight(self, w, precision)


class _Shape:
    """What every weight of one shape [K, N] and precision shares: its blocked layout, and a
    primitive per row count."""

    def __init__(self, dnn: OneDNN, K: int, N: int, precision: str):
        if precision not in PRECISIONS:
            raise OneDNNError(f"no weight precision {precision!r} (one of {', '.join(PRECISIONS)})")
        self.dnn, self.K, self.N, self.precision = dnn, K, N, precision
        self.dtype = {"float32": F32, "bfloat16": BF16, "int8": S8}[precision]  # of weights and activations
        self.attr = _P()
        if precision == "int8":  # a float32 scale per output column, given at each run
            dnn.check(dnn.lib.dnnl_primitive_attr_create(ctypes.byref(self.attr)), "creating attributes")
            dnn.check(dnn.lib.dnnl_primitive_attr_set_scales_mask(self.attr, ARG_WEIGHTS, 1 << 1), "asking for scales")
        self.primitives: dict[int, tuple | None] = {}
        pd = self._descriptor(1, dnn.desc((K, N), None, self.dtype))
        self.layout = _P(dnn.lib.dnnl_primitive_desc_query_md(pd, QUERY_EXEC_ARG_MD, ARG_WEIGHTS))
        self.bytes = dnn.lib.dnnl_memory_desc_get_size(self.layout)
        self._pd_keep = pd  # the layout descriptor lives in it

    def _descriptor(self, M: int, weights_md) -> _P:
        dnn, pd = self.dnn, _P()
        status = dnn.lib.dnnl_matmul_primitive_desc_create(ctypes.byref(pd), dnn.engine,
                                                           dnn.desc((M, self.K), (self.K, 1), self.dtype), weights_md,
                                                           None, dnn.desc((M, self.N), (self.N, 1)), self.attr)
        dnn.check(status, f"describing a {M}x{self.K}x{self.N} {self.precision} product")
        return pd

    def primitive(self, M: int):
        """(primitive, src memory, dst memory) for M rows over the packed layout, made once; None if
        oneDNN would want another weight layout for M rows (the seam then uses NumPy)."""
        if M not in self.primitives:
            self.primitives[M] = self._make(M)
        return self.primitives[M]

    def _make(self, M: int):
        dnn = self.dnn
        pd = self._descriptor(M, dnn.desc((self.K, self.N), None, self.dtype))
        wants = _P(dnn.lib.dnnl_primitive_desc_query_md(pd, QUERY_EXEC_ARG_MD, ARG_WEIGHTS))
        if not dnn.lib.dnnl_memory_desc_equal(wants, self.layout):
            return None
        prim = _P()
        dnn.check(dnn.lib.dnnl_primitive_create(ctypes.byref(prim), pd), "creating a matmul primitive")
        src = dnn.memory(dnn.desc((M, self.K), (self.K, 1), self.dtype))
        dst = dnn.memory(dnn.desc((M, self.N), (self.N, 1)))
        return prim, src, dst


class PackedWeight:
    """A weight in oneDNN's blocked layout at its precision (its own buffer: `nbytes`); call it on
    activations x [M, K] (float32) for x @ w [M, N] in float32, or None where NumPy must do it."""

    def __init__(self, dnn: OneDNN, w: np.ndarray, precision: str = "float32"):
        if w.dtype != np.float32 or w.ndim != 2:
            raise OneDNNError("only float32 matrices are packed")
        K, N = w.shape
        self.dnn, self.shape = dnn, dnn.shape(K, N, precision)
        self.precision = precision
        self.scales = self.scales_memory = None
        if precision == "bfloat16":
            w = to_bfloat16(w)
        elif precision == "int8":
            w, self.scales = quantize(w, axis=0)  # a scale per output column
            self.scales_memory = dnn.memory(dnn.desc((N,), (1,)), self.scales.ctypes.data)
        self.buffer = np.empty(self.shape.bytes + 64, np.uint8)  # + 64 bytes: room to align
        offset = -self.buffer.ctypes.data % 64
        self.buffer = self.buffer[offset:offset + self.shape.bytes]
        self.nbytes = self.buffer.nbytes
        item = w.itemsize
        plain = dnn.desc((K, N), (w.strides[0] // item, w.strides[1] // item), self.shape.dtype)
        reorder, pd = _P(), _P()
        dnn.check(dnn.lib.dnnl_reorder_primitive_desc_create(ctypes.byref(pd), plain, dnn.engine, self.shape.layout,
                                                             dnn.engine, None), "describing the packing")
        dnn.check(dnn.lib.dnnl_primitive_create(ctypes.byref(reorder), pd), "creating the packing")
        with dnn.lock:
            dnn.execute(reorder, [(ARG_SRC, dnn.memory(plain, w.ctypes.data)),
                                  (ARG_DST, dnn.memory(self.shape.layout, self.buffer.ctypes.data))])
        self.memory = dnn.memory(self.shape.layout, self.buffer.ctypes.data)
        self._runs: dict[int, tuple | None] = {}  # by row count (`_run`)

    def __call__(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray | None:
        M = x.shape[0]
        run = self._runs.get(M, False)
        if run is False:
            run = self._runs[M] = self._run(M)
        if run is None:
            return None
        if not x.flags.c_contiguous or x.dtype != np.float32:
            x = np.ascontiguousarray(x, dtype=np.float32)
        row_scales = None
        if self.precision == "bfloat16":
            x = to_bfloat16(x)
        elif self.precision == "int8":
            x, row_scales = quantize(x, axis=1)  # a scale per row, from the row itself
        if out is None:
            out = np.empty((M, self.shape.N), np.float32)
        primitive, src, dst, args = run
        dnn = self.dnn
        with dnn.lock:  # the memory objects are shared by this shape's weights
            dnn.set_data_handle(src, x.ctypes.data)
            dnn.set_data_handle(dst, out.ctypes.data)
            dnn.run(primitive, args)
        if row_scales is not None:
            out *= row_scales[:, None]
        return out

    def _run(self, M: int):
        """What a product of M rows runs with, made once (the call's overhead is most of a small
        product's time): (primitive, src, dst, its arguments), or None."""
        prim = self.shape.primitive(M)
        if prim is None:
            return None
        primitive, src, dst = prim
        args = [(ARG_SRC, src), (ARG_WEIGHTS, self.memory), (ARG_DST, dst)]
        if self.scales_memory is not None:
            args.append((ARG_ATTR_SCALES | ARG_WEIGHTS, self.scales_memory))
        return primitive, src, dst, self.dnn.arguments(args)


def on_a_passing_thread(f):
    """f() on a thread of its own that ends with it, and its result: the OpenMP team that f's
    parallel work starts goes with the thread.

    libgomp keeps a team of threads for each thread that starts parallel work, and once their
    threads outnumber the cores it stops spinning between parallel regions (its throttled spin
    count), so every product wakes its team from sleep. A server packs on its main thread and
    multiplies on its engine thread: with the packing's team left behind, 48 int8 products of one
    row took 6.6 ms on the engine thread against 3.1 (124M, 2 cores). So `matmul.prepare` packs
    on a passing thread."""
    box = {}

    def run():
        try:
            box["value"] = f()
        except BaseException as e:  # noqa: BLE001 -- raised again in the caller's thread
            box["error"] = e
    thread = threading.Thread(target=run, name="gpt2np-pack", daemon=True)  # Ctrl-C need not wait for it
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest, ties to even: NumPy has no bfloat16.
    A transposed view stays one (the LM head's wteᵀ is converted where it lies)."""
    if not x.flags.c_contiguous and x.T.flags.c_contiguous:
        return to_bfloat16(x.T).T
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def quantize(x: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8: (q, scales) with x ≈ q · scale, one scale per slice along `axis` (0: per
    column, 1: per row), its largest |x| mapped to 127; an all-zero slice gets scale 1."""
    scales = np.abs(x).max(axis=axis) / np.float32(127)
    scales[scales == 0] = 1
    scales = scales.astype(np.float32, copy=False)
    q = np.rint(x / (scales[None, :] if axis == 0 else scales[:, None]))
    return q.astype(np.int8), scales  # in x's own order (a transposed view's too): oneDNN reads the strides
