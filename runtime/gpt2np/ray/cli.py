"""`gpt-batch`: generate or score a JSON-lines corpus on a Ray cluster (or this machine)."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

import click

from ..cli.common import generation_options, prefix_cache_option, progress, run_command, stride_option, weights_option
from ..errors import GPT2Error, missing_extra
from ..outdir import atomic_output_dir
from . import job


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("input_path", metavar="INPUT", type=click.Path(path_type=str))
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=str))
@click.option("--task", type=click.Choice(["generate", "score"]), default="generate", show_default=True,
              help='generate: continue each row\'s "prompt"; score: NLL and perplexity of each row\'s "text".')
@click.option("--address", envvar="RAY_ADDRESS", default=None,
              help="Join this running Ray cluster [env: RAY_ADDRESS]; by default a local Ray starts here.")
@click.option("--workers", default=None, type=click.IntRange(min=1),
              help="Actors, each with its own engine [default: the cluster's CPUs / threads, one CPU kept "
                   "for reading; on this machine, its cores / threads].")
@click.option("--threads-per-worker", default=1, show_default=True, type=click.IntRange(min=1),
              help="BLAS threads (and Ray CPUs) per actor.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1),
              help="Rows per batch: decoded together in one forward pass per step.")
@stride_option("With --task score: the sliding window's step for texts longer than the context.")
@prefix_cache_option("Memory per worker for a prefix cache: rows whose prompts (or texts) begin alike reuse the "
                     "computed part.")
@click.option("--force", is_flag=True, help="Replace a non-empty OUTPUT_DIR.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@weights_option
@generation_options
def batch(model_dir, input_path, output_dir, task, address, workers, threads_per_worker, batch_size, stride,
          prefix_cache_mb, force, quiet, weights, options):
    """Generate (or score) every row of INPUT with the GPT-2 model in MODEL_DIR, on Ray.

    \b
    INPUT is a JSON-lines file, or a folder of *.jsonl files read in name order: one object
    per line with "prompt" (generate) or "text" (score), and an optional "id" (else the line
    number, counted from 1 across the files); a bare JSON string is that field alone. OUTPUT_DIR receives JSON-lines shards
    (part-00000.jsonl, ...): one object per input row with its id, its other fields and the
    results (text, ids, finish_reason, logprobs; or n_tokens, nll, perplexity), or an "error".
    OUTPUT_DIR appears only when the job is complete; a non-empty one is refused unless --force.

    MODEL_DIR (and INPUT) must be readable at the same path on every node. A worker where it
    is missing, or differs from its SHA256SUMS, fails the job with a line naming the node. With
    --seed, each row's random stream depends only on the seed and the row's id.
    """
    files = job.input_files(input_path)
    if task == "score" and options:  # the generation options
        raise click.UsageError("generation options do not apply to --task score")
    if task == "generate" and stride is not None:
        raise click.UsageError("--stride applies to --task score only")
    if options.get("constraint") is not None:
        check_constraint(model_dir, options["constraint"])
    chunks, total = job.plan(files)
    out = job.output_folder(output_dir, force, keep=(input_path, model_dir))
    counts = {"rows": 0, "tokens": 0, "errors": 0}
    started = time.monotonic()

    def info(rows: int, seconds: float) -> str:
        s = max(seconds, 1e-9)
        return (f"{rows}/{total} rows, {rows / s:.1f} rows/s, {counts['tokens'] / s:.0f} tokens/s, "
                f"{counts['errors']} errors")

    with atomic_output_dir(out, force) as tmp:
        shards = job.Shards(tmp)
        try:
            with progress("gpt-batch", total, info, enabled=not quiet and sys.stderr.isatty()) as advance:
                def add(rows: int, tokens: int, errors: int) -> None:
                    counts["rows"] += rows
                    counts["tokens"] += tokens
                    counts["errors"] += errors
                    advance(rows)

                run_job(model_dir, chunks, shards, task, address, workers, threads_per_worker, batch_size, stride,
                    {**options, "prefix_cache_mb": prefix_cache_mb, "weights": weights}, add)
        finally:
            shards.close()
        if counts["rows"] != total:  # each row is written once: anything else is a lost row
            raise GPT2Error(f"{total - counts['rows']} of {total} rows did not come back from Ray; nothing was written")
    print(f"gpt-batch: {counts['rows']} rows ({counts['errors']} errors, {counts['tokens']} tokens) in "
          f"{time.monotonic() - started:.1f} s -> {output_dir}", file=sys.stderr)


def check_constraint(model_dir, constraint) -> None:
    """Compile the job's constraint here, before Ray starts, where the model folder is readable
    (else the workers check it): a bad one is one line at once, not every row's error."""
    from ..api import load_tokenizer
    from ..constraint import backend

    try:
        tokenizer = load_tokenizer(model_dir)
    except GPT2Error:
        return
    backend().compile_constraint(constraint, tokenizer)


