"""A `gpt-batch` job: JSON-lines in, the Ray Data pipeline, JSON-lines shards out.

Input is planned on the driver: one fast pass over the files finds chunks of `CHUNK_LINES` lines
and their first line numbers, so that a row's default id is its line number counted across the
files in name order. Ray tasks parse the chunks (the input must be readable on every node, like
the model folder), actors run `Generate` or `Score`, and the driver writes what comes back into
shards of a temporary sibling of OUTPUT_DIR (`gpt2np.outdir`), put in place when every row is written.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import GPT2Error
from ..outdir import check_output_dir, writing
from ..prompts import parse_jsonl_line, row_text

CHUNK_LINES = 1000  # lines per parse task, at most
CHUNK_BYTES = 64 << 20  # bytes per parse task, about
SHARD_ROWS = 10_000  # rows per output file
COLUMNS = {"generate": "prompt", "score": "text"}


@dataclass(frozen=True)
class Chunk:
    path: str
    start: int  # byte offsets [start, end)
    end: int
    first_line: int  # the line number of its first line, counted from 1 across every file
    file_line: int  # the same, counted in its own file


def input_files(source: str | Path) -> list[Path]:
    """INPUT's JSON-lines files: the file itself, or a folder's `*.jsonl` files in name order."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".jsonl"))
        if not files:
            raise GPT2Error(f"{path}: no .jsonl files in this folder")
        return files
    if not path.is_file():
        raise GPT2Error(f"{path}: no such file or folder")
    return [path]


def plan(files: list[Path], chunk_lines: int = CHUNK_LINES,
         chunk_bytes: int = CHUNK_BYTES) -> tuple[list[Chunk], int]:
    """The chunks of every file (at most `chunk_lines` lines or about `chunk_bytes` bytes each),
    and the number of rows (non-blank lines). Streams the files: memory stays of one line."""
    chunks, line, rows = [], 1, 0
    for path in files:
        try:
            with open(path, "rb") as f:
                start = pos = lines = 0
                file_line = 1
                for raw in f:  # binary files split at b"\n" only, as JSON lines do
                    pos += len(raw)
                    lines += 1
                    rows += bool(raw.strip())
                    if lines == chunk_lines or pos - start >= chunk_bytes:
                        chunks.append(Chunk(str(path.resolve()), start, pos, line, file_line))
                        line, file_line, start, lines = line + lines, file_line + lines, pos, 0
                if lines:
                    chunks.append(Chunk(str(path.resolve()), start, pos, line, file_line))
                    line += lines
        except OSError as e:
            raise GPT2Error(f"cannot read {path}: {e.strerror}") from None
    return chunks, rows


CARRIED = {"generate": ("constraint",), "score": ()}
"""Input fields a stage reads beside the prompt: a row's own `constraint` (as JSON text)."""


def parse_chunk(chunk: dict, column: str, reserved: tuple[str, ...] = (), carry: tuple[str, ...] = ()) -> Iterator[dict]:
    """The rows of one chunk: `_line` (its line number across the files), `id` (JSON text),
    the prompt or text, the fields in `carry` (JSON text, or None where absent), the whole input
    object (`_input`, JSON text) and `error` for a line that is not a usable row (the core's
    JSON-lines rule). Input fields named like the results (`reserved`) are an error."""
    with open(chunk["path"], "rb") as f:
        f.seek(chunk["start"])
        data = f.read(chunk["end"] - chunk["start"])
    name = os.path.basename(chunk["path"])
    for number, raw in enumerate(_lines(data), start=chunk["first_line"]):
        if not raw.strip():
            continue
        where = f"{name}:{number - chunk['first_line'] + chunk['file_line']}"
        row = {"_line": number, "id": json.dumps(number), column: None, "_input": None, "error": None,
               **dict.fromkeys(carry)}
        try:
            obj = parse_jsonl_line(raw, column)
        except GPT2Error as e:
            row["error"] = f"{where}: {e}"
            yield row
            continue
        if obj.get("id") is not None:
            row["id"] = json.dumps(obj["id"], ensure_ascii=False)
        for name in carry:
            if obj.get(name) is not None:
                row[name] = json.dumps(obj[name], ensure_ascii=False)
        taken = [k for k in reserved if k in obj]
        try:
            if taken:
                obj = {k: v for k, v in obj.items() if k not in reserved}
                raise GPT2Error(f"the field {taken[0]!r} is a result's name; rename it")
            row[column] = row_text(obj, column)
        except GPT2Error as e:
            row["error"] = f"{where}: {e}"
        row["_input"] = json.dumps(obj, ensure_ascii=False)
        yield row


def _lines(data: bytes) -> list[bytes]:
    """Lines as JSON-lines has them: split at \\n only (a \\r\\n ending is JSON whitespace)."""
    lines = data.split(b"\n")
    return lines[:-1] if lines and not lines[-1] else lines


def output_folder(path: str | Path, force: bool, keep: tuple[str | Path, ...] = ()) -> Path:
    """OUTPUT_DIR resolved and checked as `gpt2np.outdir` checks any output folder, and never one
    that is or holds INPUT or MODEL_DIR (which --force would replace)."""
    out = Path(path).resolve()
    for other in keep:
        other = Path(other).resolve()
        if other == out or out in other.parents:
            raise GPT2Error(f"{path}: the output folder would hold {other}; choose another")
    check_output_dir(out, force)
    return out


class Shards:
    """Rows written into a folder as JSON-lines files of SHARD_ROWS rows: part-00000.jsonl, ..."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shards, self.rows_in_shard, self.file = 0, 0, None

    def write(self, rows: list[dict]) -> None:
        for row in rows:
            if self.file is None:
                self.file = open(self.folder / f"part-{self.shards:05d}.jsonl", "w", encoding="utf-8")
            self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self.rows_in_shard += 1
            if self.rows_in_shard == SHARD_ROWS:
                self.close()

    def close(self) -> None:
        """End the current shard (durably); the next row starts a new one."""
        if self.file is not None:
            with writing(Path(self.file.name)):
                self.file.flush()
                os.fsync(self.file.fileno())
                self.file.close()
            self.file, self.rows_in_shard, self.shards = None, 0, self.shards + 1


RESULTS = {"generate": ("text", "ids", "finish_reason", "logprobs"), "score": ("n_tokens", "nll", "perplexity")}


def output_rows(batch: dict, task: str) -> Iterator[tuple[int, dict, int]]:
    """(line number, output object, tokens) per row of a result batch: the input's fields with
    its `id`, and the results (or `error`)."""
    results = RESULTS[task]
    columns = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}
    for i in range(len(columns["id"])):
        line = int(columns["_line"][i])
        raw = columns["_input"][i]
        out = json.loads(raw) if isinstance(raw, str) else {}
        out["id"] = json.loads(columns["id"][i])
        error = columns["error"][i]
        if isinstance(error, str) and error:  # a column of Nones may come back as NaN
            out["error"] = error
            yield line, out, 0
            continue
        for name in results:
            out[name] = _plain(columns[name][i])
        if task == "score":  # an int column with a null in its batch comes back as floats
            out["n_tokens"] = int(out["n_tokens"])
        yield line, out, len(out["ids"]) if task == "generate" else out["n_tokens"]


def _plain(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def one_line(error: BaseException) -> str:
    """The message worth showing from an exception Ray raised for a remote failure: our own
    `GPT2Error` line if one is in it, else its last line."""
    text = str(error)
    found = re.findall(r"GPT2Error: (.+)", text)
    if found:
        return found[-1].strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
