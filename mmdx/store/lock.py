"""One writer per store: an advisory ``flock`` on ``<store>.lock``.

The kernel releases a ``flock`` when its process dies, however it dies, so a
lock file left by a killed writer is stale by construction: the next writer
acquires the lock and overwrites the holder record. The record (PID, host,
start time, command) only serves the error message of a second writer.

A writer that leaves no store behind (a failed first command) deletes the
lock file on release. So :meth:`WriterLock.acquire` checks after locking that
the path still names the locked file, and locks again if it was deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from mmdx.errors import StoreError, StoreLockedError

__all__ = ["WriterLock", "lock_path"]


def lock_path(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".lock")


class WriterLock:
    """Exclusive writer lock of one store.

    Parameters
    ----------
    store_path
        The store's main file path.
    wait
        Seconds to wait for another writer to finish; 0 raises at once,
        ``None`` waits without limit.
    """

    def __init__(self, store_path: Path, wait: float | None = 0.0):
        self.store_path = Path(store_path)
        self.path = lock_path(self.store_path)
        self.wait = wait
        self._fd: int | None = None

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(
                f"{self.store_path}: cannot open or create the lock file {self.path.name} ({exc.strerror}); "
                "the store's folder must be writable, so choose a writable --store path"
            ) from exc

    def acquire(self) -> "WriterLock":
        fd = self._open()
        deadline = None if self.wait is None else time.monotonic() + self.wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    holder = _describe_holder(fd)
                    os.close(fd)
                    if self.wait:
                        message = (
                            f"still locked after waiting {self.wait:g} s by another writer ({holder}); "
                            "try again later or pass a longer --wait"
                        )
                    else:
                        message = (
                            f"another process is writing this store ({holder}); "
                            "wait for it to finish, or pass --wait SECONDS"
                        )
                    raise StoreLockedError(f"{self.store_path}: {message}") from None
                time.sleep(0.2)
                continue
            if _same_file(fd, self.path):
                break
            # The previous holder deleted the lock file after we opened it: lock the current one.
            os.close(fd)
            fd = self._open()
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(sys.argv)[:300],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)
        if not self.store_path.exists() and not _journal_path(self.store_path).exists():
            # Nothing was created, so an empty lock file would be the only trace of a failed first
            # command. Deleting it while still locked is safe because acquire() locks again when
            # the path no longer names the file it locked.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "WriterLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def _journal_path(store_path: Path) -> Path:
    # The same name as mmdx.store.format.journal_dir, which this module does not import (it needs h5py).
    return store_path.with_name(store_path.name + ".journal")


def _same_file(fd: int, path: Path) -> bool:
    """Return whether ``path`` still names the open file ``fd``."""
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


def _describe_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        record = {}
    if not record:
        return "holder unknown"
    return f"process {record.get('pid')} on {record.get('host')}, started {record.get('started')}, `{record.get('command')}`"
