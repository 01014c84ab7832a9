"""The seam every weight product goes through: NumPy (OpenBLAS) by default and as the reference;
oneDNN's matmul primitive (the extra `gpt2np[onednn]`, `gpt2np/onednn.py`) where it is installed.

`GPT2NP_MATMUL` chooses: `numpy`, `onednn` (a warning line and NumPy if it cannot load), or `auto`
(the default: oneDNN where its library loads, else NumPy, silently). With oneDNN, every row count
is oneDNN's: from 2 rows it is faster; at 1 row NumPy's gemv is a little faster, but it reads the
plain weights, which would then be a second resident copy (bench/results/MATMUL.md). With oneDNN, `prepare` packs
each weight once at load into oneDNN's blocked layout (`Linear.packed`, `Params.lm_head`) and lets
go of the memory-mapped pages the copy replaces, so a model keeps one resident copy of its weights.
Every product the packed weights cannot take (a row count oneDNN would lay out otherwise) is
NumPy's. The reference model (`reference.py`) reads the plain weights, never the packed ones.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

import numpy as np

ENV = "GPT2NP_MATMUL"
CHOICES = ("auto", "numpy", "onednn")
PRECISIONS = ("float32", "bfloat16", "int8")
"""How the weights of the products may be held (`gpt2np.load(weights=...)`): as the file has them
(float32, the default and the reference); rounded to bfloat16 (each product rounds its activations
to bfloat16 too and accumulates in float32); or int8 with one scale per output column (each
product quantizes its activations to int8 with one scale per row, accumulates in int32, and
gives float32). The last two are oneDNN's: NumPy has no product on 16- or 8-bit numbers."""


def numpy_matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:  # [N, in] @ [in, out] -> new [N, out]
    """x @ w for activations x [N, in], in the form OpenBLAS runs fastest for N rows.

    sgemm packs the whole weight matrix on every call, which for a few rows costs more than the
    product itself (on a SkylakeX-kernel machine, the 48 matrices of 124M took 13.7 ms at 1 row and
    41.7 at 2, with the forms below timed side by side in one run). So: one row is a gemv; 2-3 rows
    are a gemv each (22 and 28 ms); up to `_SMALL` rows, the product is taken as (wᵀ·xᵀ)ᵀ, where
    sgemm packs the few rows instead (31 ms at 2 rows, 35 at 8, 49 at 32), then copied into
    row-major order (the later passes go row by row); beyond, x @ w.
    """
    n = x.shape[0]
    if n == 1 or n > _SMALL:
        return x @ w
    if n <= GEMV_ROWS:
        out = np.empty((n, w.shape[1]), dtype=np.float32)
        for i in range(n):
            np.matmul(x[i], w, out=out[i])
        return out
    return np.ascontiguousarray((w.T @ x.T).T)


GEMV_ROWS = 3
_SMALL = 128


def matmul(x: np.ndarray, w: np.ndarray, packed=None) -> np.ndarray:
    """x @ w [N, out]: by `packed` (a backend's copy of w, or None) where it takes N rows, else NumPy."""
    if packed is not None:
        out = packed(x)
        if out is not None:
            return out
    return numpy_matmul(x, w)


def head_matmul(h: np.ndarray, wte: np.ndarray, packed=None) -> np.ndarray:  # [N, E] -> [N, V]
    """h @ wteᵀ, the LM head: by `packed` (a backend's copy of wteᵀ) where it takes N rows, else
    NumPy: one row, or a few, `numpy_matmul`'s gemvs; from 4 rows, h @ wteᵀ (for this product,
    50,257 columns wide, sgemm packing the weights costs less than (w·hᵀ)ᵀ and its copy of the
    logits: 124M, SkylakeX kernel, side by side: 24 against 30 ms at 16 rows, 30 against 38 at
    32, 38 against 65 at 64)."""
    if packed is not None:
        out = packed(h)
        if out is not None:
            return out
    return numpy_matmul(h, wte.T) if len(h) <= GEMV_ROWS else h @ wte.T


