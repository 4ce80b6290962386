"""Folder locks: one conceptkit process writes a run folder (`--out`, a UI workspace) at a time.

A writer holds `fcntl.flock(LOCK_EX | LOCK_NB)` on FOLDER/.conceptkit.lock, a file that records the owner (pid,
host, start time, command). A second process finds the lock taken and stops in one line naming the folder and the
owner, before it writes anything.

Why flock and not an O_EXCL lock file: the kernel drops a flock when its process ends, however it ends (SIGKILL
included), so a lock left by a killed process is taken over at once by the next run, with no guessing: an O_EXCL
file outlives its process, and judging it stale means trusting a pid (reused by the system, meaningless on another
host) or a timeout (wrong for long runs). The record still names the owner for the refusal message and for people;
a new owner that finds an old record in a file it could lock knows the old owner died (`FolderLock.took_over`).
On NFS, Linux maps flock to POSIX locks (server-side on NFSv4). A file system without locks (some FUSE mounts)
leaves the folder unlocked rather than refusing to run.

The holder deletes the file when it lets go (while still holding the lock); a process that locked the file just
before it was deleted sees the inode change and tries again, so two holders can never hold two different files.
Re-entry in one process is counted: the CLI locks --out and the code it calls may lock it again.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .errors import UserError

LOCK_NAME = ".conceptkit.lock"
_held: dict[str, "FolderLock"] = {}  # resolved folder -> this process's lock on it


@dataclass
class FolderLock:
    folder: Path
    fd: int | None
    created_folder: bool
    took_over: dict | None = None  # the record of a previous owner that died holding the lock
    depth: int = 1


def owner_record() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["conceptkit", *sys.argv[1:]])[:300]}


def describe(record: dict) -> str:
    if not record:
        return "another process"
    return (f"conceptkit process {record.get('pid')} on {record.get('host')}, since {record.get('started')}"
            f" ({record.get('command', '?')})")


def _read_record(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        return json.loads(data) if data.strip() else {}
    except (OSError, ValueError):
        return {}


def _cannot_write(folder: Path, error: OSError) -> UserError:
    return UserError(f"cannot write in {folder}: {error.strerror or error} (a read-only folder or file system?); "
                     "pass a folder you can write to (nothing was changed)")


def acquire(folder: str | os.PathLike) -> FolderLock:
    """Lock `folder` (created if missing) for this process, or raise UserError naming the process that holds it."""
    folder = Path(folder)
    key = str(folder.resolve())
    if key in _held:
        _held[key].depth += 1
        return _held[key]
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _cannot_write(folder, e) from None
    path = folder / LOCK_NAME
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if created:
                _remove_if_empty(folder)
            raise _cannot_write(folder, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            record = _read_record(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"{folder} is being written by {describe(record)}: wait for it to end, or pass "
                                "another folder (nothing was changed)") from None
            lock = FolderLock(folder, None, created)  # no locks on this file system: run unlocked
            _held[key] = lock
            return lock
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the previous holder deleted it between our open and our lock: lock the new one
            os.close(fd)
            continue
        break
    previous = _read_record(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner_record()) + "\n").encode(), 0)
    except OSError as e:
        os.close(fd)
        raise _cannot_write(folder, e) from None
    lock = FolderLock(folder, fd, created, took_over=previous or None)
    _held[key] = lock
    return lock


def release(lock: FolderLock) -> None:
    lock.depth -= 1
    if lock.depth > 0:
        return
    _held.pop(str(lock.folder.resolve()), None)
    if lock.fd is not None:
        with contextlib.suppress(OSError):
            (lock.folder / LOCK_NAME).unlink()
        os.close(lock.fd)  # closing drops the flock
    if lock.created_folder:
        _remove_if_empty(lock.folder)


def _remove_if_empty(folder: Path) -> None:
    """A run that stopped before writing anything leaves no empty folder behind (as before locks existed)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


@contextlib.contextmanager
def locked(*folders: str | os.PathLike | None) -> Iterator[list[FolderLock]]:
    """Hold the locks of `folders` (None entries skipped) for the block."""
    held = []
    try:
        for folder in folders:
            if folder:
                held.append(acquire(folder))
        yield held
    finally:
        for lock in reversed(held):
            release(lock)
