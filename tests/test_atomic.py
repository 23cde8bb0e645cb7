"""Atomic output folders: complete or absent, also when the writing process is killed."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys

import pytest

from mmdx import atomic
from mmdx.atomic import atomic_dir


def write_files(folder, text, n=3):
    for i in range(n):
        (folder / f"part-{i}.txt").write_text(text)


def contents(folder):
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_files_appear_together(tmp_path):
    target = tmp_path / "run"
    with atomic_dir(target) as staging:
        write_files(staging, "new")
        (staging / "sub").mkdir()
        (staging / "sub" / "x.json").write_text("{}")
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == ["part-0.txt", "part-1.txt", "part-2.txt", "sub"]
    assert (target / "part-2.txt").read_text() == "new"
    assert (target / "sub" / "x.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_exception_keeps_old_folder(tmp_path):
    target = tmp_path / "run"
    with atomic_dir(target) as staging:
        write_files(staging, "old")
    with pytest.raises(RuntimeError), atomic_dir(target) as staging:
        write_files(staging, "new")
        raise RuntimeError("training failed")
    assert set(contents(target).values()) == {"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


@pytest.mark.parametrize("exchange", [True, False])
def test_replaces_existing_folder(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda first, second: False)
    target = tmp_path / "run"
    with atomic_dir(target) as staging:
        write_files(staging, "old", n=4)
    with atomic_dir(target) as staging:
        write_files(staging, "new", n=2)
    assert contents(target) == {"part-0.txt": "new", "part-1.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_folder_mode_follows_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "run") as staging:
            write_files(staging, "x", n=1)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755


def test_old_folder_restored_after_kill_between_renames(tmp_path):
    # What the two-rename fallback leaves when killed between its renames.
    target = tmp_path / "run"
    aside = tmp_path / ".run.old-999999999"
    aside.mkdir()
    (aside / "part-0.txt").write_text("old")
    with atomic_dir(target) as staging:
        assert contents(target) == {"part-0.txt": "old"}
        write_files(staging, "new", n=1)
    assert contents(target) == {"part-0.txt": "new"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


WRITER = """
import sys, time
from pathlib import Path
from mmdx.atomic import atomic_dir
with atomic_dir(sys.argv[1]) as staging:
    for i in range(50):
        (Path(staging) / f"part-{i}.txt").write_text(sys.argv[2])
        if i == 2:
            print("writing", flush=True)
        time.sleep(0.1)
"""


@pytest.mark.parametrize("existing", [True, False])
def test_kill_during_write(tmp_path, existing):
    target = tmp_path / "run"
    if existing:
        with atomic_dir(target) as staging:
            write_files(staging, "old")
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(target), "new"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "writing", process.stderr.read()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)

    if existing:
        assert set(contents(target).values()) == {"old"}
        assert len(contents(target)) == 3
    else:
        assert not target.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "run"]
    assert len(leftovers) == 1
    assert leftovers[0].startswith(f".run.tmp-{process.pid}-")

    with atomic_dir(target) as staging:
        write_files(staging, "next", n=1)
    assert contents(target) == {"part-0.txt": "next"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
