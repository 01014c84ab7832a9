"""`make bench`: how close gpt2np runs to this machine's limits, measured in one run.

Makes random-weight model folders at GPT-2's real shapes (weights do not change the speed), then
measures, in one process and interleaved where it matters:

- ceilings: copy bandwidth; a bare "matmul stack" that reads exactly the weights one decode step
  reads, in the same layout and thread count; GEMM throughput for prefill-sized products;
- decode ms/token at several contexts, as a fraction of the matmul stack;
- prefill tokens/s and GFLOP/s, as a fraction of GEMM throughput;
- start-up (a fresh `gpt-run` to its first token), load time, peak memory against the file size;
- tokenizer throughput against tiktoken (when installed), and a picoGPT-style baseline.

Ratios taken in one run are what to compare; absolute times drift on shared machines.

    python bench/bench.py [--models 124M,355M] [--large] [--quick] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gpt2np  # before NumPy loads OpenBLAS: it sets its thread timeout (gpt2np.parallel)
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from gpt2np import GPT2Config, kv, model as M  # noqa: E402

import naive  # noqa: E402

SHAPES = {"124M": (768, 12, 12), "355M": (1024, 24, 16), "774M": (1280, 36, 20), "1558M": (1600, 48, 25)}
BPE = ROOT / "tests" / "data" / "gpt2-bpe"
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------------------------------------- setup
def make_model(folder: Path, name: str) -> Path:
    """A model folder with random float32 weights at the real shapes of GPT-2 `name` (reused if present)."""
    from gpt2np.outdir import atomic_output_dir
    from gpt2np_convert.writer import copy_file, write_safetensors

    if (folder / "model.safetensors").exists():
        return folder
    E, L, H = SHAPES[name]
    config = GPT2Config(n_embd=E, n_layer=L, n_head=H)
    rng = np.random.default_rng(0)

    def tensors():
        for tensor, shape in config.tensor_shapes().items():
            a = rng.standard_normal(shape, dtype=np.float32)
            a *= np.float32(0.02 if len(shape) == 2 else 0.1)
            if tensor.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                a += np.float32(1)
            yield tensor, a

    print(f"making a random-weight {name} model in {folder} ...", file=sys.stderr)
    with atomic_output_dir(folder, force=True) as tmp:
        write_safetensors(tmp / "model.safetensors", config.tensor_shapes(), tensors(),
                          {"format": "pt", "gpt2np.source": f"random weights, {name} shapes"})
        (tmp / "config.json").write_text(json.dumps(config.to_dict()))
        copy_file(BPE / "encoder.json", tmp / "vocab.json")
        copy_file(BPE / "vocab.bpe", tmp / "merges.txt")
    return folder


def save_results(out: Path, stem: str, res: dict, text: str) -> None:
    """Write a bench's results as `out/STEM.json` and its report as `out/STEM-uppercase.md`, and
    print the report."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    (out / f"{stem.upper()}.md").write_text(text)
    print(text)


def blas_info() -> dict:
    try:
        from threadpoolctl import threadpool_info
        info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
        if info:
            i = info[0]
            return {"library": f"{i['internal_api']} {i.get('version')}", "kernel": i.get("architecture"),
                    "threads": i["num_threads"]}
    except ImportError:
        pass
    return {"library": "unknown (install threadpoolctl)", "kernel": None, "threads": os.cpu_count()}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def best(f, reps: int) -> float:
    """The fastest of `reps` timed calls (seconds): the least disturbed by other load."""
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times)


# ------------------------------------------------------------------------------------------ ceilings
def copy_bandwidth(reps: int) -> float:
    """GB/s of a large array copy, counting the bytes read and written."""
    src = np.ones(64 * 2**20, dtype=np.float32)  # 256 MB, far beyond any cache
    dst = np.empty_like(src)
    return 2 * src.nbytes / best(lambda: np.copyto(dst, src), reps) / 1e9