@dataclass
class Choice:
    """Which backend runs the products, and what it cost: for `--stats` and the server's start-up line."""

    backend: str = "numpy"
    detail: str = ""
    packed_bytes: int = 0
    pack_s: float = 0.0
    weights: str = "float32"  # the weights' precision in the products (PRECISIONS)

    def describe(self) -> str:
        if self.backend == "numpy":
            return f"matmul: NumPy{f' ({self.detail})' if self.detail else ''}"
        return (f"matmul: oneDNN {self.detail}, {self.weights} weights packed in {self.pack_s:.2f} s "
                f"({self.packed_bytes / 2**20:.0f} MiB, the mapped pages let go)")


def requested(given: str | None = None) -> str:
    value = (given if given is not None else os.environ.get(ENV, "auto")).strip().lower() or "auto"
    if value not in CHOICES:
        print(f"gpt2np: warning: {ENV}={value!r} is not one of {', '.join(CHOICES)}; using NumPy", file=sys.stderr)
        return "numpy"
    return value


def prepare(params, release=None, backend: str | None = None, weights: str = "float32") -> tuple[object, Choice]:
    """The params with each weight packed for the backend `GPT2NP_MATMUL` chooses, and the choice.
    `release(array)`: lets go of a packed weight's mapped pages (`weights.release_pages`). A backend
    that is asked for but cannot load or pack warns in one line and leaves NumPy in place.
    `backend`: the choice in place of the environment's. `weights`: their precision (PRECISIONS);
    other than float32 it needs oneDNN, and `GPT2Error` says so where it cannot run."""
    from .errors import GPT2Error

    if weights not in PRECISIONS:
        raise GPT2Error(f"weights must be one of {', '.join(PRECISIONS)}, got {weights!r}", "weights")
    want = requested(backend)
    if weights != "float32" and want == "numpy":
        raise GPT2Error(f"{weights} weights need oneDNN's products, not NumPy's ({ENV}=numpy or "
                        "matmul_backend='numpy' asks for NumPy)", "weights")
    if want == "numpy":
        return params, Choice(detail="asked for")
    from . import onednn

    try:
        dnn = _onednn()
        started = time.perf_counter()
        packed_bytes = 0

        def pack(w):
            nonlocal packed_bytes
            p = dnn.pack(w, weights)
            packed_bytes += p.nbytes
            if release is not None:
                release(w)
            return p

        def pack_all():
            blocks = tuple(b._replace(**{name: getattr(b, name)._replace(packed=pack(getattr(b, name).w))
                                         for name in ("c_attn", "attn_proj", "c_fc", "mlp_proj")})
                           for b in params.blocks)
            return blocks, pack(params.wte.T)  # wte's pages go too: the embedding lookup faults in the few rows it reads

        # On a thread that ends with the packing, so that it leaves no OpenMP team behind beside the
        # one of the thread that will multiply (a server's engine thread): `onednn.on_a_passing_thread`.
        blocks, head = onednn.on_a_passing_thread(pack_all)
        choice = Choice("onednn", dnn.version, packed_bytes, time.perf_counter() - started, weights)
        return params._replace(blocks=blocks, lm_head=head), choice
    except Exception as e:  # noqa: BLE001 -- an optional library: never a crash, always NumPy
        missing = isinstance(e, onednn.LibraryMissing)
        if weights != "float32":  # never silently more exact (and slower) than asked: say why not
            raise GPT2Error(f"{weights} weights need oneDNN's products: "
                            + ("pip install 'gpt2np[onednn]'" if missing else f"oneDNN failed: {e}"), "weights") from None
        if want == "onednn" or not missing:  # auto with no extra installed: NumPy, silently
            print(f"gpt2np: warning: oneDNN cannot run the products ({e}); using NumPy", file=sys.stderr)
        return params, Choice(detail="oneDNN is not installed" if missing else f"oneDNN failed: {e}")


_dnn = None


def _onednn():
    """The process's one oneDNN engine (loaded on first use)."""
    global _dnn
    if _dnn is None:
        from .onednn import OneDNN
        _dnn = OneDNN()
    return _dnn
