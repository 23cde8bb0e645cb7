"""Atomic output folders: a killed run leaves the old folder or none, never a half-written one.

Every folder written here carries a marker file, :data:`MARKER`, that lists
the files written. An existing folder is replaced only if it is empty, or if
its marker lists everything in it: a folder with anything else in it (a
user's files, a store, a folder mmdx did not write) is refused instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from mmdx.errors import MmdxError

__all__ = ["MARKER", "atomic_dir", "check_output_dir", "fsync_path"]

MARKER = ".mmdx-output.json"

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextlib.contextmanager
def atomic_dir(
    target: str | Path, protect: Iterable[str | Path] = (), command: str | None = None
) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` and move it into place on success.

    Files written into the yielded folder appear at ``target`` together, when
    the block ends without an exception, with a :data:`MARKER` file that
    lists them, the command and the time. An existing ``target`` is replaced
    only where :func:`check_output_dir` allows it, which is checked both on
    entry and just before the swap. On Linux both folders are swapped in one
    ``renameat2(RENAME_EXCHANGE)`` call, so ``target`` always exists and
    contains either the old or the new files. On an exception the temporary
    folder is deleted and ``target`` is left as it was. A kill leaves the old
    ``target`` (or none, if there was none) and a ``.<name>.tmp-<pid>-*``
    folder beside it, which the next call for the same ``target`` deletes
    once that process is gone.

    Parameters
    ----------
    target
        The output folder.
    protect
        Paths the command reads (a store, a model folder): ``target`` must
        not contain any of them.
    command
        The command recorded in the marker; default: this process's arguments.

    Raises
    ------
    MmdxError
        If ``target`` may not be replaced, or the file system refuses a step.
    """
    target = Path(target)
    protect = list(protect)
    check_output_dir(target, protect)
    staging = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _recover_leftovers(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp creates 0700; outputs get the usual mode
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise _swap_error(target, exc) from exc
    try:
        yield staging
        try:
            _write_marker(staging, command)
            _fsync_tree(staging)
            if target.exists():
                check_output_dir(target, protect)  # Check again, because files may have appeared meanwhile.
                _replace_existing(staging, target)
            else:
                os.replace(staging, target)
            fsync_path(target.parent)
        except OSError as exc:
            raise _swap_error(target, exc) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def check_output_dir(target: str | Path, protect: Iterable[str | Path] = ()) -> None:
    """Raise ``MmdxError`` unless :func:`atomic_dir` may write ``target``.

    Call it before long work, so that a refused folder fails at once. A
    missing or empty folder is fine, and so is one whose :data:`MARKER`
    lists everything in it. Refused: a file, the current folder or one of its
    parents, a folder containing a path of ``protect``, and a folder holding
    anything its marker does not list.
    """
    target = Path(target)
    resolved = target.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise MmdxError(
            f"{target}: output folder is the current folder or one of its parents, which mmdx does not "
            "replace; choose a new folder for the output"
        )
    for path in protect:
        path_resolved = Path(path).resolve()
        if path_resolved == resolved or resolved in path_resolved.parents:
            raise MmdxError(
                f"{target}: output folder contains {path}, which this command reads, and replacing the folder "
                "would delete it; choose a new folder for the output"
            )
    if not os.path.lexists(target):
        return
    if not target.is_dir() or target.is_symlink():
        raise MmdxError(f"{target}: exists and is not a folder; choose a new folder for the output or remove it")
    try:
        foreign = _foreign_entries(target)
    except OSError as exc:
        raise MmdxError(f"{target}: cannot list the output folder ({exc.strerror}); choose a new folder") from exc
    if foreign:
        listing = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise MmdxError(
            f"{target}: not replacing this folder, which contains files mmdx did not write ({listing}); "
            "choose a new folder for the output or remove this one"
        )


def _foreign_entries(target: Path) -> list[str]:
    """List the entries of ``target`` (relative, sorted) that its marker does not list."""
    entries = sorted(path.relative_to(target).as_posix() for path in target.rglob("*"))
    if not entries:
        return []
    try:
        marker = json.loads((target / MARKER).read_text(encoding="utf-8"))
        listed = {MARKER, *(str(name) for name in marker["files"])}
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()  # Without a readable marker, every entry counts as foreign.
    return [entry for entry in entries if entry not in listed]


def _write_marker(folder: Path, command: str | None) -> None:
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*"))
    if command is None:
        command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else ""
    record = {
        "written_by": "mmdx",
        "command": command[:1000],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [name for name in files if name != MARKER],
    }
    (folder / MARKER).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _swap_error(target: Path, exc: OSError) -> MmdxError:
    return MmdxError(
        f"{target}: cannot write the output folder ({exc.strerror or exc}); "
        "choose a new folder for the output, in a writable place"
    )


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
            fsync_path(path)
    fsync_path(folder)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's data (a folder's entries, after a rename) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
