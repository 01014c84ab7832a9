"""`make bench-serve`, the prefix cache: gpt-serve with its cache against the same server without it,
in one run (random-weight 124M), and vLLM's CPU build beside them when it is installed.

- time to first token for a 900-token shared prefix plus a 32-token suffix of its own, warm
  against cold (a new `cache_salt` makes a request cold);
- an lm-evaluation-harness-shaped loglikelihood workload: items x 4 choices, 200-400-token
  contexts, 1-8-token continuations, sent as lm-eval 0.4 sends them (token ids, `echo: true`,
  `logprobs: 1`, `max_tokens: 1`, temperature 0), 4 concurrent (3 alternating rounds of new items,
  medians);
- a few-shot generation workload: an 800-token prefix shared by every request, a 24-token
  question of its own, 8 greedy tokens, 4 concurrent;
- random prompts that share nothing (200 tokens, 16 greedy tokens, 4 concurrent): what the cache
  costs when it never hits (5 alternating rounds, medians);
- memory: the server's RSS after 10,000 distinct cacheable requests (17 tokens: one block each), against
  its budget.

    python bench/prefix_bench.py [--items 50] [--memory-requests 10000] [--vllm-python PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import sys
import time
from pathlib import Path

import gpt2np  # noqa: F401 -- before NumPy loads OpenBLAS: it sets its thread timeout (gpt2np.parallel)
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench import blas_info, cpu_name, make_model, save_results  # noqa: E402
from serve_bench import VLLM, Server  # noqa: E402


class _Skip(Exception):
    pass


async def requests_at(server, bodies: list[dict], concurrency: int) -> tuple[float, list[dict]]:
    """Send every body to /v1/completions, `concurrency` at a time; (seconds, responses)."""
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency + 2)) as client:
        async def one(body):
            async with sem:
                r = await client.post(server.url + "/v1/completions", json={"model": server.name, **body})
                r.raise_for_status()
                return r.json()

        start = time.perf_counter()
        out = await asyncio.gather(*(one(b) for b in bodies))
        return time.perf_counter() - start, out


def rand_ids(rng, n: int) -> list[int]:
    return [int(i) for i in rng.integers(0, 50000, n)]


def loglikelihood_bodies(items: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    bodies = []
    for _ in range(items):
        context = rand_ids(rng, int(rng.integers(200, 401)))
        for _ in range(4):
            bodies.append({"prompt": context + rand_ids(rng, int(rng.integers(1, 9))), "max_tokens": 1, "echo": True,
                           "logprobs": 1, "temperature": 0})
    return bodies


def few_shot_bodies(n: int, seed: int = 1) -> list[dict]:
    rng = np.random.default_rng(seed)
    shots = rand_ids(rng, 800)
    return [{"prompt": shots + rand_ids(rng, 24), "max_tokens": 8, "temperature": 0, "ignore_eos": True}
            for _ in range(n)]


def random_bodies(n: int, seed: int = 2) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": rand_ids(rng, 200), "max_tokens": 16, "temperature": 0, "ignore_eos": True} for _ in range(n)]


def ttft(client: httpx.Client, server, salt_cold: bool, prefix: list[int], suffix: list[int]) -> float:
    """Seconds to the first (and only) token of prefix + suffix, on a client's open connection
    (a new httpx client costs more than a warm answer: it builds an SSL context)."""
    body = {"model": server.name, "prompt": prefix + suffix, "max_tokens": 1, "temperature": 0}
    if salt_cold:
        body["cache_salt"] = f"cold-{time.monotonic_ns()}"
    start = time.perf_counter()
    client.post(server.url + "/v1/completions", json=body, timeout=600).raise_for_status()
    return time.perf_counter() - start


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def workloads(on, off, items: int, rounds: int = 3, random_rounds: int = 5) -> tuple[dict, dict]:
    """Each workload on both servers, one after the other. The loglikelihood and random workloads,
    whose ratios are the targets' margins, run in alternating rounds (new items each round, so no
    round reads what an earlier one cached; the server that goes first alternates too; medians):
    these machines drift by more than those margins within a run."""
    res = {"on": {}, "off": {}}
    plan = [*((f"loglikelihood{r}", loglikelihood_bodies(items, seed=r)) for r in range(rounds)),
            ("few_shot", few_shot_bodies(24)),
            *((f"random{r}", random_bodies(24, seed=2 + r)) for r in range(random_rounds))]
    for i, (name, bodies) in enumerate(plan):
        for label, server in (("on", on), ("off", off))[::1 if i % 2 == 0 else -1]:
            seconds, _ = asyncio.run(requests_at(server, bodies, 4))
            res[label][name] = {"requests": len(bodies), "seconds": seconds, "requests_per_s": len(bodies) / seconds}
            print(f"  cache {label}: {name}: {len(bodies)} requests in {seconds:.1f} s", file=sys.stderr)
    for side in res.values():
        for workload, n in (("loglikelihood", rounds), ("random", random_rounds)):
            runs = [side.pop(f"{workload}{r}") for r in range(n)]
            side[workload] = {"requests": runs[0]["requests"], "seconds": statistics.median(r["seconds"] for r in runs),
                              "rounds": [r["seconds"] for r in runs]}
    return res["on"], res["off"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=50, help="multiple-choice items (4 requests each)")
    ap.add_argument("--memory-requests", type=int, default=10_000)
    ap.add_argument("--memory-budget-mb", type=float, default=64)
    ap.add_argument("--vllm-python", type=Path, default=Path("/tmp/venv-vllm/bin/python"),
                    help="vLLM's venv python (skipped when absent)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--model-cache", type=Path, default=ROOT / "bench" / ".models")
    a = ap.parse_args()
    folder = make_model(a.model_cache / "124M", "124M")
    blas = blas_info()
    res = {"machine": f"{cpu_name()}, {blas['library']} ({blas['kernel']}), {blas['threads']} BLAS threads"}
    rng = np.random.default_rng(3)
    prefix = rand_ids(rng, 900)

    on = Server(folder, "--max-batch", "16")
    off = Server(folder, "--max-batch", "16", "--prefix-cache-mb", "0")
    try:
        for server in (on, off):  # warm-up: every page of the weights
            asyncio.run(requests_at(server, random_bodies(2, seed=9), 2))
        with httpx.Client() as client:
            ttft(client, on, False, prefix, rand_ids(rng, 32))  # the prefix is now cached (under no salt)
            cold, warm = [], []
            for _ in range(5):
                cold.append(ttft(client, on, True, prefix, rand_ids(rng, 32)))
                warm.append(ttft(client, on, False, prefix, rand_ids(rng, 32)))
        res["ttft"] = {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm)}
        print(f"ttft: {res['ttft']}", file=sys.stderr)
        res["on"], res["off"] = workloads(on, off, a.items)
    finally:
        on.stop()
        off.stop()

    mem = Server(folder, "--max-batch", "16", "--prefix-cache-mb", str(a.memory_budget_mb)) if a.memory_requests else None
    try:
        if mem is None:
            raise _Skip
        asyncio.run(requests_at(mem, random_bodies(2, seed=9), 2))
        before = rss_mb(mem.proc.pid)
        rng = np.random.default_rng(4)
        done = 0
        while done < a.memory_requests:
            n = min(500, a.memory_requests - done)
            asyncio.run(requests_at(mem, [{"prompt": rand_ids(rng, 17), "max_tokens": 1} for _ in range(n)], 8))
            done += n
        metrics = httpx.get(mem.url + "/metrics").text
        held = float(re.search(r"^gpt2np_prefix_cache_bytes (\S+)$", metrics, re.M).group(1))
        res["memory"] = {"requests": done, "budget_mb": a.memory_budget_mb, "rss_before_mb": before,
                         "rss_after_mb": rss_mb(mem.proc.pid), "cache_held_mb": held / 2**20}
        print(f"memory: {res['memory']}", file=sys.stderr)
    except _Skip:
        pass
    finally:
        if mem is not None:
            mem.stop()

    if a.vllm_python.exists():
        try:
            v = VLLM(a.vllm_python, folder)
        except RuntimeError as e:
            print(f"vLLM: {e}", file=sys.stderr)
        else:
            try:
                asyncio.run(requests_at(v, random_bodies(2, seed=9), 2))
                seconds, _ = asyncio.run(requests_at(v, loglikelihood_bodies(a.items), 4))
                res["vllm"] = {"loglikelihood": {"requests": 4 * a.items, "seconds": seconds,
                                                 "requests_per_s": 4 * a.items / seconds}}
                print(f"vLLM loglikelihood: {seconds:.1f} s", file=sys.stderr)
            finally:
                v.stop()
    save_results(a.out, "prefix", res, report(res))


def report(res: dict) -> str:
    on, off, t = res["on"], res["off"], res["ttft"]
    lines = ["# The prefix cache (124M, random weights)", "",
             f"{res['machine']}. gpt-serve with its prefix cache (the default, 4096 positions) against the same "
             "server with `--prefix-cache-mb 0`, in one run.", "",
             f"- Time to first token, a 900-token shared prefix + 32 tokens of its own: warm {1e3 * t['warm_s']:.0f} ms, "
             f"cold {1e3 * t['cold_s']:.0f} ms: **{t['warm_s'] / t['cold_s']:.1%}** of cold (target <= 10%).", "",
             "| workload | requests | cache on (s) | cache off (s) | on / off speed |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, label in (("loglikelihood", "lm-eval loglikelihood (4 choices an item, echo + logprobs)"),
                        ("few_shot", "few-shot generation (800 shared + 24 own, 8 tokens)"),
                        ("random", "random prompts, nothing shared (200 + 16 tokens)")):
        lines.append(f"| {label} | {on[name]['requests']} | {on[name]['seconds']:.1f} | {off[name]['seconds']:.1f} | "
                     f"{off[name]['seconds'] / on[name]['seconds']:.2f}x |")
    lines += [""] + [f"The {label} ran in {len(on[w]['rounds'])} alternating rounds (on, off; off, on; ...): on "
                     f"{', '.join(f'{x:.1f}' for x in on[w]['rounds'])} s, off "
                     f"{', '.join(f'{x:.1f}' for x in off[w]['rounds'])} s (medians above)."
                     for w, label in (("loglikelihood", "loglikelihood items (new items each round)"),
                                      ("random", "random prompts"))]
    lines += ["Time to first token: medians of 5, cold and warm alternating, on one open connection."]
    m = res.get("memory")
    lines += [""] if m is None else ["", f"- Memory: after {m['requests']:,} distinct cacheable requests with a {m['budget_mb']:.0f} MB "
                  f"budget, the cache held {m['cache_held_mb']:.1f} MB and the server's RSS went from "
                  f"{m['rss_before_mb']:.0f} to {m['rss_after_mb']:.0f} MB "
                  f"(+{m['rss_after_mb'] - m['rss_before_mb']:.0f} MB)."]
    if m is None:
        lines.append("- Memory: not measured in this run (--memory-requests 0).")
    if "vllm" in res:
        v = res["vllm"]["loglikelihood"]
        lines.append(f"- vLLM's CPU build, the same loglikelihood workload: {v['seconds']:.1f} s; gpt-serve with its "
                     f"cache is **{v['seconds'] / on['loglikelihood']['seconds']:.2f}x** its throughput (goal >= 1.5x).")
    else:
        lines.append("- vLLM's CPU build was not installed: not measured.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
