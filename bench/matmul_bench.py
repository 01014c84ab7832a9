"""`make bench`, the matmul seam: NumPy (OpenBLAS) against oneDNN for the weight products.

On a random-weight 124M model, each backend in a process of its own (oneDNN's OpenMP threads spin
a moment after each product, which would slow OpenBLAS in the same process and flatter oneDNN),
the processes alternating round by round, medians:

- the 48 block products of one step and the LM head, at 1 to 64 rows;
- engine steps of 1 to 64 decoding sequences (step / the same step with NumPy), and where a
  step's time goes: products, attention, layer norm and GELU, the rest;
- load time (the packing) and resident memory after a generation.

    python bench/matmul_bench.py [--rounds 3] [--out bench/results]

Writes bench/results/MATMUL.md and matmul.json; needs the extra `gpt2np[onednn]` for its column.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROWS = (1, 2, 4, 8, 16, 32, 64)


def measure(folder: str) -> dict:
    """In this process, with the backend GPT2NP_MATMUL chose: products, head, steps, load, RSS."""
    import numpy as np

    import gpt2np
    from gpt2np.matmul import matmul

    started = time.perf_counter()
    model = gpt2np.load(folder)
    load_s = time.perf_counter() - started
    p = model.params
    lins = [getattr(b, n) for b in p.blocks for n in ("c_attn", "attn_proj", "c_fc", "mlp_proj")]
    rng = np.random.default_rng(0)

    def median_ms(f, reps=9):
        f()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return 1e3 * statistics.median(times)

    out = {"backend": model.matmul.backend, "describe": model.matmul.describe(), "load_s": load_s,
           "products_ms": {}, "head_ms": {}, "step_ms": {}}
    for rows in ROWS:
        xs = {k: rng.standard_normal((rows, k), dtype=np.float32) for k in (768, 3072)}
        out["products_ms"][rows] = median_ms(lambda: [matmul(xs[lin.w.shape[0]], lin.w, lin.packed) for lin in lins])
        out["head_ms"][rows] = median_ms(lambda: gpt2np.model.lm_head(p, xs[768]))
        engine = model.engine()
        for i in range(rows):
            engine.add(model.encode(f"Sequence {i}: " + "word " * 12), model.options(64, stop_at_eos=False))
        engine.step()
        times = []
        for _ in range(24):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        out["step_ms"][rows] = 1e3 * statistics.median(times)
        out.setdefault("parts_ms", {})[rows] = step_parts(engine, 12)
    status = open("/proc/self/status").read()  # before the plain-layout column reads the mapped pages again
    out["rss_mb"] = int(status.split("VmRSS:")[1].split()[0]) / 1024
    if model.matmul.backend == "onednn":  # oneDNN over the plain, mapped weights: no copy, but slower?
        plain = [plain_weight(lin.w) for lin in lins]
        out["plain_products_ms"] = {}
        for rows in ROWS:
            xs = {k: rng.standard_normal((rows, k), dtype=np.float32) for k in (768, 3072)}
            out["plain_products_ms"][rows] = median_ms(lambda: [f(xs[f.K]) for f in plain])
    return out


PARTS = {"products": ("matmul", "head_matmul"), "attention": ("decode_attention", "attention"),
         "layer norm and GELU": ("layer_norm", "gelu")}
"""Where an engine step's time goes: the model's functions that do each part (`gpt2np.model`)."""


def step_parts(engine, steps: int) -> dict[str, float]:
    """ms per step in each of PARTS, and the rest (embeddings, biases, residuals, choosing tokens,
    the engine's bookkeeping): the same engine stepped again with those functions timed."""
    from gpt2np import model as M

    spent = dict.fromkeys(PARTS, 0.0)
    saved = {}
    for part, names in PARTS.items():
        for name in names:
            f = saved[name] = getattr(M, name)

            def timed(*a, _f=f, _part=part, **k):
                t = time.perf_counter()
                try:
                    return _f(*a, **k)
                finally:
                    spent[_part] += time.perf_counter() - t
            setattr(M, name, timed)
    try:
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        total = time.perf_counter() - t
    finally:
        for name, f in saved.items():
            setattr(M, name, f)
    parts = {part: 1e3 * v / steps for part, v in spent.items()}
    parts["rest"] = 1e3 * (total - sum(spent.values())) / steps
    parts["step"] = 1e3 * total / steps
    return parts


def plain_weight(w):
    """oneDNN's product over w as it lies in the mapped file (row-major [K, N], no copy), for the
    table's plain-layout column (the runtime packs)."""
    import ctypes

    import numpy as np

    from gpt2np import onednn
    from gpt2np.matmul import _onednn

    dnn = _onednn()
    K, N = w.shape
    prims = {}

    def product(x):
        M = x.shape[0]
        if M not in prims:
            pd, prim = onednn._P(), onednn._P()
            src, dst = dnn.desc((M, K), (K, 1)), dnn.desc((M, N), (N, 1))
            wmd = dnn.desc((K, N), (N, 1))
            dnn.check(dnn.lib.dnnl_matmul_primitive_desc_create(ctypes.byref(pd), dnn.engine, src, wmd, None, dst,
                                                                None), "plain pd")
            dnn.check(dnn.lib.dnnl_primitive_create(ctypes.byref(prim), pd), "plain primitive")
            prims[M] = (prim, dnn.memory(src), dnn.memory(wmd, w.ctypes.data), dnn.memory(dst))
        prim, sm, wm, dm = prims[M]
        out = np.empty((M, N), np.float32)
        dnn.lib.dnnl_memory_set_data_handle(sm, onednn._P(x.ctypes.data))
        dnn.lib.dnnl_memory_set_data_handle(dm, onednn._P(out.ctypes.data))
        dnn.execute(prim, [(onednn.ARG_SRC, sm), (onednn.ARG_WEIGHTS, wm), (onednn.ARG_DST, dm)])
        return out

    product.K = K
    return product


def run(folder: Path, backend: str) -> dict:
    env = {**os.environ, "GPT2NP_MATMUL": backend}
    r = subprocess.run([sys.executable, __file__, "--measure", str(folder)], capture_output=True, text=True, env=env,
                       timeout=1800)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.splitlines()[-1])


