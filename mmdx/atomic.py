"""Atomic output folders: a killed run leaves the old folder or none, never a half-written one."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_dir"]

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` and move it into place on success.

    Files written into the yielded folder appear at ``target`` together, when
    the block ends without an exception. An existing ``target`` is replaced:
    on Linux both folders are swapped in one ``renameat2(RENAME_EXCHANGE)``
    call, so ``target`` always exists and contains either the old or the
    new files. On an exception the temporary folder is deleted and ``target`` is
    left as it was. A kill leaves the old ``target`` (or none, if there was
    none) and a ``.<name>.tmp-<pid>-*`` folder beside it, which the next call
    for the same ``target`` deletes once that process is gone.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _recover_leftovers(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700; outputs get the usual mode
        yield staging
        _fsync_tree(staging)
        if target.exists():
            _replace_existing(staging, target)
        else:
            os.replace(staging, target)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _replace_existing(staging: Path, target: Path) -> None:
    if _exchange(staging, target):
        return  # staging now contains the old files, and the caller deletes it
    # NOTE: without renameat2 (not Linux, or a file system without
    # RENAME_EXCHANGE) a kill between these two renames leaves no target
    # but a .<name>.old-<pid> folder, which the next call moves back.
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; return False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(second))


def _recover_leftovers(target: Path) -> None:
    """Delete temporary folders of dead processes; bring back an old folder a kill left aside."""
    for path in target.parent.glob(f".{glob.escape(target.name)}.old-*"):
        if _pid_alive(path.name.rsplit("-", 1)[-1]):
            continue
        if not target.exists():
            logger.warning("%s: restoring the previous output, which a killed run had moved to %s", target, path)
            os.replace(path, target)
        else:
            shutil.rmtree(path, ignore_errors=True)
    for path in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
        pid = path.name[len(f".{target.name}.tmp-") :].split("-", 1)[0]
        if not _pid_alive(pid):
            logger.info("%s: deleting %s, left by a killed run", target, path.name)
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(text: str) -> bool:
    """Return whether process ``text`` (a PID as written in a folder name) runs on this host.

    NOTE: a run on another host that writes the same target on a shared file
    system looks dead here, so its temporary folder could be deleted.
    """
    try:
        pid = int(text)
    except ValueError:
        return True  # not a name this module wrote: leave it alone
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _umask() -> int:
    # Reading /proc avoids os.umask(), which changes the mask for every thread for a moment.
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