def matmul_stack(p: M.Params, rows: int = 1):
    """One decode step's weight products for `rows` sequences and nothing else: every weight
    matmul and the LM head, through the seam the model takes them by (`gpt2np.matmul`: the backend
    the model was loaded with)."""
    E = p.wte.shape[1]
    x = np.full((rows, E), 0.01, np.float32)
    h = np.full((rows, p.blocks[0].c_fc.w.shape[1]), 0.01, np.float32)

    def run():
        for b in p.blocks:
            M.matmul(x, b.c_attn.w, b.c_attn.packed)
            M.matmul(x, b.attn_proj.w, b.attn_proj.packed)
            M.matmul(x, b.c_fc.w, b.c_fc.packed)
            M.matmul(h, b.mlp_proj.w, b.mlp_proj.packed)
        M.lm_head(p, x)
    return run


def side_by_side(floor, work, runs: int) -> tuple[float, float]:
    """Median ms of `floor()` and of `work(i)`, each run of work timed right after one of floor."""
    floor_t, work_t = [], []
    for i in range(runs):
        t = time.perf_counter()
        floor()
        floor_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        work(i)
        work_t.append(time.perf_counter() - t)
    return statistics.median(floor_t) * 1000, statistics.median(work_t) * 1000


def weight_flops_per_token(config: GPT2Config) -> int:
    E, F = config.n_embd, config.d_mlp
    return 2 * config.n_layer * (E * 3 * E + E * E + E * F + F * E)


def gemm_products(p: M.Params, config: GPT2Config, rows: int = 1024):
    """(run, flops): the prefill-sized products [rows, in] @ W for the first layers' weights."""
    E, F = config.n_embd, config.d_mlp
    x, h = np.full((rows, E), 0.01, np.float32), np.full((rows, F), 0.01, np.float32)
    blocks = p.blocks[:4]

    def run():
        for b in blocks:
            x @ b.c_attn.w
            x @ b.attn_proj.w
            x @ b.c_fc.w
            h @ b.mlp_proj.w
    return run, len(blocks) * weight_flops_per_token(config) / config.n_layer * rows


def gemm_throughput(p: M.Params, config: GPT2Config, reps: int, rows: int = 1024) -> float:
    """GFLOP/s of the prefill products (`gemm_products`), best of `reps`."""
    run, flops = gemm_products(p, config, rows)
    return flops / best(run, reps) / 1e9


# ---------------------------------------------------------------------------------------- the model
def decode_vs_stack(model, ctx: int, steps: int) -> dict:
    """Decode steps at context `ctx`, each timed right after one run of the matmul stack."""
    cfg, p = model.config, model.params
    steps = min(steps, cfg.n_positions - ctx)
    cache = kv.KVCache(cfg, ctx + steps)
    M.forward(p, cfg, np.arange(ctx) % 50000, cache)
    stack = matmul_stack(p)
    stack()
    s, d = side_by_side(stack, lambda i: M.forward(p, cfg, np.array([i % 50000]), cache), steps)
    return {"context": ctx, "ms_per_token": d, "stack_ms": s, "fraction_of_stack": s / d}


def batched_steps(model, seqs: int, ctx: int, steps: int) -> dict:
    """Engine decode steps of `seqs` sequences at context `ctx` (every one decoding, greedy),
    each timed right after the bare products at `seqs` rows (`matmul_stack`): the step's
    overhead over its floor, measured side by side."""
    engine = model.engine(max_batch=seqs)
    for b in range(seqs):
        engine.add([(97 * b + i) % 50000 for i in range(ctx)], gpt2np.Options(n_tokens=steps + 2, stop_at_eos=False))
    while any(s.reading or not s.result.ids for s in engine.running) or engine.waiting:
        engine.step()  # the prompts, and each sequence's first token
    products = matmul_stack(model.params, seqs)
    products()
    pr, st = side_by_side(products, lambda _: engine.step(), steps)
    engine.cancel_all()
    engine.run()
    cfg = model.config  # the keys and values a step reads: every position of every sequence, each layer
    kv_bytes = seqs * (ctx + 2 + steps / 2) * cfg.kv_bytes_per_position
    return {"sequences": seqs, "context": ctx, "step_ms": st, "products_ms": pr, "step_over_products": st / pr,
            "tokens_per_s": seqs / st * 1000, "kv_read_mb": kv_bytes / 1e6}


