"""Atomic output folders: complete or absent, also when the writing process is killed."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from mmdx import atomic
from mmdx.atomic import MARKER, atomic_dir, check_output_dir
from mmdx.errors import MmdxError


def write_files(folder, text, n=3):
    for i in range(n):
        (folder / f"part-{i}.txt").write_text(text)


def contents(folder):
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.name != MARKER}


def test_files_appear_together(tmp_path):
    target = tmp_path / "run"
    with atomic_dir(target) as staging:
        write_files(staging, "new")
        (staging / "sub").mkdir()
        (staging / "sub" / "x.json").write_text("{}")
        assert not target.exists()
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "part-0.txt", "part-1.txt", "part-2.txt", "sub"]
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
    (aside / MARKER).write_text('{"files": ["part-0.txt"]}')
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


def test_marker_lists_written_files(tmp_path):
    target = tmp_path / "run"
    with atomic_dir(target, command="mmdx train-head --out run") as staging:
        write_files(staging, "x", n=2)
        (staging / "sub").mkdir()
        (staging / "sub" / "y.json").write_text("{}")
    marker = json.loads((target / MARKER).read_text())
    assert marker["files"] == ["part-0.txt", "part-1.txt", "sub", "sub/y.json"]
    assert marker["command"] == "mmdx train-head --out run"
    assert marker["time"].endswith("Z")


@pytest.mark.parametrize("where", ["top", "nested"])
def test_foreign_files_refuse_replacement(tmp_path, where):
    target = tmp_path / "keep"
    with atomic_dir(target) as staging:
        write_files(staging, "old", n=1)
        (staging / "sub").mkdir()
    foreign = target / "mydata.txt" if where == "top" else target / "sub" / "mydata.txt"
    foreign.write_text("precious")
    with pytest.raises(MmdxError, match=r"keep: .*\(.*mydata.txt\); choose a new folder") as caught:
        with atomic_dir(target) as staging:
            write_files(staging, "new", n=1)
    assert "\n" not in str(caught.value)
    assert foreign.read_text() == "precious"
    assert (target / "part-0.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]


def test_folder_without_marker_is_refused_before_the_block(tmp_path):
    target = tmp_path / "keep"
    target.mkdir()
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        (target / name).write_text(name)
    ran = []
    with pytest.raises(MmdxError, match=r"\(a.txt, b.txt, c.txt and 1 more\)"):
        with atomic_dir(target):
            ran.append(True)
    assert not ran
    assert len(list(target.iterdir())) == 4


def test_file_added_during_the_block_is_kept(tmp_path):
    target = tmp_path / "run"
    with atomic_dir(target) as staging:
        write_files(staging, "old", n=1)
    with pytest.raises(MmdxError, match="late.txt"):
        with atomic_dir(target) as staging:
            (target / "late.txt").write_text("user file")
            write_files(staging, "new", n=1)
    assert (target / "late.txt").read_text() == "user file"


def test_empty_folder_is_replaced(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    with atomic_dir(target) as staging:
        write_files(staging, "new", n=1)
    assert contents(target) == {"part-0.txt": "new"}


def test_protected_path_inside_target_is_refused(tmp_path):
    store = tmp_path / "r2" / "m.h5"
    store.parent.mkdir()
    store.write_bytes(b"store")
    for target in (tmp_path / "r2", tmp_path):
        with pytest.raises(MmdxError, match=r"contains .*m.h5, which this command reads"):
            check_output_dir(target, protect=[store])
    check_output_dir(tmp_path / "other", protect=[store])
    assert store.read_bytes() == b"store"


@pytest.mark.parametrize("relative", [".", ".."])
def test_current_folder_and_parents_are_refused(tmp_path, monkeypatch, relative):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(MmdxError, match="current folder"):
        with atomic_dir(relative) as staging:
            write_files(staging, "new", n=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_target_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "run").write_text("a file")
    with pytest.raises(MmdxError, match="not a folder"):
        with atomic_dir(tmp_path / "run"):
            pass


def test_os_error_of_the_swap_is_one_line(tmp_path, monkeypatch):
    target = tmp_path / "run"
    with atomic_dir(target) as staging:
        write_files(staging, "old", n=1)

    def busy(first, second):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(second))

    monkeypatch.setattr(atomic, "_exchange", busy)
    with pytest.raises(MmdxError, match=r"run: cannot write the output folder \(Device or resource busy\)"):
        with atomic_dir(target) as staging:
            write_files(staging, "new", n=1)
    assert contents(target) == {"part-0.txt": "old"}
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
