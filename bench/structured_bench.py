"""`make bench`, structured outputs: what a constraint costs a decode step, and what fast-forward saves.

On a random-weight 124M model (weights do not change the speed), in one process, alternating runs:

- decode ms/token with a JSON-Schema constraint against the same number of tokens without one, at
  1 stream and at 16 (fast-forward off, so that every token is a step with a mask): the overhead;
- each token mask's time (llguidance's fill and our unpacking, per sequence), median and p99;
- a schema with long constant parts: its output with fast-forward, against decoding as many
  tokens one by one (and against the same constraint without fast-forward), with the steps taken;
- compiling: a new schema, and the same schema again (the cache).

    python bench/structured_bench.py [--quick] [--out bench/results]

Writes bench/results/STRUCTURED.md and structured.json.
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

import bench  # noqa: E402 -- the model maker and the machine's description
from gpt2np import engine as engine_module  # noqa: E402
from gpt2np.structured import compiler  # noqa: E402

# An order's items: an array that cannot end within the tokens measured (at least 40 items).
ITEMS = {"type": "object", "properties": {"items": {
    "type": "array", "minItems": 40, "items": {
        "type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 999},
                                         "gift": {"type": "boolean"}},
        "required": ["name", "qty", "gift"], "additionalProperties": False}}},
    "required": ["items"], "additionalProperties": False}
LONG_CONST = {"type": "object", "properties": {
    "notice": {"const": "This record was produced by an automated extraction system and follows the "
                        "company's published schema for customer orders, version two point one."},
    "id": {"type": "integer", "minimum": 0, "maximum": 9999},
    "terms": {"const": "All prices include value added tax where applicable; delivery times are estimates "
                       "and are not guaranteed by the seller under any circumstances."},
    "status": {"enum": ["open", "shipped", "delivered"]}},
    "required": ["notice", "id", "terms", "status"], "additionalProperties": False}
PROMPT = "Order record:"


class MaskTimer:
    """Wraps the engine's `fill_masks` to time every call, per sequence."""

    def __init__(self):
        self.per_sequence: list[float] = []
        self.inner = engine_module.fill_masks

    def __call__(self, guides):
        started = time.perf_counter()
        self.inner(guides)
        self.per_sequence += [(time.perf_counter() - started) / len(guides)] * len(guides)

    def __enter__(self):
        engine_module.fill_masks = self
        return self

    def __exit__(self, *exc):
        engine_module.fill_masks = self.inner


def decode_rate(model, streams: int, n: int, constraint) -> tuple[float, int]:
    """(seconds per decode step of the batch, tokens per stream): `streams` sequences decoded
    together, timed from the step after the prompts' to the last."""
    eng = model.engine()
    opts = dict(constraint=constraint, fast_forward=False) if constraint else dict(stop_at_eos=False)
    seqs = [eng.add(model.encode(f"{PROMPT} {i}"), model.options(n, temperature=1.0, seed=i, **opts))
            for i in range(streams)]
    eng.step()  # the prompts, and the first tokens
    started, steps = time.perf_counter(), 0
    while not eng.idle:
        eng.step()
        steps += 1
    elapsed = time.perf_counter() - started
    assert all(len(s.result.ids) == n for s in seqs), [s.result.stop_reason for s in seqs]
    return elapsed / steps, n


def overhead(model, streams: int, n: int, rounds: int) -> dict:
    free, constrained = [], []
    for _ in range(rounds):  # alternating: drift falls on both alike
        constrained.append(decode_rate(model, streams, n, {"json": ITEMS})[0])
        free.append(decode_rate(model, streams, n, None)[0])
    f, c = statistics.median(free), statistics.median(constrained)
    return {"streams": streams, "tokens": n, "free_ms_per_step": 1e3 * f, "constrained_ms_per_step": 1e3 * c,
            "overhead": c / f - 1}


def fast_forward(model, rounds: int) -> dict:
    on, off, plain = [], [], []
    for _ in range(rounds):
        t = time.perf_counter()
        g = model.complete(PROMPT, 200, constraint={"json": LONG_CONST})
        on.append(time.perf_counter() - t)
        t = time.perf_counter()
        g_off = model.complete(PROMPT, 200, constraint={"json": LONG_CONST}, fast_forward=False)
        off.append(time.perf_counter() - t)
        t = time.perf_counter()
        model.complete(PROMPT, len(g.ids), stop_at_eos=False)
        plain.append(time.perf_counter() - t)
    assert g.text == g_off.text and g.stop_reason == "stop"
    eng, _ = model.queue([PROMPT], 200, constraint={"json": LONG_CONST})
    steps = 0
    while not eng.idle:
        eng.step()
        steps += 1
    return {"tokens": len(g.ids), "forced": g.forced, "steps": steps, "steps_without": len(g_off.ids),
            "ff_s": statistics.median(on), "no_ff_s": statistics.median(off), "one_by_one_s": statistics.median(plain),
            "ratio_to_one_by_one": statistics.median(on) / statistics.median(plain),
            "ratio_to_no_ff": statistics.median(on) / statistics.median(off)}


