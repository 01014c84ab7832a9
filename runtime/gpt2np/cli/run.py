"""`gpt-run`: generate or score text with a GPT-2 model folder."""

from __future__ import annotations

import json
import re
import sys

import click

from ..errors import GPT2Error
from ..prompts import parse_jsonl_line, row_text
from .common import (Out, generation_options, prefix_cache_option, read_text, run_command, stride_option,
                     weights_option)


def read_prompts(source: str) -> list[str]:
    """One prompt per line (blank lines skipped), or with a `.jsonl` name one JSON object
    {"prompt": "..."} or JSON string per line."""
    text = read_text(source, "the prompts file")
    prompts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not source.endswith(".jsonl"):
            if line.strip():
                prompts.append(line)
            continue
        if not line.strip():
            continue
        try:
            prompt = row_text(parse_jsonl_line(line, "prompt"), "prompt")
        except GPT2Error as e:
            raise GPT2Error(f"{source}:{n}: {e}") from None
        prompts.append(prompt)
    if not prompts:
        raise GPT2Error(f"the prompts file {source} holds no prompt")
    return prompts


def _stats(g) -> str:
    prompt = len(g.prompt_ids)
    rate = f" ({prompt / g.prefill_s:.0f} tokens/s)" if g.prefill_s > 0 else ""
    return (f"prompt {prompt} tokens in {g.prefill_s:.3f} s{rate}; generated {len(g.ids)} tokens, "
            f"{g.tokens_per_s:.1f} tokens/s after the first; stop: {g.stop_reason}")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("prompt", required=False)
