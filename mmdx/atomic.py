"""Atomic output folders: a killed run leaves the old folder or none, never a half-written one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_dir"]


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``target`` and move it into place on success.

    Files written into the yielded folder appear at ``target`` together, when
    the block ends without an exception. An existing ``target`` is replaced:
    it is first renamed aside, then deleted once the new folder is in place.
    On an exception the temporary folder is deleted and ``target`` is left as
    it was. A kill leaves at most a ``.<name>.tmp-*`` folder beside it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
        for path in staging.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
