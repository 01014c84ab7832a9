"""A long prompt's elementwise work on every core: in parts, in threads, one BLAS thread each.

NumPy's elementwise passes (exp, max, sum, GELU's) run on one core, while its matrix products run
on OpenBLAS's threads. A long prompt's attention is many small products, each followed by such
passes over its scores, so on two cores one of them idles through much of it. `split` runs parts
of such work in as many threads as OpenBLAS has, with OpenBLAS held to one thread meanwhile: at
1024 positions (124M, 2 cores), a whole prompt pass took 1.12 s against 1.25.

That needs OpenBLAS's idle threads to sleep. After each product they spin, by default for 2^28
cycles (about 0.1 s), and a spinning thread holds the core the second part needs: with the
default, splitting gained nothing. `gpt2np/__init__.py` sets `OPENBLAS_THREAD_TIMEOUT=20`
(2^20 cycles, under a millisecond: they still spin between a decode step's products, whose speed
is unchanged) unless it is set, which takes effect when NumPy is imported after gpt2np.

`split` finds NumPy's OpenBLAS in the process by its exported `openblas_set_num_threads` (under the
names NumPy's and SciPy's builds give it). Where there is none, or it runs one thread already (a Ray
actor with one CPU), the work runs in the calling thread as one part.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterator


@lru_cache(maxsize=None)
def _openblas() -> tuple[Callable[[], int], Callable[[int], None]] | None:
    """(get_num_threads, set_num_threads) of the OpenBLAS loaded in this process, or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line})
    except OSError:
        return None
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("openblas", "scipy_openblas"):
            for suffix in ("", "64_"):  # 64-bit-integer builds (NumPy's own) suffix their symbols
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    set_.argtypes, set_.restype, get.restype = [ctypes.c_int], None, ctypes.c_int
                    return get, set_
    return None


_lock = threading.Lock()  # one split at a time: BLAS threads are a process-wide setting
_pool: ThreadPoolExecutor | None = None
_pool_size = 0


@contextmanager
def _one_blas_thread() -> Iterator[int]:
    """Hold OpenBLAS to one thread; yields how many it ran before (1 when it cannot be set)."""
    blas = _openblas()
    if blas is None:
        yield 1
        return
    get, set_ = blas
    with _lock:
        before = get()
        if before > 1:
            set_(1)
        try:
            yield before
        finally:
            if before > 1:
                set_(before)


def split(work: Callable[[slice], object], n: int) -> None:
    """Run `work(part)` over parts of range(n) that together cover it: as many parts as OpenBLAS
    has threads, each in its own thread, with one BLAS thread each (all of it at once in this
    thread when OpenBLAS runs one). The parts must be independent: each writes only its own output."""
    global _pool, _pool_size
    with _one_blas_thread() as threads:
        parts = min(threads, n)
        if parts <= 1:
            work(slice(0, n))
            return
        if _pool_size < parts - 1:
            _pool, _pool_size = ThreadPoolExecutor(parts - 1, thread_name_prefix="gpt2np-split"), parts - 1
        bounds = [n * i // parts for i in range(parts + 1)]
        futures = [_pool.submit(work, slice(a, b)) for a, b in zip(bounds[1:-1], bounds[2:])]
        try:
            work(slice(bounds[0], bounds[1]))
        finally:  # the others finish (or fail) before OpenBLAS gets its threads back
            for f in futures:
                f.exception()
        for f in futures:
            f.result()
