"""What every command shares: errors as one line and exit codes (`run_command`), the generation
flags built from `Options` (`generation_options`), input text, stdout as UTF-8, progress bars."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Callable, Iterator

import click

from ..constraint import Constraint
from ..errors import GPT2Error
from ..options import Options

EXIT_ERROR = 1


def read_text(source: str, what: str) -> str:
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


class Out:
    """stdout as UTF-8 bytes, flushed as we go (text streams while it is generated)."""

    def __init__(self):
        self.buffer = sys.stdout.buffer

    def write(self, text: str) -> None:
        self.buffer.write(text.encode("utf-8"))
        self.buffer.flush()


def generation_options(command=None, *, exclude: tuple[str, ...] = ()):
    """Add one click option per field of `Options` that has a command-line form (but those in
    `exclude`), checked by the same rules as the Python API; the command receives them as one
    dict, `options` (only those given, so that the defaults stay those of `Options`).
    Use as `@generation_options` or `@generation_options(exclude=(...))`."""
    if command is None:
        return functools.partial(generation_options, exclude=exclude)
    specs = [(f, f.metadata["cli"]) for f in fields(Options) if f.metadata.get("cli") and f.name not in exclude]
    constrain = any(cli.get("constraint") for _, cli in specs)
    specs = [(f, cli) for f, cli in specs if not cli.get("constraint")]

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
        if constrain:
            constraint = constraint_from_flags({flag: kwargs.pop(name) for flag, name, _ in CONSTRAINT_FLAGS})
            if constraint is not None:
                options["constraint"] = constraint
        return command(*args, options=options, **kwargs)

    if constrain:
        for flag, name, kwargs in reversed(CONSTRAINT_FLAGS):
            wrapper = click.option(flag, name, **kwargs)(wrapper)
    for f, cli in reversed(specs):
        flag = cli.get("flag", "--" + f.name.replace("_", "-"))
        kwargs = {k: cli[k] for k in ("type", "metavar", "multiple", "is_flag", "show_default") if k in cli}
        default = f.default if cli.get("show_default") else None
        wrapper = click.option(*flag.split("/"), f.name, default=default, callback=check(f.name),
                               help=cli.get("help", f.metadata["help"]), **kwargs)(wrapper)
    return wrapper


CONSTRAINT_FLAGS = [  # the field `constraint` on command lines: one flag per kind
    ("--json-schema", "json_schema", {"metavar": "SCHEMA", "help": "Constrain the output to JSON valid under SCHEMA: "
                                      "a file, or the schema itself (JSON text starting with '{')."}),
    ("--json-object", "json_object", {"is_flag": True, "default": None, "help": "Constrain the output to a JSON object."}),
    ("--regex", "regex", {"metavar": "RE", "help": "Constrain the output to text that RE matches as a whole."}),
    ("--choice", "choice", {"metavar": "TEXT", "multiple": True,
                            "help": "Constrain the output to one of the choices; repeat for each."}),
    ("--grammar", "grammar", {"metavar": "FILE", "help": "Constrain the output to the grammar in FILE (Lark or "
                              "llama.cpp's GBNF)."}),
]


def constraint_from_flags(given: dict) -> Constraint | None:
    """The constraint the command line's flags ask for (None if none): at most one of them."""
    given = {flag: v for flag, v in given.items() if v not in (None, (), False)}
    if len(given) > 1:
        raise click.UsageError(f"give one constraint, not {' and '.join(given)}")
    if not given:
        return None
    (flag, value), = given.items()
    if flag == "--json-schema":
        text = value if value.lstrip().startswith("{") else read_text(value, "the JSON schema")
        return Constraint.json_schema(text)
    if flag == "--grammar":
        return Constraint.grammar(read_text(value, "the grammar"))
    if flag == "--json-object":
        return Constraint.json_object()
    return Constraint.regex(value) if flag == "--regex" else Constraint.choice(value)


def stride_option(help: str):
    """The sliding window's --stride for scoring (gpt-run --score, gpt-batch --task score)."""
    return click.option("--stride", type=click.IntRange(min=1), default=None, help=help)


def prefix_cache_option(help: str):
    """--prefix-cache-mb for commands that run many prompts (gpt-run, gpt-batch; gpt-serve has its own default)."""
    return click.option("--prefix-cache-mb", type=click.FloatRange(min=0), default=0, show_default=True, help=help)


def weights_option(f):
    """--weights: the precision of the weights in the products (`gpt2np.load(weights=...)`), for every
    command that loads a model."""
    from ..matmul import PRECISIONS

    return click.option("--weights", type=click.Choice(PRECISIONS), default="float32",
                        show_default=True,
                        help="The weights' precision in the products: float32 (the file's, exact), or bfloat16 "
                             "or int8, made once at load for faster products (needs gpt2np[onednn]).")(f)


def parse_logit_bias(items) -> dict[int, float]:
    """`["50256=-100", "13=2.5"]` (the command-line form) -> {50256: -100.0, 13: 2.5}."""
    out = {}
    for item in items:
        token, sep, bias = item.partition("=")
        try:
            out[int(token)] = float(bias)
        except ValueError:
            raise GPT2Error(f"--logit-bias takes ID=BIAS (a token id and a number), got {item!r}") from None
        if not math.isfinite(out[int(token)]):
            raise GPT2Error(f"--logit-bias needs a finite bias, got {item!r}")
    return out


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def bytes_info(total: int | None, start: int = 0) -> Callable[[int, float], str]:
    """`progress`'s text for a transfer of `total` bytes (None: unknown) that starts at `start`:
    the share done, bytes done, speed and time left."""
    def info(done: int, seconds: float) -> str:
        speed = (done - start) / max(seconds, 1e-9)
        if not total:
            return f"{_size(done)}  {_size(speed)}/s"
        left = int((total - done) / speed) if speed > 0 else 0
        return (f"{100 * done / total:5.1f}%  {_size(done)} / {_size(total)}  {_size(speed)}/s  "
                f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d} left")
    return info


REDRAW_S = 0.1  # a terminal's bar is redrawn at most this often


@contextmanager
def progress(label: str, total: int | None, info: Callable[[int, float], str], enabled: bool = True,
             done: int = 0) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr: click's, redrawn in place on a terminal (a bar when `total` is
    known, the counts alone when not); elsewhere (logs, pipes) one line when the work is done, and
    nothing if it failed (an error stays one line). Yields `update(n)`; `info(done, seconds)` is
    the text after the bar (counts, speeds)."""
    state = {"done": done, "start": time.monotonic(), "shown": done, "drawn": 0.0}

    def show(_=None) -> str:
        return info(state["done"], time.monotonic() - state["start"])

    def count(n: int) -> None:
        state["done"] += n

    if not enabled or not sys.stderr.isatty():
        yield count
        if enabled:
            click.echo(f"{label}  {show()}", file=sys.stderr)
        return
    template = "%(label)s  [%(bar)s]  %(info)s" if total else "%(label)s  %(info)s"
    with click.progressbar(length=total or 1, label=label, file=sys.stderr, show_eta=False, show_percent=False,
                           show_pos=False, item_show_func=show, width=30, bar_template=template) as bar:

        def update(n: int) -> None:
            count(n)
            now = time.monotonic()
            if now - state["drawn"] >= REDRAW_S:
                state["drawn"] = now
                bar.update(state["done"] - state["shown"] if total else 0)
                state["shown"] = state["done"]

        update(0)
        yield update
        if total:
            bar.update(state["done"] - state["shown"])  # the last draw shows the whole count


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


