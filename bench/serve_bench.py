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
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpt2np  # noqa: E402

from bench import blas_info, cpu_name, make_model, save_results  # noqa: E402

BIN = Path(sys.executable).parent
PROMPT = "The history of the city begins with"


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


class Server:
    def __init__(self, model_dir: Path, *args: str):
        self.proc = subprocess.Popen([str(BIN / "gpt-serve"), str(model_dir), "--port", "0", "--log-level", "warning",
                                      *args], stderr=subprocess.PIPE, text=True)
        for line in self.proc.stderr:
            found = re.search(r"serving (\S+) on (http://\S+)", line)
            if found:
                self.name, self.url = found.groups()
                return
        raise RuntimeError("gpt-serve did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


async def stream_one(client: httpx.AsyncClient, server: Server, prompt, max_tokens: int) -> dict:
    """One streamed request: its send time, chunk arrival times, token count, error."""
    body = {"model": server.name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    sent, times, tokens = time.perf_counter(), [], 0
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
                elif chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"sent": sent, "times": times, "tokens": tokens, "error": type(e).__name__}
    return {"sent": sent, "times": times, "tokens": tokens, "error": None}


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
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--server-args", default="", help="more gpt-serve flags, e.g. '--prefill-chunk 32'")
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
    finally:
        server.stop()
    after = in_process(model, a.tokens)
    res["in_process_tokens_per_s"] = (before + after) / 2
    res["in_process_before_after"] = [before, after]
    save_results(a.out, "serve", res, report(res))


if __name__ == "__main__":
    main()