def markdown(env: dict, rows: dict) -> str:
    n, d = rows["numpy"], rows["onednn"]

    def line(key, r):
        a, b = n[key][str(r)], d[key][str(r)]
        return f"{a:.2f} | {b:.2f} | {a / b:.2f}"

    table = "\n".join(f"| {r} | {line('products_ms', r)} | {d['plain_products_ms'][str(r)]:.2f} | "
                      f"{line('head_ms', r)} | {line('step_ms', r)} |" for r in ROWS)
    parts = "\n".join(
        f"| {r} | {q['step']:.2f} | {q['products']:.2f} | {q['attention']:.2f} | {q['layer norm and GELU']:.2f} | "
        f"{q['rest']:.2f} | {q['products'] / q['step']:.2f} |" for r in ROWS for q in [d["parts_ms"][str(r)]])
    return f"""# The matmul seam: NumPy against oneDNN

Written by `bench/matmul_bench.py` (`make bench`) on {env['date']}: {env['cpu']}, {env['cores']} cores,
NumPy {env['numpy']} with {env['blas']}; {d['describe']}. A random-weight 124M model, each backend in its
own process, the processes alternating, medians of {env['rounds']} rounds (each a median of 9 calls,
24 steps).

| rows | 48 products, NumPy ms | oneDNN ms | NumPy / oneDNN | oneDNN, plain layout ms | LM head, NumPy ms | oneDNN ms | ratio | engine step, NumPy ms | oneDNN ms | ratio |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{table}

Load: {n['load_s']:.2f} s with NumPy (the weights mapped, not read), {d['load_s']:.2f} s with oneDNN (read once
and packed). Resident memory after the steps: {n['rss_mb']:.0f} MB with NumPy, {d['rss_mb']:.0f} MB with oneDNN (the
packed copy; the mapped pages it replaces let go). "Plain layout": oneDNN's product over the weights as they
lie in the mapped file, which needs no copy; the runtime packs them instead.

## Where a step's time goes (oneDNN)

The same engines stepped 12 more times with the model's functions timed: the weight products
(LM head included), attention (reading every sequence's keys and values), layer norm and GELU,
and the rest (embeddings, biases, residuals, choosing each token, the engine's bookkeeping).
A step that did nothing but its products would reach the products' share.

| sequences | step ms | products ms | attention ms | layer norm and GELU ms | the rest ms | products / step |
| ---: | ---: | ---: | ---: | ---: | ---: | ---: |
{parts}
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--model-cache", type=Path, default=ROOT / "bench" / ".models")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    import bench

    import numpy as np

    folder = bench.make_model(args.model_cache / "124M", "124M")
    rounds = {"numpy": [], "onednn": []}
    for _ in range(args.rounds):
        for backend in rounds:
            rounds[backend].append(run(folder, backend))
    if rounds["onednn"][0]["backend"] != "onednn":
        print("matmul_bench: oneDNN is not installed (pip install '.[onednn]'); nothing to compare", file=sys.stderr)
        return
    merged = {}
    for backend, runs in rounds.items():
        merged[backend] = {"backend": backend, "describe": runs[0]["describe"],
                           "load_s": statistics.median(r["load_s"] for r in runs),
                           "rss_mb": statistics.median(r["rss_mb"] for r in runs)}
        for key in ("products_ms", "head_ms", "step_ms", "plain_products_ms"):
            if key in runs[0]:
                merged[backend][key] = {str(k): statistics.median(r[key][str(k)] for r in runs) for k in ROWS}
        merged[backend]["parts_ms"] = {str(k): {part: statistics.median(r["parts_ms"][str(k)][part] for r in runs)
                                                for part in runs[0]["parts_ms"][str(k)]} for k in ROWS}
    blas = bench.blas_info()
    env = {"date": time.strftime("%Y-%m-%d"), "cpu": bench.cpu_name(), "cores": os.cpu_count(), "numpy": np.__version__,
           "blas": f"{blas['library']} ({blas['kernel']} kernel, {blas['threads']} threads)", "rounds": args.rounds}
    merged["env"] = env
    bench.save_results(args.out, "matmul", merged, markdown(env, merged))


if __name__ == "__main__":
    main()
