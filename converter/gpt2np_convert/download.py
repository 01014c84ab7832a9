"""Fetch OpenAI's published GPT-2 checkpoint files into a cache, resuming and retrying.

Files live at `{base_url}/{model}/{file}`; the default base URL is OpenAI's public blob storage.
Each file downloads to `{cache}/{model}/{file}.part` and is renamed to `{file}` only once its size
equals the size the server announced, so a file in the cache under its own name is complete.
"""

from __future__ import annotations

import fcntl
import http.client
import os
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

from gpt2np import GPT2Error

from .progress import SILENT, Progress


DEFAULT_BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/models"
MODELS = ("124M", "355M", "774M", "1558M")
ALIASES = {"117M": "124M", "345M": "355M"}  # the names OpenAI first published them under
FILES = ("checkpoint", "encoder.json", "hparams.json", "model.ckpt.data-00000-of-00001",
         "model.ckpt.index", "model.ckpt.meta", "vocab.bpe")
CHUNK = 1 << 20


def canonical_model(name: str) -> str:
    """`124M`..`1558M` as given, `117M`/`345M` as their new names; anything else is an error."""
    name = ALIASES.get(name, name)
    if name not in MODELS:
        valid = ", ".join(MODELS) + " (or the old names " + ", ".join(ALIASES) + ")"
        raise GPT2Error(f"unknown model {name!r}: choose one of {valid}")
    return name


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gpt2np"


class _Retry(Exception):
    """A transient failure: try again (from where the partial file ends)."""


def _open(url: str, offset: int, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "gpt2np-convert"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return urllib.request.urlopen(request, timeout=timeout)


def _fail_hint() -> str:
    return "use --base-url MIRROR (or GPT2_BASE_URL), or --checkpoint-dir DIR with the files already on disk"


def fetch(url: str, dest: Path, *, retries: int = 5, backoff: float = 0.5, timeout: float = 60.0,
          progress: Progress = SILENT) -> None:
    """Download `url` to `dest` unless `dest` exists; resume `dest.part` with an HTTP Range request.

    Transient failures (connection errors, 5xx, 429, a body cut short) are retried up to `retries`
    times, waiting `backoff`, 2·`backoff`, ... seconds. 404 and DNS failures are errors at once.
    """
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, progress, dest.name)
            os.replace(part, dest)
            return
        except _Retry as e:
            if attempt == retries:
                raise GPT2Error(f"download of {url} failed after {retries + 1} attempts ({e}); "
                                f"{_fail_hint()}") from None
            time.sleep(backoff * 2 ** attempt)


def _fetch_once(url: str, part: Path, timeout: float, progress: Progress, label: str) -> None:
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            if e.headers.get("Content-Range") == f"bytes */{offset}":
                return  # the partial file is already whole (killed before the rename)
            part.unlink()  # our partial file is no prefix of theirs: start over
            raise _Retry("server refused the resume range") from None
        if e.code >= 500 or e.code == 429:
            raise _Retry(f"HTTP {e.code} {e.reason}") from None
        raise GPT2Error(f"download of {url} failed: HTTP {e.code} {e.reason}; {_fail_hint()}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, socket.gaierror):
            raise GPT2Error(f"cannot reach {url}: host name lookup failed (no network?); {_fail_hint()}") from None
        raise _Retry(str(e.reason)) from None
    except (OSError, http.client.HTTPException) as e:
        raise _Retry(f"{type(e).__name__}: {e}") from None

    with response:
        if response.status == 206:
            total = _total_from_content_range(response.headers.get("Content-Range"), offset, url)
        else:  # 200: the server sent the whole file, whatever we asked for
            offset = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None and length.isdigit() else None
        try:
            with progress.transfer(label, total, offset) as advance, \
                    open(part, "r+b" if offset else "wb") as f:
                f.seek(offset)
                f.truncate()
                done = offset
                while chunk := _read(response, done):
                    f.write(chunk)
                    done += len(chunk)
                    advance(len(chunk))
        except OSError as e:  # a full disk or a file-size limit is not transient: stop, keep the part
            raise GPT2Error(f"cannot write {part}: {e.strerror or e} (the part downloaded so far is kept "
                            "and resumes next time)") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Retry(f"body ended at {size} of {total} bytes")


def _read(response, done: int) -> bytes:
    try:
        return response.read(CHUNK)
    except (OSError, http.client.HTTPException) as e:
        raise _Retry(f"connection lost after {done} bytes ({type(e).__name__})") from None


def _total_from_content_range(value: str | None, offset: int, url: str) -> int | None:
    # "bytes 100-999/1000": the resumed body must start where our partial file ends.
    try:
        unit, rest = (value or "").split(" ", 1)
        span, total = rest.split("/")
        start = int(span.split("-")[0])
    except ValueError:
        raise _Retry(f"unusable Content-Range {value!r}") from None
    if unit != "bytes" or start != offset:
        raise _Retry(f"server resumed at {value!r}, expected byte {offset}")
    return None if total == "*" else int(total)


def download_model(model: str, cache_dir: Path, base_url: str = DEFAULT_BASE_URL, *,
                   progress: Progress = SILENT, retries: int = 5, backoff: float = 0.5) -> Path:
    """Make sure `cache_dir/model/` holds the seven checkpoint files; return that folder."""
    model = canonical_model(model)
    folder = cache_dir / model
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / ".lock", "w")
    except OSError as e:
        raise GPT2Error(f"cannot use the download cache {folder}: {e.strerror}") from None
    with lock:
        # One download per cache folder at a time: a second conversion waits, then finds the files.
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress.note(f"waiting for another gpt-convert to finish downloading {model} into {folder} ...")
            fcntl.flock(lock, fcntl.LOCK_EX)
        for name in FILES:
            fetch(f"{base_url.rstrip('/')}/{model}/{name}", folder / name,
                  progress=progress, retries=retries, backoff=backoff)
    return folder
