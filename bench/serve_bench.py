"""`make bench-serve`: `gpt-serve` under load on loopback, against in-process generation, in one run.

Starts a real `gpt-serve` on a random-weight 124M model, then:

- in-process `GPT2.complete` speed (before and after the HTTP runs, averaged: the baseline);
- 1, 4, 8 and 16 concurrent streaming clients, each sending a bounded number of requests:
  aggregate tokens/s, time to first token and inter-token latency (p50, p99), errors;
- a 1000-token prompt joining 4 running streams: their inter-token latency p50 and p99 while
  it is read in chunks (sized by `--prefill-stall`), and its own time to first token.

Ratios in one run are what to compare; absolute times drift on shared machines.

    python bench/serve_bench.py [--tokens 64] [--requests 3] [--out bench/results]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import gpt2np  # before NumPy loads OpenBLAS: it sets its thread timeout (gpt2np.parallel)
from gpt2np import kv, model as M
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench import best, blas_info, cpu_name, make_model, matmul_stack, save_results  # noqa: E402

BIN = Path(sys.executable).parent
PROMPT = "The history of the city begins with"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


class Server:
    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen([str(BIN / "gpt-serve"), str(model_dir), "--port", "0", "--log-level", "warning",
                                      *args], stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
        for line in self.proc.stderr:
            found = re.search(r"serving (\S+) on (http://\S+)", line)
            if found:
                self.name, self.url = found.groups()
                return
        raise RuntimeError("gpt-serve did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


class PeerServer:
    """Another engine's OpenAI-compatible server on loopback: started with `cmd`, its output in `log`,
    ready when /health answers 200 (polled every `poll` s, for at most `timeout` s), else stopped
    with its log kept for the error to point at; `stop` after a run deletes the log."""

    def __init__(self, cmd: list[str], log: Path, port: int, timeout: float, poll: float, env: dict | None = None):
        self.name, self.url = "124M", f"http://127.0.0.1:{port}"
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(poll)
        self._halt()
        raise RuntimeError(f"{Path(cmd[0]).name} did not start (see {log})")

    def stop(self) -> None:
        self._halt()
        Path(self.log.name).unlink(missing_ok=True)

    def _halt(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class VLLM(PeerServer):
    """vLLM's OpenAI server (its CPU build, in its own venv), as ../shared/PERF-NOTES.md runs it."""

    def __init__(self, python: Path, model_dir: Path, port: int = 8012):
        venv = python.parent.parent
        iomp = next(venv.rglob("libiomp5.so"), None)
        preload = " ".join(p for p in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", str(iomp or ""))
                           if p and Path(p).exists())
        env = {**os.environ, "LD_PRELOAD": preload, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-1",
               "HF_HUB_OFFLINE": "1"}
        super().__init__([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                          "--served-model-name", "124M", "--port", str(port), "--dtype", "float32",
                          "--max-model-len", "1024"], ROOT / "bench" / "results" / "vllm.log.tmp", port,
                         timeout=300, poll=2, env=env)


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants (vLLM runs its engine in a child)."""
    rows = [tuple(map(int, line.split())) for line in
            subprocess.run(["ps", "-e", "-o", "pid=,ppid=,rss="], capture_output=True, text=True).stdout.splitlines()
            if line.strip()]
    tree, grew = {pid}, True
    while grew:
        grew = False
        for p, parent, _ in rows:
            if parent in tree and p not in tree:
                tree.add(p)
                grew = True
    return sum(rss for p, _, rss in rows if p in tree) / 1024


async def stream_one(client: httpx.AsyncClient, server: Server, prompt, max_tokens: int) -> dict:
    """One streamed request: its send time, chunk arrival times, token count, error."""
    body = {"model": server.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent, times, tokens, pieces = time.perf_counter(), [], 0, 0
    try:
        async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return {"sent": sent, "times": [], "tokens": 0, "error": r.status_code}
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    times.append(time.perf_counter())
                    pieces += bool(chunk["choices"][0].get("text"))
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"sent": sent, "times": times, "tokens": tokens, "error": type(e).__name__}
    # a server that sends no usage (llama-server does not): one chunk with text per token (its last
    # chunk, which carries only the finish reason, is not one)
    return {"sent": sent, "times": times, "tokens": tokens or pieces, "error": None}


async def load(server: Server, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending `requests` streamed requests one after another."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def one_client():
            return [await stream_one(client, server, PROMPT, max_tokens) for _ in range(requests)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(one_client() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    ttft = [r["times"][0] - r["sent"] for r in ok if r["times"]]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in ok)
    per_request = [r["tokens"] / (r["times"][-1] - r["sent"]) for r in ok if r["times"]]
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "request_tokens_per_s": statistics.mean(per_request),
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99)}


async def long_prompt_joins(server: Server, model, running: int, max_tokens: int) -> dict:
    """`running` streams decode; once they are under way, a 1000-token prompt joins."""
    long_prompt = [int(i) for i in (list(range(1000, 2000)))]
    async with httpx.AsyncClient(timeout=600) as client:
        streams = [asyncio.create_task(stream_one(client, server, PROMPT, max_tokens)) for _ in range(running)]
        await asyncio.sleep(1.0)
        joined = time.perf_counter()
        long = await stream_one(client, server, long_prompt, 16)
        results = await asyncio.gather(*streams)
    # The running streams' latencies from a second before the long prompt joined until it was read
    # and a second after: what a user streaming at that time sees.
    window = (joined - 1.0, long["times"][0] + 1.0 if long["times"] else joined + 10)
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:]) if window[0] <= a and b <= window[1]]
    all_itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    return {"running": running, "prompt_tokens": len(long_prompt),
            "long_ttft_s": long["times"][0] - long["sent"] if long["times"] else float("nan"),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99), "itl_max_ms": 1e3 * max(itl),
            "itl_run_p50_ms": 1e3 * pct(all_itl, 50), "itl_run_p99_ms": 1e3 * pct(all_itl, 99),
            "errors": sum(r["error"] is not None for r in [*results, long])}


async def lone_ttft(server, seed: int, tokens: int = 1000) -> float:
    """Seconds to the first streamed token of a lone prompt of random ids (new ones each time, so
    that no prefix cache helps)."""
    rng = np.random.default_rng(seed)
    async with httpx.AsyncClient(timeout=600) as client:
        r = await stream_one(client, server, [int(i) for i in rng.integers(0, 50000, tokens)], 1)
    return r["times"][0] - r["sent"]


def beside_vllm(servers: dict[str, Server], model, clients: list[int], requests: int, max_tokens: int,
                rounds: int = 3) -> dict:
    """The same streaming loads on each server (gpt-serve on its default matmul backend, gpt-serve
    on NumPy's, vLLM), alternating server by server and round by round (medians of `rounds`), then
    a lone 1000-token prompt's first token on each (medians of 2·rounds − 1, alternating which goes
    first; and the in-process `logits` time for such a prompt), and each server's resident memory after."""
    runs: dict[str, dict[int, list[float]]] = {name: {c: [] for c in clients} for name in servers}
    ttft: dict[str, list[float]] = {name: [] for name in servers}
    for r in range(rounds):
        for c in clients:
            for name, s in servers.items():
                runs[name][c].append(asyncio.run(load(s, c, requests, max_tokens))["tokens_per_s"])
                print(f"  round {r}, {c} clients, {name}: {runs[name][c][-1]:.1f} tokens/s", file=sys.stderr)
    # The lone prompts after the loads, each server's turn first in every other round, with a
    # pause before each: a server's threads may still be busy (or spinning) after a load.
    for r in range(2 * rounds - 1):
        for name, s in list(servers.items())[::1 if r % 2 == 0 else -1]:
            time.sleep(1)
            ttft[name].append(asyncio.run(lone_ttft(s, seed=100 + r)))
    ids = np.random.default_rng(7).integers(0, 50000, 1000)
    logits_s = min(_timed(lambda: model.logits(ids)) for _ in range(3))
    cfg = model.config  # the work of a first token: one pass, the LM head at the last position only
    first_s = min(_timed(lambda: M.forward(model.params, cfg, ids, kv.KVCache(cfg, len(ids)))) for _ in range(3))
    # The floor: a step's bare weight products at as many rows as clients (LM head included).
    products_ms = {c: best(matmul_stack(model.params, c), 7) * 1000 for c in clients}
    return {"rounds": rounds, "products_ms": products_ms,
            "tokens_per_s": {name: {c: statistics.median(v) for c, v in per.items()} for name, per in runs.items()},
            "rounds_tokens_per_s": runs,
            "lone_ttft_s": {name: statistics.median(v) for name, v in ttft.items()}, "rounds_lone_ttft_s": ttft,
            "in_process_logits_s": logits_s, "in_process_forward_s": first_s,
            "rss_mb": {name: tree_rss_mb(s.proc.pid) for name, s in servers.items()}}


