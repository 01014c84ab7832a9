"""An output folder made whole atomically: built in a hidden sibling, then put in place in one step
(and `atomic_write`, the same for one file).

Shared by the converter (a model folder), `gpt-batch` (its output shards) and `gpt-explain` (its page). An existing folder
is replaced only with `force`, by an atomic exchange, so that at every moment the path holds the
old complete folder or the new one, even if the process is killed; temporaries of killed runs
are removed by the next run.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import GPT2Error


@contextmanager
def writing(path: Path):
    """Name the file in write errors (a full disk, a file-size limit, a read-only place)."""
    try:
        yield
    except OSError as e:
        raise GPT2Error(f"cannot write {path}: {e.strerror or e}") from None


def atomic_write(path: Path, data: bytes) -> None:
    """Write one file whole: `data` goes to a temporary file beside `path`, then is renamed over
    it, so that a reader (or a crash) never sees half of it and an existing file is replaced only
    by a complete one. Errors are one `GPT2Error` naming `path`."""
    folder = path.parent
    if not folder.is_dir():
        raise GPT2Error(f"cannot write {path}: the folder {folder} does not exist")
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would have made it
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_output_dir(out: Path, force: bool) -> None:
    """`out` may be written: absent, an empty folder, or (with `force`) a folder to replace."""
    if out.exists() and not out.is_dir():
        raise GPT2Error(f"{out} exists and is not a folder")
    if out.exists() and not _is_empty_dir(out) and not force:
        raise GPT2Error(f"{out} already exists and is not empty (use --force to replace it)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(out: Path) -> None:
    """Remove the temporary folders that killed conversions into `out` left behind.

    They are named `.NAME.tmp-PID-…`: one whose process is gone is garbage. A live one belongs
    to a conversion still running and is left alone.
    """
    parent = out.parent  # Path("out").parent is Path("."), never empty
    for path in parent.glob(f".{out.name}.tmp-*"):
        pid = path.name[len(f".{out.name}.tmp-"):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_output_dir(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `out`; on success it takes the place of `out` at once.

    On any failure the temporary folder is removed and `out` is as it was. An existing `out` is
    replaced (with `force`) by an atomic exchange, so that `out` is at every moment either the
    old complete folder or the new one, even if the process is killed. A non-empty `out` is
    refused without `force`.
    """
    check_output_dir(out, force)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model folder should not be
    except OSError as e:
        raise GPT2Error(f"cannot create the output folder next to {out}: {e.strerror}") from None
    try:
        yield tmp
        with writing(out):
            _fsync_dir(tmp)
            if not out.exists():
                os.replace(tmp, out)
            elif not _exchange(tmp, out):  # no renameat2: move the old one aside first
                os.replace(out, tmp / ".replaced")
                os.replace(tmp, out)
                shutil.rmtree(out / ".replaced", ignore_errors=True)
            _fsync_dir(parent)
    finally:
        if tmp.exists():  # a failure, or the old folder after the exchange
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