def prefill(model, T: int, reps: int) -> dict:
    """A T-token prompt's pass (fresh cache, last position's logits), each run timed right after
    one of the GEMM products (`gemm_products`): GFLOP/s of each, medians, side by side."""
    cfg, p = model.config, model.params
    ids = np.arange(T) % 50000
    gemm_run, gemm_flops = gemm_products(p, cfg)
    gemm_ms, ms = side_by_side(gemm_run, lambda _: M.forward(p, cfg, ids, kv.KVCache(cfg, T)), reps)
    attention_flops = 2 * cfg.n_layer * cfg.n_embd * T * (T + 1)  # QK^T and AV over the causal half
    flops = weight_flops_per_token(cfg) * T + attention_flops + 2 * cfg.n_embd * cfg.vocab_size
    gflops, gemm = flops / ms / 1e6, gemm_flops / gemm_ms / 1e6
    return {"tokens": T, "seconds": ms / 1000, "tokens_per_s": T / ms * 1000, "gflop": flops / 1e9,
            "gflops": gflops, "gemm_gflops": gemm, "fraction_of_gemm": gflops / gemm}


def naive_ms_per_token(model, folder: Path, ctx: int, n: int) -> float:
    st = gpt2np.weights.SafetensorsFile(folder / "model.safetensors")
    params = naive.params_from({k.removeprefix("transformer."): v for k, v in st.tensors.items()},
                               model.config.n_layer)
    ids = list(np.arange(ctx) % 50000)
    t = time.perf_counter()
    naive.generate(ids, params, model.config.n_head, n)
    return (time.perf_counter() - t) / n * 1000


def ours_ms_per_token(model, ctx: int, n: int) -> float:
    """Generation as users run it (prompt pass included), per token: the fair match for naive."""
    ids = list(np.arange(ctx) % 50000)
    t = time.perf_counter()
    list(model.generate_ids(ids, n, stop_at_eos=False))
    return (time.perf_counter() - t) / n * 1000


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child started by this large
# process would report the parent's size.
def batch_throughput(model, batch: int = 8, prompt_tokens: int = 16, n: int = 32) -> dict:
    """Aggregate tokens/s of `batch` prompts decoded together against one prompt at a time."""
    prompts = [[(97 * b + i) % 50000 for i in range(prompt_tokens)] for b in range(batch)]
    t = time.perf_counter()
    for p in prompts:
        model.complete(p, n, stop_at_eos=False)
    single = time.perf_counter() - t
    t = time.perf_counter()
    model.generate_batch(prompts, n, stop_at_eos=False)
    together = time.perf_counter() - t
    return {"batch": batch, "tokens": batch * n, "one_at_a_time_tokens_per_s": batch * n / single,
            "batch_tokens_per_s": batch * n / together, "speedup": single / together}


PEAK_RSS = """
import sys
from gpt2np.cli.run import gpt_run
try:
    gpt_run.main(sys.argv[1:], standalone_mode=False)
finally:
    sys.stdout.flush()
    hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    print(hwm * 1024, file=sys.stderr)
"""


def peak_rss(folder: Path, prompt_tokens: int, n: int) -> int:
    prompt = " hello" * prompt_tokens
    out = subprocess.run([sys.executable, "-c", PEAK_RSS, str(folder), prompt, "-n", str(n), "--ignore-eos"],
                         capture_output=True, text=True, check=True)
    return int(out.stderr.split()[-1])


def startup(folder: Path, reps: int) -> float:
    prompt = "The quick brown fox jumps over the lazy dog again"  # 10 tokens
    cmd = [str(BIN / "gpt-run"), str(folder), prompt, "-n", "1"]
    subprocess.run(cmd, capture_output=True, check=True)  # warm the page cache
    return best(lambda: subprocess.run(cmd, capture_output=True, check=True), reps)