def compile_times(model) -> dict:
    from gpt2np import Constraint

    compiler.clear_cache()
    c = Constraint.json_schema(ITEMS)
    t = time.perf_counter()
    compiler.compile_constraint(c, model.tokenizer)
    first = time.perf_counter() - t
    t = time.perf_counter()
    compiler.compile_constraint(c, model.tokenizer)
    again = time.perf_counter() - t
    return {"first_ms": 1e3 * first, "cached_ms": 1e3 * again}


def markdown(env: dict, res: dict) -> str:
    rows = "\n".join(f"| {o['streams']} | {o['tokens']} | {o['free_ms_per_step']:.2f} | "
                     f"{o['constrained_ms_per_step']:.2f} | {100 * o['overhead']:+.1f}% |" for o in res["overhead"])
    m, ff, c = res["masks"], res["fast_forward"], res["compile"]
    return f"""# Structured outputs: cost and fast-forward

Written by `bench/structured_bench.py` (`make bench`) on {env['date']}: {env['cpu']}, {env['cores']} cores,
NumPy {env['numpy']} with {env['blas']['library']} ({env['blas']['kernel']} kernel, {env['blas']['threads']} threads),
llguidance {env['llguidance']}. A random-weight 124M model; medians of {env['rounds']} alternating rounds.

## What a JSON-Schema constraint adds to a decode step

An order's items (an array of objects with a bounded string, an integer and a boolean), fast-forward
off so that every token is a step with a mask, against as many steps without a constraint:

| streams | tokens each | ms/step, free | ms/step, constrained | overhead |
| ---: | ---: | ---: | ---: | ---: |
{rows}

One token mask (llguidance's fill and the unpacking, per sequence, over {m['count']} masks): median
{1e6 * m['median_s']:.0f} µs, p99 {1e6 * m['p99_s']:.0f} µs.

## Fast-forward

A schema whose output is mostly constant text ({ff['tokens']} tokens, {ff['forced']} of them forced):

| | time | steps |
| --- | ---: | ---: |
| with fast-forward | {1e3 * ff['ff_s']:.0f} ms | {ff['steps']} |
| the same constraint without it | {1e3 * ff['no_ff_s']:.0f} ms | {ff['steps_without']} |
| {ff['tokens']} tokens one by one, no constraint | {1e3 * ff['one_by_one_s']:.0f} ms | {ff['tokens']} |

With fast-forward: {ff['ratio_to_one_by_one']:.2f} of the time of decoding as many tokens one by one,
{ff['ratio_to_no_ff']:.2f} of the time without it.

## Compiling

The order schema: {c['first_ms']:.1f} ms the first time, {c['cached_ms']:.3f} ms from the cache
(the tokenizer's llguidance view, built once per process, not counted).
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--model-cache", type=Path, default=ROOT / "bench" / ".models")
    args = ap.parse_args()
    folder = bench.make_model(args.model_cache / "124M", "124M")
    model = gpt2np.load(folder)
    rounds = 3 if args.quick else 5
    n = 48 if args.quick else 96
    import llguidance
    env = {"date": time.strftime("%Y-%m-%d"), "cpu": bench.cpu_name(), "cores": __import__("os").cpu_count(),
           "numpy": np.__version__, "blas": bench.blas_info(), "llguidance": llguidance.__version__,
           "rounds": rounds}
    model.complete(PROMPT, 4, constraint={"json": ITEMS})  # warm: the tokenizer's llguidance view, the pages
    with MaskTimer() as timer:
        res = {"overhead": [overhead(model, s, n, rounds) for s in (1, 16)]}
    masks = np.array(timer.per_sequence)
    res["masks"] = {"count": len(masks), "median_s": float(np.median(masks)), "p99_s": float(np.percentile(masks, 99))}
    res["fast_forward"] = fast_forward(model, rounds)
    res["compile"] = compile_times(model)
    res["env"] = env
    bench.save_results(args.out, "structured", res, markdown(env, res))


if __name__ == "__main__":
    main()