def _timed(f) -> float:
    start = time.perf_counter()
    f()
    return time.perf_counter() - start


def in_process(model, max_tokens: int, reps: int = 3) -> float:
    """Tokens/s of `GPT2.complete` in this process, same prompt and length: the best of reps."""
    best = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        g = model.complete(PROMPT, max_tokens, stop_at_eos=False)
        best = max(best, len(g.ids) / (time.perf_counter() - start))
    return best


def report(res: dict) -> str:
    base = res["in_process_tokens_per_s"]
    rows = {r["clients"]: r for r in res["load"]}
    one = rows[1]["tokens_per_s"]
    lines = [
        "# gpt-serve under load (124M, random weights)", "",
        f"{res['machine']}. Server: `gpt-serve {res['server_args']}`; "
        f"clients stream greedy requests of {res['max_tokens']} tokens ({res['requests']} per client, one after "
        "another) over loopback. Ratios in one run are what to compare.", "",
        "| concurrent clients | aggregate tokens/s | vs 1 client | time to first token p50 / p99 | "
        "inter-token latency p50 / p99 | errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c, r in rows.items():
        lines.append(f"| {c} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / one:.2f}x | "
                     f"{r['ttft_p50_ms']:.0f} / {r['ttft_p99_ms']:.0f} ms | {r['itl_p50_ms']:.1f} / "
                     f"{r['itl_p99_ms']:.1f} ms | {r['errors']} |")
    j = res["long_prompt"]
    lines += ["",
              f"- One client over HTTP: {rows[1]['request_tokens_per_s']:.1f} tokens/s per request, "
              f"{rows[1]['request_tokens_per_s'] / base:.0%} of in-process `complete` "
              f"({base:.1f} tokens/s, same prompt and length; target >= 90%).",
              f"- 8 clients: {rows[8]['tokens_per_s'] / one:.2f}x the aggregate tokens/s of one (target >= 2.5x).",
              f"- A {j['prompt_tokens']}-token prompt joining {j['running']} running streams: their inter-token "
              f"latency while it was read, p50 {j['itl_p50_ms']:.1f} ms, p99 {j['itl_p99_ms']:.1f} ms "
              f"({j['itl_p99_ms'] / j['itl_p50_ms']:.2f}x the median; target <= 3x), max {j['itl_max_ms']:.1f} ms; "
              f"over their whole run p50 {j['itl_run_p50_ms']:.1f} ms, p99 {j['itl_run_p99_ms']:.1f} ms "
              f"({j['itl_run_p99_ms'] / j['itl_run_p50_ms']:.2f}x). The long prompt's first token came after "
              f"{j['long_ttft_s']:.2f} s. Errors: {j['errors']}."]
    v = res.get("vllm")
    if v is None:
        lines += ["", "vLLM's CPU build was not installed: no comparison in this run."]
        return "\n".join(lines) + "\n"
    tps = v["tokens_per_s"]
    ours, numpy_, theirs = tps["gpt-serve"], tps.get("gpt-serve, NumPy"), tps["vllm"]
    goals = {1: 1.15, 4: 1.0, 8: 1.0, 16: 1.0}  # issue 30's targets, gpt-serve on its default backend
    lines += ["", "## Beside vLLM's CPU build (0.32.0, 2 OpenMP threads), the same loads", "",
              f"All servers up at once, the loads alternating server by server in {v['rounds']} rounds; medians. "
              f"gpt-serve runs its default backend ({v.get('backend', 'matmul: ?')}) and, as a second server, "
              "`GPT2NP_MATMUL=numpy`.", "",
              "The floor: the bare weight products of one step at as many rows as clients (LM head included, "
              "default backend, in process, best of 7), as tokens/s if a step took that and nothing else.", "",
              "| concurrent clients | gpt-serve tokens/s | on NumPy | vLLM tokens/s | gpt-serve / vLLM | goal "
              "| on NumPy / vLLM | products alone, tokens/s | products alone / vLLM |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in ours:
        goal = goals.get(int(c))
        floor = int(c) * 1000 / v["products_ms"][c] if c in v.get("products_ms", {}) else None
        lines.append(f"| {c} | {ours[c]:.1f} | {numpy_[c]:.1f} | {theirs[c]:.1f} | {ours[c] / theirs[c]:.2f}x | "
                     f"{f'>= {goal}x' if goal else ''} | {numpy_[c] / theirs[c]:.2f}x | "
                     + (f"{floor:.1f} | {floor / theirs[c]:.2f}x |" if floor else " | |"))
    t, rss = v["lone_ttft_s"], v["rss_mb"]
    lines += ["", f"- A lone 1000-token prompt's first token: gpt-serve {t['gpt-serve']:.2f} s (on NumPy "
              f"{t['gpt-serve, NumPy']:.2f} s), vLLM {t['vllm']:.2f} s ({t['gpt-serve'] / t['vllm']:.2f}x vLLM's; "
              f"goal <= 1.0x); in-process `logits` for such a prompt "
              f"{v['in_process_logits_s']:.2f} s (gpt-serve's first token is {t['gpt-serve'] / v['in_process_logits_s']:.2f}x "
              f"it; goal <= 1.05x). That `logits` computes the LM head at every position; the pass a first token needs "
              f"(the head at the last position only) took {v['in_process_forward_s']:.2f} s in process "
              f"(the first token over HTTP {t['gpt-serve'] / v['in_process_forward_s']:.2f}x it). Each run, s: "
              + "; ".join(f"{name} " + ", ".join(f"{x:.2f}" for x in runs) for name, runs in v["rounds_lone_ttft_s"].items())
              + ".",
              f"- Resident memory after the loads: gpt-serve {rss['gpt-serve']:.0f} MB (on NumPy "
              f"{rss['gpt-serve, NumPy']:.0f} MB), vLLM {rss['vllm']:.0f} MB "
              f"({rss['gpt-serve'] / rss['vllm']:.2f} of vLLM's; goal <= 1/4)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--server-args", default="", help="more gpt-serve flags, e.g. '--prefill-chunk 32'")
    ap.add_argument("--vllm-python", type=Path, default=Path("/tmp/venv-vllm/bin/python"),
                    help="vLLM's venv python: the same loads beside vLLM's CPU build (skipped when absent)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds beside vLLM (medians)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--model-cache", type=Path, default=ROOT / "bench" / ".models")
    a = ap.parse_args()
    server_args = ["--max-batch", str(a.max_batch), *a.server_args.split()]
    folder = make_model(a.model_cache / "124M", "124M")
    model = gpt2np.load(folder)
    blas = blas_info()
    res = {"machine": f"{cpu_name()}, {blas['library']} ({blas['kernel']}), {blas['threads']} BLAS threads",
           "max_tokens": a.tokens, "requests": a.requests, "max_batch": a.max_batch,
           "server_args": " ".join(server_args)}
    before = in_process(model, a.tokens)
    server = Server(folder, *server_args, "--max-queue", "256")
    try:
        asyncio.run(load(server, 1, 1, 8))  # warm-up: the first pass touches every page of the weights
        res["load"] = []
        for c in map(int, a.clients.split(",")):
            r = asyncio.run(load(server, c, a.requests, a.tokens))
            print(f"{c:3d} clients: {r['tokens_per_s']:.1f} tokens/s, ttft p50 {r['ttft_p50_ms']:.0f} ms, "
                  f"itl p50/p99 {r['itl_p50_ms']:.1f}/{r['itl_p99_ms']:.1f} ms, errors {r['errors']}", file=sys.stderr)
            res["load"].append(r)
        res["long_prompt"] = asyncio.run(long_prompt_joins(server, model, 4, 200))
        print(f"long prompt joins: {res['long_prompt']}", file=sys.stderr)
        if a.vllm_python.exists():
            on_numpy = Server(folder, *server_args, "--max-queue", "256", env={"GPT2NP_MATMUL": "numpy"})
            vllm = None
            try:
                vllm = VLLM(a.vllm_python, folder)
                for s in (on_numpy, vllm):
                    asyncio.run(load(s, 1, 1, 8))
                servers = {"gpt-serve": server, "gpt-serve, NumPy": on_numpy, "vllm": vllm}
                res["vllm"] = beside_vllm(servers, model, list(map(int, a.clients.split(","))), a.requests,
                                          a.tokens, a.rounds)
                res["vllm"]["backend"] = model.matmul.describe()
            finally:
                on_numpy.stop()
                if vllm is not None:
                    vllm.stop()
    finally:
        server.stop()
    after = in_process(model, a.tokens)
    res["in_process_tokens_per_s"] = (before + after) / 2
    res["in_process_before_after"] = [before, after]
    save_results(a.out, "serve", res, report(res))


if __name__ == "__main__":
    main()
