"""`gpt-run`: generate text with a converted GPT-2 model folder, streaming to stdout."""

from __future__ import annotations

import os
import sys

import click

from .errors import GPT2Error

EXIT_ERROR = 1


def _read_prompt(prompt: str) -> str:
    if prompt != "-":
        return prompt
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GPT2Error(f"the prompt on stdin is not valid UTF-8 (byte {e.start})") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model_dir", type=click.Path(file_okay=False, path_type=str))
@click.argument("prompt")
@click.option("-n", "--n-tokens", default=50, show_default=True, type=click.IntRange(min=0),
              help="How many tokens to generate at most.")
@click.option("--ignore-eos", is_flag=True,
              help="Keep generating after <|endoftext|> instead of stopping there.")
def run(model_dir: str, prompt: str, n_tokens: int, ignore_eos: bool) -> None:
    """Continue PROMPT with the GPT-2 model in MODEL_DIR, greedily, streaming the new text.

    MODEL_DIR is a folder made by `gpt-convert` (or a Hugging Face GPT-2 folder saved as
    safetensors). PROMPT is the text to continue; `-` reads it from stdin as UTF-8, kept
    byte for byte (a trailing newline is part of the prompt). An empty prompt generates
    unconditionally, from <|endoftext|>. Only the generated text is printed, as each
    token is chosen; generation stops after N tokens or at <|endoftext|>.

    Prompt plus N tokens must fit in the model's context (1024 positions for GPT-2).
    Errors go to stderr as one line, with exit status 1 (2 for bad usage).
    """
    from . import load  # imported here so that --help does not pay for NumPy

    text = _read_prompt(prompt)
    model = load(model_dir)
    out = sys.stdout.buffer
    for piece in model.generate(text, n_tokens, stop_at_eos=not ignore_eos):
        out.write(piece.encode("utf-8"))
        out.flush()
    if out.isatty():
        out.write(b"\n")  # leave the shell prompt on a line of its own; pipes get the exact text
    out.flush()


def main() -> None:
    try:
        run.main(prog_name="gpt-run", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as e:
        print(f"gpt-run: error: {e.format_message()} (see 'gpt-run --help')", file=sys.stderr)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        print(f"gpt-run: error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except GPT2Error as e:
        print(f"gpt-run: error: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    except BrokenPipeError:
        # The reader went away (`gpt-run ... | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except KeyboardInterrupt:
        sys.exit(130)
    except OSError as e:
        print(f"gpt-run: error: {e}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
