"""Atomic file writes: a file we write is either the old version or the complete new one, never half of it."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give ours the usual permissions
        os.replace(tmp, path)
    finally:
        if tmp.exists():
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
