"""What every benchmark result records about where it ran: the host and the commit measured."""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    """A progress line on stderr: stdout carries the summary, or the one JSON object of --json."""
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def host_info(directory: Path) -> dict:
    """CPU, memory, kernel, Python and torch versions, and the file system holding `directory`."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    fs = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", str(directory)], capture_output=True, text=True,
                        check=False).stdout.split()
    return {"hostname": platform.node(), "cpu_count": os.cpu_count(), "cpu_model": cpu, "mem_total": mem,
            "kernel": platform.release(), "python": platform.python_version(), "torch": torch.__version__,
            "fs_type": fs[0] if fs else "", "fs_source": fs[1] if len(fs) > 1 else ""}


def git_info() -> dict:
    """The commit measured, and whether the working tree differed from it (product code moves fast)."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)
        return run.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """matplotlib's subplots, drawn off screen: a benchmark host has no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def run_and_save(directory: Path, prefix: str, measure: Callable[[Path], dict], stem: Callable[[dict], str],
                 plot: Callable[[dict], Any]) -> dict:
    """Measure in a fresh temp dir under `directory` (removed after), then write results/<stem>.json and the figure
    plot(result) draws as results/<stem>.png."""
    directory.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=directory))
    try:
        result = measure(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = stem(result)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib.pyplot as plt

    fig = plot(result)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)
    plt.close(fig)
    log(f"wrote {RESULTS / name}.json and .png")
    return result


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class Clock:
    """A generate() streamer noting when tokens come out: the prompt when generation starts, then each new one."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: object) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass
