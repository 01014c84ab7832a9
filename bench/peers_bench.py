"""`make bench` (second part): gpt2np side by side with CTranslate2 and Hugging Face transformers.

All engines run the same random-weight 124M model (CTranslate2 converted from the same folder, in
float32 and int8), with 2 threads, in one process, measured interleaved: for each figure every
engine runs in turn, twice, and the faster run counts. Figures:

- decode ms/token at context 16 and 1000 (one prompt, greedy: from the first new token to the last);
- prefill of a 1023-token prompt (to its first new token);
- aggregate tokens/s of 1, 8, 32 and 64 prompts of 16 tokens decoded together, 32 new tokens each;
- the same at batch 32 with temperature 0.8 and top-p 0.95, as a fraction of greedy;
- scoring a 20,000-token text (every token's log-probability, gpt2np's windows), tokens/s;
- for gpt2np alone: top-p on one row of 50,257 logits, flat and peaked, ms.

Peers that are not installed are skipped (`pip install -e '.[bench-peers]'` adds them). Ratios in
one run are what to compare; absolute times drift on shared machines.

    python bench/peers_bench.py [--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import gpt2np  # noqa: F401 -- before NumPy loads OpenBLAS: it sets its thread timeout (gpt2np.parallel)
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import peers  # noqa: E402
from bench import blas_info, cpu_name, gemm_throughput, make_model, weight_flops_per_token  # noqa: E402

THREADS = 2
BATCHES = (1, 8, 32, 64)


def timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def side_by_side(runners: dict, measure, reps: int) -> dict:
    """{engine: the best of `reps` runs of measure(runner)}, engines taking turns."""
    best = {name: float("inf") for name in runners}
    for _ in range(reps):
        for name, r in runners.items():
            best[name] = min(best[name], measure(r))
    return best


def prompts(batch: int, length: int) -> list[list[int]]:
    return [[(97 * b + 31 * i + 11) % 50000 for i in range(length)] for b in range(batch)]


def top_p_ms(shape: str) -> float:
    from gpt2np import Sampling
    from gpt2np.sampling import choose
    rng = np.random.default_rng(0)
    z = (rng.standard_normal(50257) * (0.01 if shape == "flat" else 2.0)).astype(np.float32)
    if shape == "peaked":
        z[::500] += 12
    s = Sampling(temperature=0.8, top_p=0.95, seed=0)
    g = s.rng()
    return statistics.median(timed(lambda: choose(z, s, g)) for _ in range(100)) * 1000


def stacks(model) -> dict:
    """ms of one decode step's weight products alone (the matmul stack), as gpt2np stores the
    weights ([in, out], as in the file) and in the layout OpenBLAS reads fastest ([out, in]
    copies used transposed), taking turns with gpt2np's own decode step at context 16."""
    from gpt2np import kv, model as M
    from bench import matmul_stack
    cfg, p = model.config, model.params
    fast = p._replace(blocks=tuple(b._replace(**{k: M.Linear(np.ascontiguousarray(getattr(b, k).w.T).T, getattr(b, k).b)
                                                 for k in ("c_attn", "attn_proj", "c_fc", "mlp_proj")})
                                   for b in p.blocks))
    stored, fastest = matmul_stack(p), matmul_stack(fast)
    cache = kv.KVCache(cfg, 16 + 200)
    M.forward(p, cfg, np.arange(16), cache)
    times = {"stored": [], "fastest": [], "decode": []}
    for i in range(60):
        times["stored"].append(timed(stored))
        times["fastest"].append(timed(fastest))
        times["decode"].append(timed(lambda: M.forward(p, cfg, np.array([i]), cache)))
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def run(quick: bool, out: Path, cache: Path) -> None:
    folder = make_model(cache / "124M", "124M")
    names = peers.available()
    runners = {n: peers.load(n, folder, cache / "124M-ct2", THREADS) for n in names}
    labels = {n: r.name for n, r in runners.items()}
    print("engines: " + ", ".join(labels.values()), file=sys.stderr)
    reps = 1 if quick else 2
    r: dict = {"engines": labels}

    def step(what):
        print(f"  {what} ...", file=sys.stderr)

    step("decode")
    for ctx, n in ((16, 64), (1000, 24)):
        p = prompts(1, ctx)[0]
        r[f"decode_ms_ctx{ctx}"] = side_by_side(runners, lambda e: e.decode_ms(p, n), reps)
    step("prefill")
    p = prompts(1, 1023)
    r["prefill_1023_s"] = side_by_side(runners, lambda e: timed(lambda: e.generate(p, 1)), reps)
    step("batches")
    r["batch_tokens_per_s"] = {}
    for b in BATCHES:
        p = prompts(b, 16)
        t = side_by_side(runners, lambda e: timed(lambda: e.generate(p, 32)), reps)
        r["batch_tokens_per_s"][b] = {k: b * 32 / v for k, v in t.items()}
    p = prompts(32, 16)
    t = side_by_side(runners, lambda e: timed(lambda: e.generate(p, 32, sample=True)), reps)
    r["sampled_b32_tokens_per_s"] = {k: 32 * 32 / v for k, v in t.items()}
    step("greedy ids")
    p = prompts(8, 16)
    ours = runners["gpt2np"].generate(p, 32)
    r["same_greedy_ids"] = {k: e.generate(p, 32) == ours for k, e in runners.items()}
    step("scoring")
    text = [(i * 7919 + 13) % 50000 for i in range(4000 if quick else 20000)]
    scores = {}

    def score(e):
        t = time.perf_counter()
        scores[e.name] = e.score(text)
        return time.perf_counter() - t
    t = side_by_side(runners, score, 1)
    r["score_tokens"] = len(text)
    r["score_tokens_per_s"] = {k: len(text) / v for k, v in t.items()}
    base = np.array(scores[labels["gpt2np"]])
    r["score_max_abs_diff"] = {k: float(np.max(np.abs(np.array(scores[labels[k]]) - base))) for k in runners}
    r["top_p_ms"] = {shape: top_p_ms(shape) for shape in ("flat", "peaked")}
    r["stack_ms"] = stacks(runners["gpt2np"].model)
    model = runners["gpt2np"].model
    r["gemm_gflops"] = gemm_throughput(model.params, model.config, 3)
    T, cfg = 1023, model.config
    r["prefill_gflop"] = (weight_flops_per_token(cfg) * T + 2 * cfg.n_layer * cfg.n_embd * T * (T + 1)
                          + 2 * cfg.n_embd * cfg.vocab_size) / 1e9
    env = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "blas": blas_info(), "threads": THREADS}
    write(out, env, r)


