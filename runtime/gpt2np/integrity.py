"""SHA256SUMS: the converter records each file of a model folder; `gpt-run --verify` checks them.

The file uses the format of `sha256sum` ("<hex digest>  <file name>" per line), so
`sha256sum -c SHA256SUMS` inside the folder checks it too.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from .errors import GPT2Error

SUMS_FILE = "SHA256SUMS"
_CHUNK = 1 << 22


def format_sums(digests: dict[str, str]) -> str:
    return "".join(f"{digest}  {name}\n" for name, digest in digests.items())


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def verify(folder: str | Path) -> list[tuple[str, str]]:
    """[(file name, "ok" | "differs" | "missing")] for every file SHA256SUMS lists."""
    folder = Path(folder)
    try:
        lines = (folder / SUMS_FILE).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise GPT2Error(f"{folder}: no {SUMS_FILE} (only folders made by gpt-convert have one)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GPT2Error(f"{folder / SUMS_FILE}: cannot read ({e})") from None
    results = []
    for n, line in enumerate(lines, start=1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or "/" in name or name in ("", ".", ".."):
            raise GPT2Error(f"{folder / SUMS_FILE}:{n}: not a '<sha256>  <file name>' line")
        path = folder / name
        if not path.is_file():
            results.append((name, "missing"))
        else:
            results.append((name, "ok" if file_sha256(path) == digest.lower() else "differs"))
    return results
