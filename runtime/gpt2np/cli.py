"""`gpt-run`: generate or score text with a GPT-2 model folder."""

from __future__ import annotations

import functools
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

import click

from .errors import GPT2Error
from .generate import Options, parse_logit_bias

EXIT_ERROR = 1


def _read_text(source: str, what: str) -> str:
    """A file's (or with `-`, stdin's) bytes as UTF-8, kept exactly."""
    try:
        data = sys.stdin.buffer.read() if source == "-" else Path(source).read_bytes()
    except OSError as e:
        raise GPT2Error(f"cannot read {what} {source}: {e.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        name = "stdin" if source == "-" else source
        raise GPT2Error(f"{what} {name} is not valid UTF-8 (byte {e.start})") from None


def _read_prompts(source: str) -> list[str]:
    """One prompt per line (blank lines skipped), or with a `.jsonl` name one JSON object
    {"prompt": "..."} or JSON string per line."""
    text = _read_text(source, "the prompts file")
    prompts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not source.endswith(".jsonl"):
            if line.strip():
                prompts.append(line)
            continue
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as e:
            raise GPT2Error(f"{source}:{n}: not JSON ({e.msg})") from None
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise GPT2Error(f'{source}:{n}: expected a JSON string or an object with a "prompt" string')
        prompts.append(prompt)
    if not prompts:
        raise GPT2Error(f"the prompts file {source} holds no prompt")
    return prompts


class _Out:
    """stdout as UTF-8 bytes, flushed as we go (text streams while it is generated)."""

    def __init__(self):
        self.buffer = sys.stdout.buffer

    def write(self, text: str) -> None:
        self.buffer.write(text.encode("utf-8"))
        self.buffer.flush()


def _stats(g) -> str:
    prompt = len(g.prompt_ids)
    rate = f" ({prompt / g.prefill_s:.0f} tokens/s)" if g.prefill_s > 0 else ""
    return (f"prompt {prompt} tokens in {g.prefill_s:.3f} s{rate}; generated {len(g.ids)} tokens, "
            f"{g.tokens_per_s:.1f} tokens/s after the first; stop: {g.stop_reason}")


def generation_options(command=None, *, exclude: tuple[str, ...] = ()):
    """Add one click option per field of `Options` that has a command-line form (but those in
    `exclude`), checked by the same rules as the Python API; the command receives them as one
    dict, `options` (only those given, so that the defaults stay those of `Options`).
    Use as `@generation_options` or `@generation_options(exclude=(...))`."""
    if command is None:
        return functools.partial(generation_options, exclude=exclude)
    specs = [(f, f.metadata["cli"]) for f in fields(Options) if f.metadata.get("cli") and f.name not in exclude]

    def check(name):
        def callback(ctx, param, value):
            if value is None or value == () or param.is_flag:
                return value
            try:
                if name == "logit_bias":
                    value = tuple(parse_logit_bias(value).items())
                Options.check(name, value)
            except GPT2Error as e:
                raise click.BadParameter(str(e)) from None
            return value
        return callback

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        options = {}
        for f, cli in specs:
            value = kwargs.pop(f.name)
            if cli.get("invert"):
                value = not value
            if value is not None and value != () and value != f.default:
                options[f.name] = value
        return command(*args, options=options, **kwargs)

    for f, cli in reversed(specs):
        flag = cli.get("flag", "--" + f.name.replace("_", "-"))
        kwargs = {k: cli[k] for k in ("type", "metavar", "multiple", "is_flag", "show_default") if k in cli}
        default = f.default if cli.get("show_default") else None
        wrapper = click.option(*flag.split("/"), f.name, default=default, callback=check(f.name),
                               help=f.metadata["help"], **kwargs)(wrapper)
    return wrapper


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
@click.option("--stride", type=click.IntRange(min=1), default=None,
              help="With --score: how far the window moves for texts longer than the context [default: half of it].")
@click.option("--verify", is_flag=True,
              help="Check MODEL_DIR's files against the SHA256SUMS that gpt-convert wrote, and name what differs.")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (ids, text, log-probabilities, stop reason, timings) instead of text.")
@click.option("--stats", is_flag=True, help="Print token counts, speed and times to stderr.")
def run(model_dir, prompt, options, prompts_file, batch_size, score_source, stride, verify, as_json, stats):
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
    modes = [m for m, given in (("PROMPT", prompt is not None), ("--prompts-file", prompts_file),
                                ("--score", score_source), ("--verify", verify)) if given]
    if len(modes) != 1:
        raise click.UsageError("give exactly one of PROMPT, --prompts-file, --score or --verify"
                               + (f" (got {' and '.join(modes)})" if modes else ""))
    if verify:
        from .integrity import verify as check

        results = check(model_dir)
        for name, status in results:
            print(f"{status:8} {name}")
        bad = [f"{name} {status}" for name, status in results if status != "ok"]
        if bad:
            raise GPT2Error(f"{model_dir}: {len(bad)} of {len(results)} files do not match SHA256SUMS: "
                            + ", ".join(bad))
        return
    from . import load  # imported here so that --help does not pay for NumPy

    model = load(model_dir)
    out = _Out()
    if score_source:
        result = model.score(_read_text(score_source, "the text to score"), stride=stride)
        if as_json:
            out.write(json.dumps(result.to_dict()) + "\n")
        else:
            out.write(f"tokens: {len(result.ids)}\nnll: {result.nll:.6f}\nperplexity: {result.perplexity:.6f}\n")
        return
    if prompts_file:
        _run_prompts_file(model, _read_prompts(prompts_file), batch_size, options, out, stats)
        return
    text = _read_text("-", "the prompt on stdin") if prompt == "-" else prompt
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


def _run_prompts_file(model, prompts: list[str], batch_size: int, options: dict, out: _Out, stats: bool) -> None:
    """Decode every prompt with up to `batch_size` in the pass at once (a new one joins as soon as
    one finishes); print the results in input order as soon as each and those before it are done."""
    engine, seqs = model.queue(prompts, strict=False, max_batch=batch_size, **options)
    printed = 0
    for seq, _, _ in engine.events():
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


def run_command(command: click.Command, prog: str, interrupted: str = "") -> None:
    """Run a click command as a Unix tool: errors are one line on stderr with exit status 1
    (2 for bad usage), Ctrl-C exits 130 (saying `interrupted` if given), a closed pipe is quiet."""
    def fail(message: str, status: int = EXIT_ERROR) -> None:
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(status)

    try:
        command.main(prog_name=prog, standalone_mode=False)
    except click.UsageError as e:
        fail(f"{e.format_message()} (see '{prog} --help')", e.exit_code)
    except click.ClickException as e:
        fail(e.format_message(), e.exit_code)
    except GPT2Error as e:
        fail(str(e))
    except BrokenPipeError:
        # The reader went away (`gpt-run ... | head`): stop quietly with status 1, as Python's
        # documentation advises and as click does when it sees the same error first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except (KeyboardInterrupt, click.exceptions.Abort):
        if interrupted:
            print(f"{prog}: {interrupted}", file=sys.stderr)
        sys.exit(130)
    except OSError as e:
        fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")


def main() -> None:
    run_command(run, "gpt-run")