# ---------------------------------------------------------------------------------------- tokenizer
MULTILINGUAL = """日本語のテキストです。中文文本，简体与繁體。한국어 텍스트입니다. Ελληνικά κείμενα. Русский текст.
עברית, العربية, हिन्दी, ไทย. Emoji 🙂😀👍🏽 👨‍👩‍👧‍👦 🇫🇷. Combining: e\u0301 n\u0303. I'M SURE YOU'LL SAY THEY'VE.
Prices: $1,000.50 €20 £3. Numbers 1234567890 3.14159 1e-10.\r\n\ttabs\t\t   spaces   \n"""


def mixed_text(megabytes: float) -> str:
    """Real text, no repetition: this repository's docs and code, many scripts and emoji, then
    Python's own standard library (code, comments and English prose) up to `megabytes`."""
    import sysconfig

    parts = [p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("*.md")) + sorted(ROOT.glob("*/*/*.py"))
             if ".venv" not in p.parts]
    parts += [MULTILINGUAL] * 20
    size = sum(len(p.encode()) for p in parts)
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("**/*.py")):
        if size >= megabytes * 1e6:
            break
        try:
            part = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(part)
        size += len(part.encode())
    return "\n".join(parts)


def tokenizer_speed(reps: int, megabytes: float) -> dict:
    text = mixed_text(megabytes)
    size = len(text.encode()) / 1e6
    tok = gpt2np.Tokenizer.from_files(BPE / "encoder.json", BPE / "vocab.bpe")
    t = time.perf_counter()
    ids = tok.encode(text)  # cold cache: the cache fills as it goes, as in real use
    ours = size / (time.perf_counter() - t)
    result = {"megabytes": size, "ours_mb_per_s": ours}
    enc = _tiktoken()
    if enc is not None:
        assert enc.encode_ordinary(text) == ids, "tokenizers disagree"
        result["tiktoken_mb_per_s"] = size / best(lambda: enc.encode_ordinary(text), reps)
        result["fraction_of_tiktoken"] = ours / result["tiktoken_mb_per_s"]
    result["long"] = long_pieces(reps)
    return result


