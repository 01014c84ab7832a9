"""The matmul seam: NumPy by default and as the reference, oneDNN where the extra is installed.
Every product and the model's logits equal NumPy's to float32 precision at every row count;
greedy tokens are the same; the packed weights replace the mapped pages in memory; a missing,
broken or unknown backend falls back to NumPy with one warning line, never a crash."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import gpt2np
from gpt2np import matmul as seam

onednn = pytest.importorskip("gpt2np.onednn")


def dnn_or_skip():
    try:
        return seam._onednn()
    except onednn.OneDNNError as e:
        pytest.skip(f"oneDNN is not installed here: {e}")


def load(folder, backend: str, monkeypatch) -> gpt2np.GPT2:
    monkeypatch.setenv(seam.ENV, backend)
    return gpt2np.load(folder)


@pytest.mark.parametrize("shape", [(64, 192), (64, 64), (64, 256), (256, 64), (768, 2304)])
def test_every_row_count_equals_numpy(shape):
    dnn = dnn_or_skip()
    rng = np.random.default_rng(0)
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    packed = dnn.pack(w)
    for rows in [*range(1, 70), 128, 300, 1024]:
        x = rng.standard_normal((rows, shape[0]), dtype=np.float32)
        got = packed(x)
        expected = x.astype(np.float64) @ w.astype(np.float64)
        assert got is not None and got.shape == (rows, shape[1]) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5 * np.abs(expected).max())
    # A transposed view (the LM head's wteᵀ) packs from its strides.
    t = dnn.pack(w.T)
    x = rng.standard_normal((5, shape[1]), dtype=np.float32)
    np.testing.assert_allclose(t(x), x @ w.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["small", "124M"])
def test_logits_and_greedy_tokens_equal_the_numpy_path(which, small_model_dir, model_124M_dir, monkeypatch):
    dnn_or_skip()
    folder = small_model_dir if which == "small" else model_124M_dir
    plain, fast = load(folder, "numpy", monkeypatch), load(folder, "onednn", monkeypatch)
    assert plain.matmul.backend == "numpy" and fast.matmul.backend == "onednn"
    assert all(b.c_attn.packed is None for b in plain.params.blocks) and plain.params.lm_head is None
    ids = plain.encode("The matmul seam must not change a single greedy token. " * 3)[:60]
    a, b = plain.logits(ids), fast.logits(ids)
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * np.abs(a).max())
    prompts = ["Hello", "A longer prompt, with more tokens in it", "x"]
    for g_plain, g_fast in zip(plain.generate_batch(prompts, 12, stop_at_eos=False),
                               fast.generate_batch(prompts, 12, stop_at_eos=False)):
        assert g_fast.ids == g_plain.ids
        np.testing.assert_allclose(g_fast.logprobs, g_plain.logprobs, atol=1e-4)


def test_the_packed_copy_replaces_the_mapped_pages(model_124M_dir):
    code = ("import gpt2np\n"
            f"m = gpt2np.load({str(model_124M_dir)!r})\n"
            "m.complete('Hello', 3)\n"
            "rss = 0; inside = False\n"
            "for line in open('/proc/self/smaps'):\n"
            "    if not line[0].isupper():\n"
            "        inside = line.rstrip().endswith('model.safetensors')\n"
            "    elif inside and line.startswith('Rss:'):\n"
            "        rss += int(line.split()[1]) * 1024\n"
            "print(m.matmul.backend, m.matmul.packed_bytes, rss)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, seam.ENV: "auto"})
    backend, packed, mapped = out.stdout.split()
    if backend != "onednn":
        pytest.skip("oneDNN is not installed here")
    size = (model_124M_dir / "model.safetensors").stat().st_size
    assert int(packed) > 0.9 * size
    assert int(mapped) < 0.05 * size, (mapped, size)  # one resident copy: the packed one


@pytest.mark.parametrize("env,warned", [
    ({seam.ENV: "onednn", onednn.ENV_LIB: "/nonexistent/libdnnl.so"}, "cannot load libdnnl"),
    ({seam.ENV: "auto", onednn.ENV_LIB: "/etc/hostname"}, "cannot load libdnnl"),
    ({seam.ENV: "fast"}, "is not one of"),
])
def test_a_missing_broken_or_unknown_backend_is_numpy_with_one_warning(small_model_dir, env, warned):
    code = f"import gpt2np; m = gpt2np.load({str(small_model_dir)!r}); print(m.matmul.backend, m.complete('x', 3).ids)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert out.returncode == 0 and out.stdout.startswith("numpy [")
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and warned in lines[0] and "warning" in lines[0], out.stderr


def test_auto_without_the_library_is_numpy_silently(small_model_dir, tmp_path):
    """No libdnnl anywhere (an empty prefix for the search, no path given): NumPy, no warning."""
    code = ("import sys, gpt2np.onednn as o\n"
            "o.library_path = lambda: (_ for _ in ()).throw(o.LibraryMissing('libdnnl not found'))\n"
            "import gpt2np\n"
            f"m = gpt2np.load({str(small_model_dir)!r}); print(m.matmul.backend, m.matmul.describe())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, seam.ENV: "auto"})
    assert out.returncode == 0 and out.stdout.startswith("numpy") and not out.stderr, out.stderr
    assert "not installed" in out.stdout
