"""`make bench`, the weights' precision: bfloat16 and int8 products (`gpt2np.load(weights=...)`)
against float32 on one model folder.

- Quality, over every position of a varied text set (prose, code, numbers, other scripts,
  repetition): the largest and the mean |logit difference| from float32, the mean and largest KL
  divergence of the next-token distribution (float32's from the precision's), how often the most
  likely token is the same, and the perplexity ratio.
- Cost, each precision in a process of its own: load time (the copy is made then), the copy's
  bytes, and resident memory after a generation.

    python bench/precision_bench.py [--model FOLDER] [--out bench/results]

Without `--model`, the random-weight 124M model of the other benchmarks (the only weights a
machine without network access has); give a converted OpenAI folder for real-weight figures.
Writes bench/results/PRECISION.md and precision.json; needs the extra `gpt2np[onednn]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import gpt2np  # noqa: F401 -- before NumPy loads OpenBLAS: it sets its thread timeout (gpt2np.parallel)
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
PRECISIONS = ("float32", "bfloat16", "int8")
TEXTS = [
    "The history of the city begins with a small village on the river, where fishermen traded salt and "
    "grain with the farmers of the valley. By the twelfth century it had walls, a market and a bishop.",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n\nprint([fib(i) for i in range(10)])\n",
    "Prices rose 3.5% in 2023, to $1,204.50 per unit; see table 7 (p. 12) and the 2019-2022 series in appendix B.",
    "Zürich, Genève und Köln — naïve café déjà vu; 東京, Москва and Αθήνα are capitals, as is القاهرة.",
    "Q: What is the capital of France?\nA: Paris.\nQ: What is the capital of Italy?\nA: Rome.\nQ: And of Spain?\nA:",
    "yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes",
    '{"name": "Ada Lovelace", "born": 1815, "fields": ["mathematics", "computing"], "notes": null}',
]


def quality(m32, mq, texts=TEXTS) -> dict:
    """How far `mq`'s next-token predictions are from `m32`'s, over every position of `texts`."""
    dl, kl, agree, nll32, nllq, n = [], [], [], 0.0, 0.0, 0
    for t in texts:
        ids = m32.encode(t)
        a, b = m32.logits(ids).astype(np.float64), mq.logits(ids).astype(np.float64)
        la = a - a.max(-1, keepdims=True)
        la -= np.log(np.exp(la).sum(-1, keepdims=True))
        lb = b - b.max(-1, keepdims=True)
        lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
        dl.append(np.abs(a - b).ravel())
        kl.append((np.exp(la) * (la - lb)).sum(-1))
        agree.append(a.argmax(-1) == b.argmax(-1))
        nll32 -= la[np.arange(len(ids) - 1), ids[1:]].sum()
        nllq -= lb[np.arange(len(ids) - 1), ids[1:]].sum()
        n += len(ids) - 1
    dl, kl = np.concatenate(dl), np.concatenate(kl)
    return {"max_dlogit": float(dl.max()), "mean_dlogit": float(dl.mean()), "mean_kl": float(kl.mean()),
            "max_kl": float(kl.max()), "top1": float(np.concatenate(agree).mean()),
            "ppl_ratio": float(np.exp((nllq - nll32) / n)), "positions": int(sum(len(x) for x in agree))}


def cost(folder: str, weights: str) -> dict:
    """In this process: load time, the copy's bytes, resident memory after a short generation."""
    import gpt2np

    started = time.perf_counter()
    model = gpt2np.load(folder, weights=weights)
    load_s = time.perf_counter() - started
    model.complete("The history of the city", 32, stop_at_eos=False)
    status = open("/proc/self/status").read()
    return {"load_s": load_s, "packed_bytes": model.matmul.packed_bytes, "describe": model.matmul.describe(),
            "rss_mb": int(status.split("VmRSS:")[1].split()[0]) / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="a model folder [default: the random-weight 124M]")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--model-cache", type=Path, default=ROOT / "bench" / ".models")
    ap.add_argument("--cost", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.cost:
        print(json.dumps(cost(*a.cost)))
        return
    sys.path.insert(0, str(ROOT / "bench"))
    import bench

    import gpt2np

    folder = a.model or bench.make_model(a.model_cache / "124M", "124M")
    try:
        gpt2np.load(folder, weights="int8")
    except gpt2np.GPT2Error as e:
        raise SystemExit(f"precision_bench: {e}")
    m32 = gpt2np.load(folder)
    res = {"model": str(folder), "random_weights": a.model is None,
           "quality": {w: quality(m32, gpt2np.load(folder, weights=w)) for w in PRECISIONS[1:]}, "cost": {}}
    for w in PRECISIONS:
        r = subprocess.run([sys.executable, __file__, "--cost", str(folder), w], capture_output=True, text=True,
                           check=True, env=os.environ)
        res["cost"][w] = json.loads(r.stdout.splitlines()[-1])
    res["env"] = {"date": time.strftime("%Y-%m-%d"), "cpu": bench.cpu_name()}
    bench.save_results(a.out, "precision", res, markdown(res))


def markdown(res: dict) -> str:
    q, c, env = res["quality"], res["cost"], res["env"]
    which = ("the random-weight 124M model of the other benchmarks (GPT-2 small's shapes; no real weights "
             "here): its figures show the arithmetic's error, not GPT-2's own sensitivity to it, which needs a "
             "real folder (`--model`)") if res["random_weights"] else f"`{res['model']}`"
    lines = [f"# Weights at float32, bfloat16 and int8 ({env['date']})", "",
             f"Written by `bench/precision_bench.py` on {env['cpu']}, for {which}. Each precision's logits "
             f"against float32's at every position of {q['int8']['positions']} over a varied text set.", "",
             "| | bfloat16 | int8 |", "| --- | ---: | ---: |"]
    rows = [("largest \\|logit difference\\|", "max_dlogit", "{:.3f}"), ("mean \\|logit difference\\|", "mean_dlogit", "{:.4f}"),
            ("mean KL divergence of the next-token distribution, nats", "mean_kl", "{:.2e}"),
            ("largest KL divergence at one position, nats", "max_kl", "{:.2e}"),
            ("most likely token the same as float32's", "top1", "{:.1%}"), ("perplexity ratio to float32", "ppl_ratio", "{:.4f}")]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt.format(q['bfloat16'][key])} | {fmt.format(q['int8'][key])} |")
    lines += ["", "| | float32 | bfloat16 | int8 |", "| --- | ---: | ---: | ---: |",
              "| load, s (the copy is made here) | " + " | ".join(f"{c[w]['load_s']:.2f}" for w in PRECISIONS) + " |",
              "| the weights' copy in oneDNN's layout, MiB | " + " | ".join(
                  f"{c[w]['packed_bytes'] / 2**20:.0f}" for w in PRECISIONS) + " |",
              "| resident memory after 32 tokens, MB | " + " | ".join(f"{c[w]['rss_mb']:.0f}" for w in PRECISIONS) + " |",
              "", "bfloat16 rounds each weight and each product's activations to bfloat16 and sums in float32; "
              "int8 stores each weight column with its own scale and quantizes each product's activations with "
              "one scale per row (oneDNN 3.2's int8 product takes no finer activation scales), summing in int32. "
              "Embeddings, layer norms, attention, the KV cache and the softmax stay float32 at every precision; "
              "the LM head takes the precision too (held at float32 it changed int8's mean KL by about a "
              "seventh on the suite's model, for four times the head's bytes)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
