"""`gpt-explain`: write the page that shows what GPT-2 does with a prompt."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import click

from ..cli import _read_text, generation_options, run_command
from ..errors import GPT2Error

MAX_POSITIONS = 256  # prompt + new tokens: the page holds n_layer x n_head maps of T x T


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
    from .. import load  # imported here so that --help does not pay for NumPy
    from . import page, report

    text = _read_text("-", "the prompt on stdin") if prompt == "-" else prompt
    model = load(model_dir)
    n = options.pop("n_tokens", 50)
    total = len(model.encode(text) or [0]) + n
    if total > min(MAX_POSITIONS, model.config.n_positions):
        raise GPT2Error(f"the prompt and the new tokens are {total} tokens; the page shows at most "
                        f"{min(MAX_POSITIONS, model.config.n_positions)} (use a shorter prompt or a smaller -n)")
    html = page.render(report(model, text, n, **options)).encode("utf-8")
    if output == "-":
        sys.stdout.buffer.write(html)
        sys.stdout.buffer.flush()
        return
    write_atomically(Path(output), html)
    print(f"gpt-explain: wrote {output} ({len(html) / 1e6:.1f} MB)", file=sys.stderr)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then rename it over `path`: a reader (or a
    crash) never sees half a page, and an existing file is replaced only when the new one is whole."""
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise GPT2Error(f"cannot write {path}: the folder {folder} does not exist")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as e:
        raise GPT2Error(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would have made it
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise GPT2Error(f"cannot write {path}: {e.strerror}") from None
        raise


def main() -> None:
    run_command(explain, "gpt-explain")
