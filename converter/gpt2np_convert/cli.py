"""`gpt-convert`: download one of OpenAI's GPT-2 checkpoints and write a gpt2np model folder."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from gpt2np.cli.common import bytes_info, progress as progress_bar, run_command
from gpt2np.errors import missing_extra

from .download import DEFAULT_BASE_URL, canonical_model, default_cache_dir
from .progress import SILENT
from gpt2np.outdir import check_output_dir


class Bars:
    """The converter's progress as the command line shows it: a bar per file on stderr (one line
    per file when stderr is not a terminal), notes as lines."""

    def transfer(self, label: str, total: int | None, done: int = 0):
        return progress_bar(label, total, bytes_info(total, done), done=done)

    def note(self, message: str) -> None:
        print(message, file=sys.stderr)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.argument("out_dir", type=click.Path(path_type=Path))
@click.option("--base-url", envvar="GPT2_BASE_URL", default=DEFAULT_BASE_URL, show_default=True,
              help="Where the model folders are (env GPT2_BASE_URL): files are fetched from "
                   "BASE_URL/MODEL/FILE, so a mirror must keep OpenAI's layout.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where downloads are kept and resumed [default: $XDG_CACHE_HOME/gpt2np or ~/.cache/gpt2np].")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Convert the checkpoint files already in this folder; nothing is downloaded.")
@click.option("--retries", envvar="GPT2_RETRIES", default=5, show_default=True, type=click.IntRange(min=0),
              help="Retries of a failed download (connection lost, 5xx), with growing waits.")
@click.option("--force", is_flag=True, help="Replace OUT_DIR if it exists and is not empty.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def convert_command(model, out_dir, base_url, cache_dir, checkpoint_dir, retries, force, quiet):
    """Convert OpenAI's GPT-2 MODEL into the model folder OUT_DIR, for `gpt-run`.

    MODEL is 124M, 355M, 774M or 1558M (the old names 117M and 345M also work). The seven
    checkpoint files are downloaded into the cache (resumed if interrupted, never fetched twice),
    read with TensorFlow, checked against hparams.json, and written as OUT_DIR/model.safetensors,
    config.json, vocab.json and merges.txt. OUT_DIR appears only once it is complete.
    """
    from .convert import convert  # TensorFlow loads only once there is work to do
    from .download import download_model

    model = canonical_model(model)
    progress = SILENT if quiet else Bars()
    check_output_dir(out_dir, force)  # before a long download, not after it
    if checkpoint_dir is None:
        checkpoint_dir = download_model(model, cache_dir or default_cache_dir(), base_url,
                                        progress=progress, retries=retries)
        source = f"{base_url.rstrip('/')}/{model}"
    else:
        source = f"{checkpoint_dir.resolve()} ({model})"
    convert(checkpoint_dir, out_dir, source=source, force=force, progress=progress)


def main() -> None:
    try:
        run_command(convert_command, "gpt-convert",
                    interrupted="interrupted; a partial download is kept and resumes next time")
    except ModuleNotFoundError as e:
        if e.name not in ("tensorflow", "safetensors"):
            raise
        print(f"gpt-convert: error: {missing_extra('gpt-convert', 'convert', e)}", file=sys.stderr)
        sys.exit(1)
