"""Helpers shared by the benchmark scripts: machine description, child runs and the results page.

Every script measures in child processes, so one pipeline's threads, caches
and imports do not slow or speed up another, and records its section of
``docs/benchmarks.md`` with the command, the machine and the date.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS_PAGE = REPO / "docs" / "benchmarks.md"
SHARED = Path(os.environ.get("MMDX_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
MOBILENET_WEIGHTS = SHARED / "models" / "mobilenet_v2_1.00_no_top.weights.h5"
PAGE_INTRO = """# Benchmarks

Measured with the scripts in `benchmarks/`. Each section names the command
that produced it, the machine and the date, and each script rewrites its own
section when run with `--record`. Ratios compare runs made in the same
invocation on the same machine, interleaved where there are repeats, because
absolute times drift on a shared machine.
"""


@dataclass
class ChildRun:
    """Wall time, CPU time and peak memory of one child process, and the JSON it printed last."""

    wall: float
    cpu: float  # user + system seconds of the child
    peak_rss_mb: float
    result: dict


def machine() -> str:
    """Describe the machine: cores, RAM, CPU model and load."""
    cpu_model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} cores ({cpu_model}), {ram_gb:.0f} GB RAM, no GPU, {platform.system()}; load average {load:.1f} at the start"


def load_average() -> float:
    return os.getloadavg()[0]


def today() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def command_line() -> str:
    """Return the command that started this script, relative to the repository."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(REPO)
    except ValueError:
        pass
    return shlex.join(["python", str(script), *sys.argv[1:]])


def run_child(argv: list[str], *, env: dict | None = None, cwd: Path | None = None, timeout: float | None = None) -> ChildRun:
    """Run ``argv`` and return its wall time, CPU time, peak RSS and the last JSON line of its output.

    The resource figures come from ``os.wait4`` of that child alone, not from
    the cumulative ``RUSAGE_CHILDREN`` of this process.
    """
    import tempfile

    child_env = dict(os.environ)
    child_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if env:
        child_env.update(env)
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        started = time.perf_counter()
        process = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=child_env, cwd=cwd, text=True)
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                break
            if timeout is not None and time.perf_counter() - started > timeout:
                process.kill()
                _, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        stderr.seek(0)
        output, errors = stdout.read(), stderr.read()

    if timeout is not None and wall > timeout:
        raise RuntimeError(f"{shlex.join(argv)} timed out after {timeout} s:\n{errors[-3000:]}")
    if process.returncode != 0:
        raise RuntimeError(f"{shlex.join(argv)} exited with {process.returncode}:\n{errors[-3000:]}")
    result = {}
    for line in reversed(output.splitlines()):
        if line.startswith("{"):
            result = json.loads(line)
            break
    return ChildRun(wall=wall, cpu=usage.ru_utime + usage.ru_stime, peak_rss_mb=usage.ru_maxrss / 1024, result=result)


def child_report(result: dict) -> None:
    """Print ``result`` as the last output line of a child process, where :func:`run_child` reads it."""
    print(json.dumps(result), flush=True)


def record_section(title: str, body: str, page: Path = RESULTS_PAGE) -> None:
    """Replace the ``## title`` section of the results page with ``body``, or append it."""
    page.parent.mkdir(parents=True, exist_ok=True)
    text = page.read_text(encoding="utf-8") if page.is_file() else PAGE_INTRO
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda match: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    page.write_text(text.rstrip("\n") + "\n", encoding="utf-8")


def header_lines() -> str:
    """Return the command, machine and date lines that open every section."""
    return f"Command: `{command_line()}`\n\nMachine: {machine()}\n\nDate: {today()}\n"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