def long_pieces(reps: int) -> dict:
    """One-piece texts (a run of letters, digits or CJK is one regex piece, however long): the
    NumPy rounds of `gpt2np.bpe_long` against tiktoken, the pair-at-a-time loop at 16 KiB (quadratic:
    4 MiB would take hours), and what a server pays to refuse a 4 MiB prompt for a 1024 context."""
    import random

    from gpt2np.tokenizer import TokenLimitError

    rng = random.Random(0)
    mib = 4 * 1024 * 1024
    texts = {"random letters": "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=mib)), "one letter": "a" * mib,
             "digits": "".join(rng.choices("0123456789", k=mib)),
             "CJK": "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(mib // 3))}
    tok = gpt2np.Tokenizer.from_files(BPE / "encoder.json", BPE / "vocab.bpe")
    enc = _tiktoken()
    out = {"machine": {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name()}, "pieces": []}
    for name, text in texts.items():
        data = text.encode()
        row = {"text": name, "bytes": len(data), "tokens": len(tok.encode(text)),
               "rounds_s": best(lambda: tok.encode(text), reps)}
        small = data[:16384].decode("utf-8", "ignore")
        row["loop_16k_s"] = best(lambda: tok._bpe(tok._byte_chars(small)), 1)
        row["rounds_16k_s"] = best(lambda: tok._bpe_piece(small), reps)
        if enc is not None:
            assert enc.encode_ordinary(text) == tok.encode(text), "tokenizers disagree"
            row["tiktoken_s"] = best(lambda: enc.encode_ordinary(text), reps)
        out["pieces"].append(row)

    def refuse():
        try:
            tok.encode(texts["random letters"], limit=1024)
        except TokenLimitError:
            return
        raise AssertionError("a 4 MiB prompt fit 1024 tokens")
    out["refuse_4mib_s"] = best(refuse, reps)
    return out


def _tiktoken():
    try:
        import tiktoken
        from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    except ImportError:
        return None
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")
    return tiktoken.Encoding(
        "gpt2-local", pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=data_gym_to_mergeable_bpe_ranks(str(BPE / "vocab.bpe"), str(BPE / "encoder.json")),
        special_tokens={"<|endoftext|>": 50256})


# ------------------------------------------------------------------------------------------- report
def bench_model(name: str, folder: Path, quick: bool) -> dict:
    reps = 2 if quick else 5
    model = gpt2np.load(folder)
    size = (folder / "model.safetensors").stat().st_size
    print(f"== {name}: {size / 1e6:.0f} MB", file=sys.stderr)
    stack = matmul_stack(model.params)
    stack()  # page the weights in
    r = {"model": name, "file_bytes": size}
    r["load_s"] = best(lambda: gpt2np.load(folder), reps)
    r["gemm_gflops"] = gemm_throughput(model.params, model.config, reps)
    steps = 12 if quick else 40
    r["decode"] = [decode_vs_stack(model, ctx, steps) for ctx in (16, 128, 256, 512, 768, 1000)]
    r["stack_ms"] = statistics.median(d["stack_ms"] for d in r["decode"])
    r["prefill"] = [prefill(model, T, reps) for T in (16, 128, 512, 1024)]
    if name == "124M":
        r["batched_steps"] = [batched_steps(model, seqs, ctx, 6 if quick else 16)
                              for ctx in (64, 512) for seqs in (1, 2, 4, 8, 16, 32, 64)]
    r["batch"] = batch_throughput(model)
    r["startup_s"] = startup(folder, reps)
    r["peak_rss_bytes"] = peak_rss(folder, 512, 64 if quick else 256)
    if name in ("124M", "355M"):
        n = 2 if quick else 3
        r["baseline"] = [{"context": ctx, "naive_ms_per_token": naive_ms_per_token(model, folder, ctx, n),
                          "ours_ms_per_token": ours_ms_per_token(model, ctx, n)} for ctx in (16, 512)]
        for b in r["baseline"]:
            b["speedup"] = b["naive_ms_per_token"] / b["ours_ms_per_token"]
    return r


def plot(results: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, r in enumerate(results):
        color = f"C{i}"
        ctx = [d["context"] for d in r["decode"]]
        axes[0].plot(ctx, [d["ms_per_token"] for d in r["decode"]], "o-", color=color, label=f"{r['model']} decode")
        axes[0].plot(ctx, [d["stack_ms"] for d in r["decode"]], "--", color=color, lw=1,
                     label=f"{r['model']} matmul-stack ceiling (same moment)")
        T = [p["tokens"] for p in r["prefill"]]
        axes[1].plot(T, [p["tokens_per_s"] for p in r["prefill"]], "o-", color=color, label=f"{r['model']} prefill")
        axes[1].plot(T, [r["gemm_gflops"] * p["tokens"] / (p["gflops"] * p["seconds"]) for p in r["prefill"]], "--",
                     color=color, lw=1, label=f"{r['model']} at GEMM throughput")
    axes[0].set(xlabel="context length (tokens)", ylabel="ms per token", title="Decode (lower is better)")
    axes[1].set(xlabel="prompt length (tokens)", ylabel="tokens/s", xscale="log", yscale="log",
                title="Prefill (higher is better)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def markdown(env: dict, results: list[dict], tok: dict, plotted: bool) -> str:
    lines = [f"# gpt2np benchmark ({env['date']})", "",
             f"Machine: {env['cpu']}, {env['cores']} cores; NumPy {env['numpy']}, {env['blas']['library']} "
             f"({env['blas']['kernel']} kernel), {env['blas']['threads']} BLAS threads; Python {env['python']}. "
             f"Copy bandwidth {env['copy_gb_s']:.1f} GB/s (read + write). Random weights at the real shapes, float32.",
             "", "Ratios are taken within this one run; absolute times drift between runs on shared machines.", ""]
    for r in results:
        lines += [f"## {r['model']} ({r['file_bytes'] / 1e6:.0f} MB)", "",
                  f"Ceilings: matmul stack {r['stack_ms']:.2f} ms, median of the same-moment runs (the weight reads of one decode step, "
                  f"{r['file_bytes'] / r['stack_ms'] / 1e6:.1f} GB/s); GEMM {r['gemm_gflops']:.0f} GFLOP/s "
                  f"(1024-row products).", "",
                  "| decode at context | ms/token | tokens/s | matmul stack, same moment | fraction of ceiling |",
                  "| ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {d['context']} | {d['ms_per_token']:.2f} | {1000 / d['ms_per_token']:.1f} | "
                  f"{d['stack_ms']:.2f} ms | {d['fraction_of_stack']:.0%} |" for d in r["decode"]]
        lines += ["", "Prefill (medians), each pass timed right after the GEMM products it is measured against:", "",
                  "| prefill tokens | seconds | tokens/s | GFLOP/s | GEMM, same moment | fraction of GEMM |",
                  "| ---: | ---: | ---: | ---: | ---: | ---: |"]
        lines += [f"| {p['tokens']} | {p['seconds']:.3f} | {p['tokens_per_s']:.0f} | {p['gflops']:.0f} | "
                  f"{p.get('gemm_gflops', r['gemm_gflops']):.0f} | {p['fraction_of_gemm']:.0%} |" for p in r["prefill"]]
        if r.get("batched_steps"):
            lines += ["", "Decode steps of many sequences (the engine, every sequence decoding) against their floor, "
                      "the bare weight products at as many rows (LM head included), timed one after the other. "
                      "Attention must also read every cached key and value once a step: the last columns "
                      "give those bytes and the time they take at this run's copy bandwidth, a floor the "
                      "products do not count.", "",
                      "| sequences | context | step ms | products ms | step / products | tokens/s "
                      "| K/V read per step | at copy bandwidth | step / (products + K/V read) |",
                      "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
            for b in r["batched_steps"]:
                kv_ms = b["kv_read_mb"] / env["copy_gb_s"]
                lines.append(f"| {b['sequences']} | {b['context']} | {b['step_ms']:.1f} | {b['products_ms']:.1f} | "
                             f"{b['step_over_products']:.2f}x | {b['tokens_per_s']:.0f} | {b['kv_read_mb']:.0f} MB | "
                             f"{kv_ms:.1f} ms | {b['step_ms'] / (b['products_ms'] + kv_ms):.2f}x |")
        rss, size = r["peak_rss_bytes"], r["file_bytes"]
        lines += ["", f"- Start-up, fresh `gpt-run` to first token (10-token prompt, weights in page cache): "
                      f"{r['startup_s']:.3f} s; model + tokenizer load alone: {r['load_s'] * 1000:.0f} ms.",
                  f"- Peak resident memory, 512-token prompt + generation: {rss / 1e6:.0f} MB = file size "
                  f"{'+' if rss >= size else '-'} {abs(rss - size) / 1e6:.0f} MB."]
        if "batch" in r:
            b = r["batch"]
            lines.append(f"- Batch of {b['batch']} prompts decoded together ({b['tokens']} tokens, greedy): "
                         f"{b['batch_tokens_per_s']:.0f} tokens/s in aggregate against "
                         f"{b['one_at_a_time_tokens_per_s']:.0f} one prompt at a time: **{b['speedup']:.1f}x**.")
        for b in r.get("baseline", []):
            lines.append(f"- Baseline (picoGPT style, full recompute) at context {b['context']}: "
                         f"{b['naive_ms_per_token']:.0f} ms/token vs {b['ours_ms_per_token']:.1f}: "
                         f"**{b['speedup']:.1f}x** faster.")
        lines.append("")
    if tok:
        long = tok.get("long")
        when = f" ({long['machine']['date']}, {long['machine']['cpu']})" if long else ""
        line = (f"## Tokenizer{when}\n\nEncoding {tok['megabytes']:.1f} MB of mixed text: "
                f"{tok['ours_mb_per_s']:.2f} MB/s (pure Python)")
        if "tiktoken_mb_per_s" in tok:
            line += (f"; tiktoken (Rust, one thread) {tok['tiktoken_mb_per_s']:.2f} MB/s: "
                     f"**{tok['fraction_of_tiktoken']:.0%}** of tiktoken, identical tokens")
        lines += [line + ".", ""]
        if long:
            lines += ["One-piece texts of 4 MiB (best of runs): GPT-2's regex makes one "
                      "piece of a whole run of letters, digits or CJK characters, merged here in NumPy rounds "
                      "(`gpt2np/bpe_long.py`); the pair-at-a-time loop is quadratic in the piece's length.", "",
                      "| one piece | bytes | tokens | seconds | tiktoken seconds | 16 KiB: loop / rounds |",
                      "| --- | ---: | ---: | ---: | ---: | ---: |"]
            for p in long["pieces"]:
                tk = f"{p['tiktoken_s']:.2f}" if "tiktoken_s" in p else "-"
                lines.append(f"| {p['text']} | {p['bytes']:,} | {p['tokens']:,} | {p['rounds_s']:.2f} | {tk} | "
                             f"{p['loop_16k_s']:.2f} s / {p['rounds_16k_s'] * 1000:.0f} ms |")
            lines += ["", f"Refusing a 4 MiB one-piece prompt for a 1024-token context (`encode(limit=1024)`, "
                          f"from its length alone): {long['refuse_4mib_s'] * 1e6:.0f} µs.", ""]
    if plotted:
        lines += ["![decode and prefill](bench.png)", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description="Benchmark gpt2np against this machine's ceilings.")
    ap.add_argument("--models", default="124M,355M", help="comma-separated, from 124M, 355M, 774M, 1558M")
    ap.add_argument("--large", action="store_true", help="also 774M and 1558M (6.2 GB; slow to make)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--model-cache", type=Path, default=ROOT / "bench" / ".models")
    ap.add_argument("--from-json", type=Path, help="only rewrite the report and plot from a results.json")
    ap.add_argument("--tokenizer-only", action="store_true",
                    help="measure the tokenizer again; keep the models' figures of the last results.json")
    a = ap.parse_args()
    if a.tokenizer_only:
        saved = json.loads((a.out / "results.json").read_text())
        write_report(a.out, saved["env"], saved["models"], tokenizer_speed(3, 2.0 if a.quick else 5.0))
        return
    if a.from_json:
        saved = json.loads(a.from_json.read_text())
        for r in saved["models"]:
            r["stack_ms"] = statistics.median(d["stack_ms"] for d in r["decode"])
        write_report(a.out, saved["env"], saved["models"], saved["tokenizer"])
        return
    names = a.models.split(",") + (["774M", "1558M"] if a.large else [])
    for n in names:
        if n not in SHAPES:
            ap.error(f"unknown model {n}")
    env = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": os.cpu_count(),
           "numpy": np.__version__, "python": platform.python_version(), "blas": blas_info(),
           "copy_gb_s": copy_bandwidth(5)}
    print(f"{env['cpu']}: {env['blas']}", file=sys.stderr)
    results = [bench_model(n, make_model(a.model_cache / n, n), a.quick) for n in dict.fromkeys(names)]
    tok = tokenizer_speed(3, 2.0 if a.quick else 5.0)
    write_report(a.out, env, results, tok)


def write_report(out: Path, env: dict, results: list[dict], tok: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    plotted = plot(results, out / "bench.png")
    (out / "results.json").write_text(json.dumps({"env": env, "models": results, "tokenizer": tok}, indent=1))
    report = markdown(env, results, tok, plotted)
    (out / "RESULTS.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
