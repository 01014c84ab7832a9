"""`gpt-explain`: write the page that shows what GPT-2 does with a prompt."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..cli.common import generation_options, read_text, run_command
from ..outdir import atomic_write


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("prompt")
@generation_options(exclude=("sliding_window", "logprobs", "prompt_logprobs"))
@click.option("-o", "--output", default="explain.html", show_default=True, metavar="FILE",
              help="Where to write the page (- for stdout).")
def explain(model_dir, prompt, options, output):
    """Show inside GPT-2 for PROMPT, in one HTML page that works offline.

    The page shows how the prompt is cut into tokens (regex pieces, bytes, merges in rank
    order), the new tokens with their probabilities and the five most likely alternatives,
    every layer's and head's attention over the tokens, the logit lens (the next token read
    after each layer) and the shape of every tensor from ids to logits.

    PROMPT is the text (`-` reads it from stdin). Decoding is greedy unless --temperature,
    --top-k or --top-p is given, as in gpt-run. Prompt and new tokens together may be at
    most 256 tokens. Errors go to stderr as one line, with exit status 1 (2 for bad usage).
    """
    from ..api import load  # imported here so that --help does not pay for NumPy
    from ..inside import page, report

    text = read_text("-", "the prompt on stdin") if prompt == "-" else prompt
    model = load(model_dir)
    html = page.render(report(model, text, options.pop("n_tokens", 50), **options)).encode("utf-8")
    if output == "-":
        sys.stdout.buffer.write(html)
        sys.stdout.buffer.flush()
        return
    atomic_write(Path(output), html)
    print(f"gpt-explain: wrote {output} ({len(html) / 1e6:.1f} MB)", file=sys.stderr)


def main() -> None:
    run_command(explain, "gpt-explain")