def run_job(model_dir, chunks, out, task, address, workers, threads, batch_size, stride, options, progress) -> None:
    """Run the job on Ray; `progress(rows, tokens, errors)` is told of every batch written."""
    try:
        import ray
        from ray.data import ActorPoolStrategy, DataContext
    except ImportError as e:
        raise missing_extra("gpt-batch", "ray", e) from None
    from . import Generate, Score

    started_here = not ray.is_initialized()
    try:
        if started_here:
            warnings.filterwarnings("ignore", module="ray")
            os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # Ray's C++ notes are not the user's business
            env = {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
            if address:
                ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False,
                         runtime_env={"env_vars": env})
            else:  # one spare CPU for the parse tasks, which the actors would otherwise starve
                workers = workers or max(1, (os.cpu_count() or 1) // threads)
                # "local": a Ray of our own, even where another already runs on this machine (with no
                # address, ray.init would join that one, and refuse num_cpus)
                ray.init(address="local", num_cpus=workers * threads + 1, include_dashboard=False, logging_level=logging.ERROR,
                         log_to_driver=False, runtime_env={"env_vars": env})
        if not workers:  # the cluster's CPUs, one kept for the parse tasks
            workers = max(1, (int(ray.cluster_resources().get("CPU", 1)) - 1) // threads)
        for name in ("ray", "ray.data"):  # failures reach the user as one line of ours, not Ray's logs
            logging.getLogger(name).setLevel(logging.CRITICAL)
        sums = check_every_node(ray, model_dir)
        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        column = job.COLUMNS[task]
        common = {"model_dir": str(model_dir), "expect_sums": sums, "weights": options.pop("weights", "float32")}
        if task == "generate":
            stage, kwargs = Generate, {**common, "ids_as_json": True, **options}
        else:
            stage, kwargs = Score, {**common, "stride": stride, "prefix_cache_mb": options["prefix_cache_mb"]}
        ds = ray.data.from_items([vars(c) for c in chunks])
        ds = ds.flat_map(job.parse_chunk, fn_kwargs={"column": column, "reserved": (*job.RESULTS[task], "error"),
                                                     "carry": job.CARRIED[task]}, num_cpus=0.25)
        ds = ds.map_batches(stage, fn_constructor_kwargs=kwargs, compute=ActorPoolStrategy(size=workers),
                            batch_size=batch_size, num_cpus=threads, batch_format="numpy")
        seen: set[int] = set()
        for result in ds.iter_batches(batch_size=None, batch_format="numpy"):
            rows = [(r, t) for line, r, t in job.output_rows(result, task) if not (line in seen or seen.add(line))]
            out.write([r for r, _ in rows])
            progress(len(rows), sum(t for _, t in rows), sum("error" in r for r, _ in rows))
    except (KeyboardInterrupt, GPT2Error):
        raise
    except Exception as e:  # noqa: BLE001 -- Ray's wrapping of a remote failure: say it in one line
        raise GPT2Error(job.one_line(e)) from None
    finally:
        if started_here:
            ray.shutdown()


def check_every_node(ray, model_dir) -> str:
    """Check MODEL_DIR on every node with CPUs before the job starts: present, loadable, equal to
    its SHA256SUMS, and that SHA256SUMS the same as the first node's (whose digest is returned;
    actors, on nodes that join later too, check the same). One clear line naming the node if not."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .nodes import check_model_dir, sums_digest

    @ray.remote(num_cpus=0)
    def check(path: str, expect: str | None) -> tuple[str | None, str]:
        try:
            check_model_dir(path, expect_sums=expect)
        except GPT2Error as e:
            return str(e), ""
        return None, sums_digest(path)

    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]

    def on(node):
        return check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))

    error, digest = ray.get(on(nodes[0]).remote(str(model_dir), None))  # the first node's copy is the reference
    expect = digest if error is None else None
    results = [(error, digest)] + ray.get([on(n).remote(str(model_dir), expect) for n in nodes[1:]])
    errors = [e for e, _ in results if e]
    if errors:
        more = f" (and on {len(errors) - 1} more of {len(nodes)} nodes)" if len(errors) > 1 else ""
        raise GPT2Error(errors[0] + more)
    return digest


def main() -> None:
    run_command(batch, "gpt-batch", interrupted="interrupted: no output was written")