def write(out: Path, env: dict, r: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps({"env": env, "results": r}, indent=1))
    plotted = plot(r, out / "peers.png")
    (out / "PEERS.md").write_text(markdown(env, r, plotted))
    print(markdown(env, r, plotted))


def markdown(env: dict, r: dict, plotted: bool) -> str:
    engines = list(r["engines"])
    ref = "ctranslate2-int8" if "ctranslate2-int8" in engines else None
    ours = [e for e in ("gpt2np", "gpt2np-int8") if e in engines] if ref else []  # each against CTranslate2 int8
    head = "| | " + " | ".join(r["engines"][e] for e in engines) + "".join(
        f" | {r['engines'][e].split(' (')[0]} ({r['engines'][e].split(' (')[1][:-1]}) vs CTranslate2 int8" for e in ours) + " |"
    lines = [f"# gpt2np beside other CPU engines ({env['date']})", "",
             f"Machine: {env['cpu']}; {env['blas']['library']} ({env['blas']['kernel']} kernel); every engine "
             f"with {env['threads']} threads, in one process, taking turns (best of two runs each). GPT-2 124M with "
             "random weights, float32 unless the column says int8. Ratios in one run are what to compare.", "",
             head, "| --- |" + " ---: |" * (len(engines) + len(ours))]
    blank = " |" * len(ours)

    def row(label, values, fmt, higher_better):
        cells = [fmt.format(values[e]) for e in engines]
        for e in ours:
            ratio = values[e] / values[ref] if higher_better else values[ref] / values[e]
            cells.append(f"{ratio:.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("decode at context 16, ms/token (lower is better)", r["decode_ms_ctx16"], "{:.1f}", False)
    row("decode at context 1000, ms/token", r["decode_ms_ctx1000"], "{:.1f}", False)
    row("prefill of 1023 tokens, s", r["prefill_1023_s"], "{:.2f}", False)
    for b, v in r["batch_tokens_per_s"].items():
        row(f"batch of {b}, 32 new tokens each: aggregate tokens/s (higher is better)", v, "{:.0f}", True)
    row("batch of 32, temperature 0.8 + top-p 0.95: tokens/s", r["sampled_b32_tokens_per_s"], "{:.0f}", True)
    greedy32 = r["batch_tokens_per_s"].get(32, r["batch_tokens_per_s"].get("32"))
    lines.append("| the same, as a fraction of greedy at batch 32 | " + " | ".join(
        f"{r['sampled_b32_tokens_per_s'][e] / greedy32[e]:.0%}" for e in engines) + blank + " |")
    row(f"scoring {r['score_tokens']:,} tokens: tokens/s", r["score_tokens_per_s"], "{:.0f}", True)
    lines.append("| greedy ids at batch 8 equal gpt2np's | " + " | ".join(
        "yes" if r["same_greedy_ids"][e] else "no" for e in engines) + blank + " |")
    lines.append("| scoring: largest difference from gpt2np's log-probabilities | " + " | ".join(
        f"{r['score_max_abs_diff'][e]:.1e}" for e in engines) + blank + " |")
    lines += ["", f"- gpt2np's top-p (0.95, temperature 0.8) on one row of 50,257 logits: "
                  f"{r['top_p_ms']['flat']:.2f} ms when flat (it keeps most of the vocabulary), "
                  f"{r['top_p_ms']['peaked']:.2f} ms when peaked (median of 100).",
              f"- gpt2np's decode step at context 16 (the forward pass alone) took {r['stack_ms']['decode']:.1f} ms "
              f"beside a bare matmul stack (the step's weight products and nothing else) of {r['stack_ms']['stored']:.1f} ms "
              f"with the weights as stored ([in, out]; {r['stack_ms']['stored'] / r['stack_ms']['decode']:.0%}) and "
              f"{r['stack_ms']['fastest']:.1f} ms in the layout OpenBLAS reads fastest "
              f"({r['stack_ms']['fastest'] / r['stack_ms']['decode']:.0%}), medians of 60 taking turns.",
              f"- Prefill of 1023 tokens is {r['prefill_gflop']:.0f} GFLOP (weight products, causal attention, the "
              f"last position's head): gpt2np ran it at {r['prefill_gflop'] / r['prefill_1023_s']['gpt2np']:.0f} GFLOP/s, "
              f"{r['prefill_gflop'] / r['prefill_1023_s']['gpt2np'] / r['gemm_gflops']:.0%} of this machine's "
              f"GEMM throughput in the same run ({r['gemm_gflops']:.0f} GFLOP/s on 1024-row products).",
              "- Memory: one stream stays within the file size + 130 MB (RESULTS.md). A batch adds, per sequence, "
              "its KV cache, preallocated for its prompt and new tokens: 2 x n_layer x n_embd x 4 bytes per "
              "position (72 KiB for 124M, 600 KiB for 1558M), so 32 sequences of 48 positions add 113 MB on "
              "124M; and a logits row of 201 KB per sequence at each step.",
              "- int8 weights are read as a quarter of the bytes, and both CTranslate2 and gpt2np with "
              "`weights=\"int8\"` (oneDNN's products) multiply them with int8 kernels; NumPy has no such product. "
              "Low-precision greedy ids may differ from float32's because their logits are rounded "
              "(docs/performance.md gives the measured error of each precision)."]
    if plotted:
        lines += ["", "![gpt2np beside CTranslate2 and transformers](peers.png)"]
    return "\n".join(lines) + "\n"


def plot(r: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    engines = list(r["engines"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    batches = [int(b) for b in r["batch_tokens_per_s"]]
    for i, e in enumerate(engines):
        axes[0].plot(batches, [v[e] for v in r["batch_tokens_per_s"].values()], "o-", color=f"C{i}",
                     label=r["engines"][e])
    axes[0].set(xlabel="prompts decoded together", ylabel="aggregate tokens/s", xscale="log",
                title="Batches (higher is better)")
    axes[0].set_xticks(batches, [str(b) for b in batches])
    figures = [("decode\ncontext 16", "decode_ms_ctx16", False), ("decode\ncontext 1000", "decode_ms_ctx1000", False),
               ("prefill\n1023 tokens", "prefill_1023_s", False), ("top-p\nbatch 32", "sampled_b32_tokens_per_s", True),
               ("scoring", "score_tokens_per_s", True)]
    width = 0.8 / len(engines)
    for i, e in enumerate(engines):
        speed = [(r[k][e] / r[k]["gpt2np"]) if up else (r[k]["gpt2np"] / r[k][e]) for _, k, up in figures]
        axes[1].bar(np.arange(len(figures)) + i * width, speed, width, color=f"C{i}", label=r["engines"][e])
    axes[1].set_xticks(np.arange(len(figures)) + width * (len(engines) - 1) / 2, [f[0] for f in figures])
    axes[1].axhline(1, color="k", lw=0.8)
    axes[1].set(ylabel="speed relative to gpt2np", title="Speed relative to gpt2np (higher is better)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description="gpt2np beside CTranslate2 and transformers, in one run.")
    ap.add_argument("--quick", action="store_true", help="one run each, a shorter scoring text")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--model-cache", type=Path, default=ROOT / "bench" / ".models")
    a = ap.parse_args()
    run(a.quick, a.out, a.model_cache)


if __name__ == "__main__":
    main()
