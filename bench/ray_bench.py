"""`make bench-ray`: the Ray Data stage against one process doing the same work, in one run.

On a random-weight 124M model, generates for the same rows in batches of the same size:

- one process, 1 BLAS thread, `GPT2.generate_batch` batch after batch: the baseline for 1 worker;
- Ray Data with `Generate` on 1 actor (1 BLAS thread);
- one process with 2 BLAS threads: the baseline for 2 workers;
- Ray Data with 2 actors, 1 BLAS thread each.

Ray's times include its scheduling, the actors' start (loading the model) and moving the rows, not
the start of Ray itself (a cluster is up before a job). Ratios in one run are what to compare.

    python bench/ray_bench.py [--rows 64] [--tokens 32] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench import blas_info, cpu_name, make_model, save_results  # noqa: E402


def in_process(folder: Path, prompts: list[str], tokens: int, batch_size: int, threads: int) -> dict:
    from threadpoolctl import threadpool_limits

    import gpt2np

    model = gpt2np.load(folder)
    with threadpool_limits(threads, user_api="blas"):
        model.complete(prompts[0], 2, stop_at_eos=False)  # touch the weights once, as an actor's first batch does
        start, generated = time.perf_counter(), 0
        for i in range(0, len(prompts), batch_size):
            generated += sum(len(g.ids) for g in model.generate_batch(prompts[i:i + batch_size], tokens,
                                                                      stop_at_eos=False))
        wall = time.perf_counter() - start
    return {"wall_s": wall, "rows_per_s": len(prompts) / wall, "tokens_per_s": generated / wall}


def on_ray(folder: Path, prompts: list[str], tokens: int, batch_size: int, workers: int) -> dict:
    import ray
    from ray.data import ActorPoolStrategy

    from gpt2np.ray import Generate

    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(prompts)], override_num_blocks=len(prompts) // batch_size)
    ds = ds.map_batches(Generate, fn_constructor_kwargs={"model_dir": str(folder), "n_tokens": tokens,
                                                         "stop_at_eos": False},
                        compute=ActorPoolStrategy(size=workers), batch_size=batch_size, num_cpus=1)
    start = time.perf_counter()
    rows = ds.take_all()
    wall = time.perf_counter() - start
    assert len(rows) == len(prompts) and not any(r["error"] for r in rows)
    generated = sum(len(r["ids"]) for r in rows)
    return {"wall_s": wall, "rows_per_s": len(prompts) / wall, "tokens_per_s": generated / wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--model-cache", type=Path, default=ROOT / "bench" / ".models")
    a = ap.parse_args()
    import ray
    from ray.data import DataContext

    folder = make_model(a.model_cache / "124M", "124M")
    prompts = [f"Document {i}: the history of the city begins with" for i in range(a.rows)]
    blas = blas_info()
    res = {"machine": f"{cpu_name()}, {blas['library']} ({blas['kernel']})", "rows": a.rows, "tokens": a.tokens,
           "batch_size": a.batch_size}
    ray.init(num_cpus=3, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False,
             runtime_env={"env_vars": {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}})
    DataContext.get_current().enable_progress_bars = False
    try:
        on_ray(folder, prompts[:a.batch_size], 2, a.batch_size, 1)  # warm-up: Ray's workers and imports
        res["process_1_thread"] = in_process(folder, prompts, a.tokens, a.batch_size, 1)
        res["ray_1_worker"] = on_ray(folder, prompts, a.tokens, a.batch_size, 1)
        res["process_2_threads"] = in_process(folder, prompts, a.tokens, a.batch_size, 2)
        res["ray_2_workers"] = on_ray(folder, prompts, a.tokens, a.batch_size, 2)
    finally:
        ray.shutdown()
    save_results(a.out, "ray", res, report(res))


def report(res: dict) -> str:
    p1, r1, p2, r2 = (res[k] for k in ("process_1_thread", "ray_1_worker", "process_2_threads", "ray_2_workers"))
    lines = [
        "# gpt2np on Ray Data against one process (124M, random weights)", "",
        f"{res['machine']}, 2 cores. {res['rows']} rows, {res['tokens']} greedy tokens each, batches of "
        f"{res['batch_size']}. Ray's times include its scheduling and the actors' start, not Ray's own.", "",
        "| | rows/s | tokens/s | Ray against the process |", "| --- | ---: | ---: | ---: |",
        f"| one process, 1 BLAS thread | {p1['rows_per_s']:.2f} | {p1['tokens_per_s']:.1f} | |",
        f"| Ray, 1 worker x 1 thread | {r1['rows_per_s']:.2f} | {r1['tokens_per_s']:.1f} | "
        f"{r1['tokens_per_s'] / p1['tokens_per_s']:.0%} |",
        f"| one process, 2 BLAS threads | {p2['rows_per_s']:.2f} | {p2['tokens_per_s']:.1f} | |",
        f"| Ray, 2 workers x 1 thread | {r2['rows_per_s']:.2f} | {r2['tokens_per_s']:.1f} | "
        f"{r2['tokens_per_s'] / p2['tokens_per_s']:.0%} |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    main()
