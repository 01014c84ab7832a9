"""Long-prompt work in parts on every core (`gpt2np.parallel`): the same values as in one part."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import gpt2np
from gpt2np import model as M
from gpt2np import parallel


def blas_threads() -> int:
    blas = parallel._openblas()
    return blas[0]() if blas else 1


def test_split_covers_every_index_once_and_gives_blas_its_threads_back():
    before = blas_threads()
    seen, threads, during = [], set(), []

    def work(part):
        seen.extend(range(part.start, part.stop))
        threads.add(threading.get_ident())
        during.append(blas_threads())
    parallel.split(work, 11)
    assert sorted(seen) == list(range(11))
    assert blas_threads() == before
    if before > 1:  # OpenBLAS was found: each part ran in its own thread with one BLAS thread
        assert len(threads) == min(before, 11) and set(during) == {1}


def test_a_failing_part_raises_and_still_restores_blas():
    before = blas_threads()

    def work(part):
        if part.start > 0:
            raise ValueError("a part failed")
    if before > 1:
        with pytest.raises(ValueError, match="a part failed"):
            parallel.split(work, 4)
    assert blas_threads() == before


def test_without_openblas_the_work_runs_whole_in_this_thread(monkeypatch):
    monkeypatch.setattr(parallel, "_openblas", lambda: None)
    parts = []
    parallel.split(lambda part: parts.append((part, threading.get_ident())), 8)
    assert parts == [(slice(0, 8), threading.get_ident())]


def test_a_prompt_in_parts_gives_the_logits_of_one_part(small_model_dir, monkeypatch):
    model = gpt2np.load(small_model_dir)
    ids = (model.encode("The quick brown fox jumps over the lazy dog. " * 8))[:60]
    whole = model.logits(ids)
    calls = []
    real = parallel.split
    monkeypatch.setattr(parallel, "split", lambda work, n: calls.append(n) or real(work, n))
    monkeypatch.setattr(M, "_SPLIT_SCORES", 1)  # attention, GELU and layer norms of every pass in parts
    monkeypatch.setattr(M, "_SPLIT_ELEMENTS", 1)
    parts = model.logits(ids)
    assert calls.count(model.config.n_head) == model.config.n_layer  # attention, heads in parts
    assert calls.count(len(ids)) == 4 * model.config.n_layer + 1  # qkv bias, GELU, layer norms: rows in parts
    np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-5 * max(1, np.abs(whole).max()))


@pytest.mark.parametrize("preset", [None, "25"])
def test_importing_gpt2np_sets_openblas_thread_timeout_unless_set(preset):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_THREAD_TIMEOUT"}
    if preset:
        env["OPENBLAS_THREAD_TIMEOUT"] = preset
    out = subprocess.run([sys.executable, "-c", "import gpt2np, os; print(os.environ['OPENBLAS_THREAD_TIMEOUT'])"],
                         env=env, capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == (preset or "20")
