"""Atomic file writes: a file we write is either the old version or the complete new one, never half of it.
A write that fails (disk full, a file-size limit, a read-only folder) raises WriteFailed, one line naming the file;
the earlier version stays and the temporary file is removed."""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)
# errors that mean "the disk or the folder refused the bytes", as opposed to a bug in what was being written
WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}


class WriteFailed(UserError, OSError):
    """A write refused by the disk or the folder; a UserError (one line in the CLI) that is still an OSError for
    code that catches those."""


def write_failure(error: BaseException) -> str | None:
    """Why a write failed, when the disk or folder refused it (None for other errors). safetensors' Rust writer
    raises its own SafetensorError('... I/O error: File too large (os error 27)')."""
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        return error.strerror or str(error)
    if type(error).__name__ == "SafetensorError" and "I/O error" in str(error):
        return str(error).split("I/O error: ", 1)[1].split(" (os error")[0]
    return None


def refused_write(path: Path, error: BaseException) -> WriteFailed:
    kept = f"{path.name} keeps its earlier version" if path.exists() else f"{path.name} was not written"
    return WriteFailed(f"could not write {path}: {write_failure(error)} (disk full, a size limit or a read-only "
                       f"folder?); {kept}, and what was written before it is intact")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give ours the usual permissions
        os.replace(tmp, path)
    except Exception as e:
        if write_failure(e) is None or isinstance(e, WriteFailed):
            raise
        raise refused_write(path, e) from e
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(tmp_path) and move the result to `path` atomically."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def interrupted_writes(folder: str | os.PathLike) -> list[Path]:
    """The temporary files killed writes leave in `folder` (recursively): ours (`.NAME.XXXX.tmp`, atomic_path) and
    safetensors' own (`.tmpXXXXXX`: its Rust writer goes through a temporary file beside the target too)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = {p for pattern in (".*.tmp", ".tmp*") for p in folder.rglob(pattern) if p.is_file()}
    return sorted(found)


def remove_interrupted_writes(folder: str | os.PathLike) -> int:
    """Delete `interrupted_writes(folder)`; how many. Call it only when nothing else writes there (a run being
    resumed), or it would delete a live writer's file."""
    stale = interrupted_writes(folder)
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)