@generation_options
@click.option("--prompts-file", metavar="FILE",
              help="Generate for every prompt in FILE (- for stdin), decoded together; JSON lines out.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="With --prompts-file: how many prompts decode together.")
@click.option("--score", "score_source", metavar="FILE",
              help="Score the text in FILE (- for stdin): log-probabilities, NLL, perplexity.")
@stride_option("With --score: how far the window moves for texts longer than the context [default: half of it].")
@prefix_cache_option("With --prompts-file or --score: memory for a prefix cache, so that prompts (or texts) that "
                     "begin alike compute the shared part once.")
@click.option("--verify", is_flag=True,
              help="Check MODEL_DIR's files against the SHA256SUMS that gpt-convert wrote, and name what differs.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (ids, text, log-probabilities, stop reason, timings) instead of text.")
@click.option("--stats", is_flag=True, help="Print token counts, speed and times to stderr.")
@click.option("--ids", "as_ids", is_flag=True,
              help="PROMPT is token ids (separated by commas or spaces), as the API takes them.")
@weights_option
def gpt_run(model_dir, prompt, options, prompts_file, batch_size, score_source, stride, prefix_cache_mb, verify, as_json,
        stats, as_ids, weights):
    """Continue PROMPT with the GPT-2 model in MODEL_DIR, streaming the new text to stdout.

    MODEL_DIR is a folder made by `gpt-convert` (or a Hugging Face GPT-2 folder saved as
    safetensors). PROMPT is the text to continue; `-` reads it from stdin as UTF-8, kept
    byte for byte (a trailing newline is part of the prompt). An empty prompt generates
    unconditionally, from <|endoftext|>. Only the generated text is printed, as each token
    is chosen.

    Decoding is greedy unless --temperature, --top-k or --top-p is given. Generation stops
    after N tokens, at <|endoftext|>, at a --stop string, or when the model's context (1024
    positions) is full: a note on stderr says so, and --sliding-window goes on instead.

    \b
    Instead of PROMPT:
      --prompts-file FILE   one prompt per line (a FILE.jsonl: {"prompt": ...} per line);
                            prints one JSON object per prompt, in input order
      --score FILE          prints the text's token count, NLL and perplexity
                            (with --json, every token's log-probability too)
      --verify              checks MODEL_DIR's files against their SHA256SUMS

    Errors go to stderr as one line, with exit status 1 (2 for bad usage).
    """
    if as_ids and prompt is None:
        raise click.UsageError("--ids reads PROMPT as token ids: give PROMPT")
    modes = [m for m, given in (("PROMPT", prompt is not None), ("--prompts-file", prompts_file),
                                ("--score", score_source), ("--verify", verify)) if given]
    if len(modes) != 1:
        raise click.UsageError("give exactly one of PROMPT, --prompts-file, --score or --verify"
                               + (f" (got {' and '.join(modes)})" if modes else ""))
    if verify:
        from ..integrity import verify as check

        results = check(model_dir)
        for name, status in results:
            print(f"{status:8} {name}")
        bad = [f"{name} {status}" for name, status in results if status != "ok"]
        if bad:
            raise GPT2Error(f"{model_dir}: {len(bad)} of {len(results)} files do not match SHA256SUMS: "
                            + ", ".join(bad))
        return
    from ..api import load  # imported here so that --help does not pay for NumPy

    model = load(model_dir, weights=weights)
    out = Out()
    if score_source:
        result = model.score(read_text(score_source, "the text to score"), stride=stride, prefix_cache=prefix_cache_mb)
        if as_json:
            out.write(json.dumps(result.to_dict()) + "\n")
        else:
            out.write(f"tokens: {len(result.ids)}\nnll: {result.nll:.6f}\nperplexity: {result.perplexity:.6f}\n")
        return
    if prompts_file:
        _run_prompts_file(model, read_prompts(prompts_file), batch_size, options, prefix_cache_mb,
                          out, stats)
        return
    text = read_text("-", "the prompt on stdin") if prompt == "-" else prompt
    if as_ids:
        text = _ids(text)
    stream = model.generate(text, **options)
    for piece in stream:
        if not as_json:
            out.write(piece)
    g = stream.result
    if as_json:
        out.write(json.dumps({"prompt": text, **g.to_dict()}, ensure_ascii=False) + "\n")
    elif sys.stdout.isatty():
        out.write("\n")  # leave the shell prompt on a line of its own; pipes get the exact text
    if g.stop_reason == "context":
        print(f"gpt-run: stopped: the model's context of {model.config.n_positions} positions is full "
              "(--sliding-window goes on)", file=sys.stderr)
    if stats:
        print(f"gpt-run: {_stats(g)}", file=sys.stderr)
        print(f"gpt-run: {model.matmul.describe()}", file=sys.stderr)


def _ids(text: str) -> list[int]:
    """`--ids`: PROMPT's token ids, separated by commas or spaces (the model checks their range)."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts or not all(p.isascii() and p.isdigit() for p in parts):
        raise click.UsageError("--ids: PROMPT must be token ids separated by commas or spaces, e.g. 464,2068")
    return [int(p) for p in parts]


def _run_prompts_file(model, prompts: list[str], batch_size: int, options: dict, prefix_cache_mb: float | None,
                      out: Out, stats: bool) -> None:
    """Decode every prompt with up to `batch_size` in the pass at once (a new one joins as soon as
    one finishes); print the results in input order as soon as each and those before it are done."""
    engine, seqs = model.queue(prompts, strict=False, max_batch=batch_size, prefix_cache=prefix_cache_mb, **options)
    if stats:
        print(f"gpt-run: {model.matmul.describe()}", file=sys.stderr)
    printed = 0
    for _ in engine.events():
        while printed < len(seqs) and seqs[printed].done:
            g = seqs[printed].result
            out.write(json.dumps({"index": printed, "prompt": prompts[printed], **g.to_dict()},
                                 ensure_ascii=False) + "\n")
            if stats and g.error is None:
                print(f"gpt-run: [{printed}] {_stats(g)}", file=sys.stderr)
            printed += 1
    failed = [i for i, s in enumerate(seqs) if s.result.error is not None]
    if failed:
        raise GPT2Error(f"{len(failed)} of {len(seqs)} prompts failed (first: prompt {failed[0]}: "
                        f"{seqs[failed[0]].result.error}); the others were generated")


def main() -> None:
    run_command(gpt_run, "gpt-run")
