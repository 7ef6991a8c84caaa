"""Sampling profiles of running processes with py-spy, summarised as the functions that cost most.

py-spy attaches from outside (ptrace), so the API and the worker run unchanged; it
needs root or `ptrace_scope` 0. `--subprocesses` follows gunicorn's and Celery's
forked children, and `--idle` is off, so samples are time on a CPU (or holding the GIL).
"""

from __future__ import annotations

import collections
import contextlib
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from bench.harness import log


@contextlib.contextmanager
def py_spy(pids: dict[str, int], out_dir: Path, label: str, rate: int = 250) -> Iterator[None]:
    """Record each named process (and its children) while the block runs.

    Writes `<out_dir>/<label>-<name>.txt` in py-spy's collapsed-stack format
    (one line per stack: frames separated by ";", then the sample count).
    """
    beside_python = Path(sys.executable).parent / "py-spy"
    binary = str(beside_python) if beside_python.exists() else shutil.which("py-spy")
    if binary is None:
        raise RuntimeError("py-spy is not installed (pip install py-spy)")
    out_dir.mkdir(parents=True, exist_ok=True)
    recorders = []
    for name, pid in pids.items():
        output = out_dir / f"{label}-{name}.txt"
        command = [binary, "record", "--pid", str(pid), "--subprocesses", "--rate", str(rate)]
        command += ["--format", "raw", "--output", str(output), "--nonblocking", "--gil"]
        recorders.append(
            subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    try:
        yield
    finally:
        for recorder in recorders:
            recorder.send_signal(signal.SIGINT)
        for recorder in recorders:
            try:
                recorder.wait(timeout=60)
            except subprocess.TimeoutExpired:
                recorder.kill()
        log(f"profiles written to {out_dir}/{label}-*.txt")


def _frame(raw: str) -> str:
    # py-spy names a frame "function (path/to/file.py:line)"; keep function and file.
    name, _, where = raw.partition(" (")
    path = where.rsplit(":", 1)[0]
    for marker in ("site-packages/", "/main/", "/work/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{name} ({path})"


def summarise(collapsed: Path, limit: int = 25) -> dict[str, list[tuple[str, float]]]:
    """Return the functions with the largest inclusive and self shares of the samples."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # The first frame is the process ("process 123:..."), then the thread.
        frames = [_frame(frame) for frame in stack.split(";")[1:] if " (" in frame]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if total == 0:
        return {"inclusive": [], "self": []}

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(limit)]

    return {"inclusive": share(inclusive), "self": share(own), "samples": [("total", total)]}
