"""hcached save / cold restore / warm restore throughput against fio and memcpy, on one file system."""

from __future__ import annotations

import argparse
import datetime
import json
import math
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from report import git_info, host_info, log, run_and_save, subplots

from hcache.client import HCacheClient
from hcache.daemon.process import DaemonProcess
from hcache.daemon.slabs import probe_direct
from hcache.layout.chunks import CHUNK_TOKENS
from hcache.layout.geometry import Geometry
from hcache.layout.units import format_size, parse_size

GEOMETRY = Geometry(num_layers=32, hidden_size=4096, num_kv_heads=32, head_dim=128, dtype="float16")  # Llama-2-7B
LAYERS = list(range(GEOMETRY.num_layers))
TOKEN_BYTES = GEOMETRY.num_layers * GEOMETRY.hidden_size * GEOMETRY.itemsize  # hidden states of one token, all layers
ROUND_TOKENS = 2048
SLAB_SIZE = 1 << 30
FIO_ENGINES = ("io_uring", "libaio", "psync")
BLOCK = 1 << 20
GB = 1e9
GOALS = {"save_vs_disk": 0.9, "cold_restore_vs_disk": 0.9, "warm_restore_vs_memcpy": 0.5}
CTX = "bench"



def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="a directory on the file system to measure; a fresh temp dir is made in it and removed")
    p.add_argument("--size", type=parse_size, default=2 << 30, help="bytes of hidden states to save (default 2GiB)")
    p.add_argument("--engine", choices=["auto", "io_uring", "threads"], default="auto", help="hcached IO engine")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of each measurement; the median is reported")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = p.parse_args()
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


# -- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """The context to save: every layer's hidden states, appended in rounds of ROUND_TOKENS tokens."""

    flat: torch.Tensor  # all payload bytes; each round is a contiguous piece of it
    ids: torch.Tensor
    rounds: list[tuple[int, int, torch.Tensor]]  # (first token, end token, [layers, tokens, hidden] float16)

    @property
    def n_tokens(self) -> int:
        return self.ids.numel()

    @property
    def nbytes(self) -> int:
        return self.flat.numel()


def make_workload(size: int) -> Workload:
    n_tokens = size // TOKEN_BYTES // CHUNK_TOKENS * CHUNK_TOKENS
    if n_tokens == 0:
        raise SystemExit(f"--size must be at least {format_size(TOKEN_BYTES * CHUNK_TOKENS)}")
    gen = torch.Generator().manual_seed(0)
    flat = torch.empty(n_tokens * TOKEN_BYTES, dtype=torch.uint8)
    flat.view(torch.int16).random_(generator=gen)  # random bits: the bytes matter, not their values
    ids = torch.randint(0, 32_000, (n_tokens,), generator=gen)
    rounds = []
    for t0 in range(0, n_tokens, ROUND_TOKENS):
        t1 = min(n_tokens, t0 + ROUND_TOKENS)
        piece = flat[t0 * TOKEN_BYTES : t1 * TOKEN_BYTES].view(torch.float16)
        rounds.append((t0, t1, piece.view(GEOMETRY.num_layers, t1 - t0, GEOMETRY.hidden_size)))
    return Workload(flat, ids, rounds)


def verify(out: torch.Tensor, work: Workload) -> None:
    for t0, t1, data in work.rounds:
        if not torch.equal(out[:, t0:t1].view(torch.int16), data.view(torch.int16)):
            raise SystemExit(f"restored tokens [{t0}, {t1}) differ from what was saved")


# -- hcache ---------------------------------------------------------------------------------------
def save(client: HCacheClient, work: Workload) -> float:
    """Seconds from the first append to the return of flush()."""
    client.open(CTX, model="bench-llama-2-7b", geometry=GEOMETRY, layers={"hidden": LAYERS})
    t = time.perf_counter()
    for t0, t1, data in work.rounds:
        client.append(CTX, work.ids[t0:t1], {"hidden": data})
    client.flush(CTX)
    return time.perf_counter() - t


def restore(client: HCacheClient, out: torch.Tensor) -> float:
    t = time.perf_counter()
    client.restore(CTX, "hidden", out=out)
    return time.perf_counter() - t


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def memcpy(dst: torch.Tensor, src: torch.Tensor) -> float:
    """Best of 3 seconds for dst.copy_(src), after one untimed copy."""
    dst.copy_(src)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return best


# -- disk baseline --------------------------------------------------------------------------------
def ensure_fio() -> bool:
    if shutil.which("fio") is None and os.geteuid() == 0 and shutil.which("apt-get"):
        log("fio is missing: installing it with apt-get")
        subprocess.run(["sh", "-c", "apt-get install -y fio || (apt-get update && apt-get install -y fio)"],
                       stdout=sys.stderr, stderr=sys.stderr, check=False)
    return shutil.which("fio") is not None


@dataclass(frozen=True)
class Disk:
    """Sequential 1 MiB transfers over one file: fio (iodepth 32) or, without fio, 8 Python O_DIRECT threads."""

    path: Path
    size: int
    direct: bool
    fio_engine: str | None  # None: the Python fallback

    @property
    def tool(self) -> str:
        return f"fio/{self.fio_engine}" if self.fio_engine else "python-pwritev-preadv-8-threads"

    def write(self) -> float:
        return self._run(True)

    def read(self) -> float:
        return self._run(False)

    def _run(self, write: bool) -> float:
        if self.fio_engine is None:
            return python_disk(self.path, self.size, write, self.direct)
        gbps = fio(self.path, self.size, write, self.direct, self.fio_engine)
        if gbps is None:
            raise SystemExit(f"fio with ioengine {self.fio_engine} failed")
        return gbps


def fio(path: Path, size: int, write: bool, direct: bool, engine: str) -> float | None:
    """GB/s of one fio job, or None when it failed."""
    rw = "write" if write else "read"
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={BLOCK}", "--iodepth=32",
           f"--ioengine={engine}", f"--direct={int(direct)}", f"--size={size}", "--output-format=json"]
    if write:
        cmd.append("--end_fsync=1")
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        log(f"fio ({engine}, {rw}) failed: {r.stderr.strip()[-300:]}")
        return None
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    return None if job["error"] else job[rw]["bw_bytes"] / GB


def python_disk(path: Path, size: int, write: bool, direct: bool, threads: int = 8) -> float:
    """GB/s of sequential 1 MiB pwritev/preadv over `threads` threads (O_DIRECT where the fs takes it)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_DIRECT if direct else 0), 0o600)
    bufs = [mmap.mmap(-1, BLOCK) for _ in range(threads)]  # page aligned, as O_DIRECT needs
    io = os.pwritev if write else os.preadv

    def worker(k: int) -> None:
        for off in range(k * BLOCK, size // BLOCK * BLOCK, threads * BLOCK):
            if io(fd, [bufs[k]], off) != BLOCK:
                raise OSError(f"short {'write' if write else 'read'} at {off}")

    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(worker, range(threads)))
        if write:
            os.fsync(fd)
        return size // BLOCK * BLOCK / (time.perf_counter() - t) / GB
    finally:
        os.close(fd)


def open_disk(path: Path, size: int, direct: bool) -> Disk:
    """The first fio ioengine that works (its untimed write also lays the file out), else the Python baseline."""
    if ensure_fio():
        for engine in FIO_ENGINES:
            if fio(path, size, True, direct, engine) is not None:
                return Disk(path, size, direct, engine)
    log("fio unavailable: using the Python pwritev/preadv baseline")
    disk = Disk(path, size, direct, None)
    disk.write()
    return disk


# -- report ---------------------------------------------------------------------------------------
def plot(result: dict) -> Any:
    groups = [("save (to durable)", "save_gbps", "disk_write_gbps", "disk write", "save_vs_disk"),
              ("cold restore", "cold_restore_gbps", "disk_read_gbps", "disk read", "cold_restore_vs_disk"),
              ("warm restore", "warm_restore_gbps", "memcpy_gbps", "memcpy", "warm_restore_vs_memcpy")]
    fig, ax = subplots(figsize=(8, 4.8))
    width = 0.38
    ymax = max(result[k] for g in groups for k in g[1:3]) * 1.35
    for i, (_, ours, base, base_label, ratio) in enumerate(groups):
        for dx, key, color, name in ((-1, ours, "tab:blue", "hcache"), (1, base, "tab:gray", base_label)):
            bar = ax.bar(i + dx * width / 2, result[key], width, color=color)
            ax.bar_label(bar, labels=[f"{name}\n{result[key]:.2f}"], fontsize=8)
        top = max(result[ours], result[base])
        ax.text(i, top + 0.1 * ymax, f"ratio {result[ratio]:.2f}\n(goal ≥ {GOALS[ratio]})", ha="center",
                va="bottom", fontsize=9, fontweight="bold",
                color="tab:green" if result[ratio] >= GOALS[ratio] else "tab:red")
    ax.set_xticks(range(len(groups)), [g[0] for g in groups])
    ax.set_ylabel("GB/s (median)")
    ax.set_ylim(0, ymax)
    h = result["host"]
    ax.set_title(f"hcache vs baseline: {format_size(result['payload_bytes'])}, engine {result['engine']}, "
                 f"disk baseline {result['disk_tool']}\n{h['cpu_count']} CPUs, {h['fs_type']} on {h['fs_source']}, "
                 f"kernel {h['kernel']}", fontsize=9)
    return fig


def summary(result: dict) -> str:
    lines = [f"hcache io bench: {format_size(result['payload_bytes'])}, engine {result['engine']}, "
             f"disk baseline {result['disk_tool']}, median of {result['repeat']}"]
    for key in ("save_gbps", "disk_write_gbps", "cold_restore_gbps", "disk_read_gbps", "warm_restore_gbps",
                "memcpy_gbps"):
        lines.append(f"  {key:20s} {result[key]:7.3f} GB/s")
    for key, goal in GOALS.items():
        lines.append(f"  {key:24s} {result[key]:6.3f}  (goal ≥ {goal}: {'met' if result[key] >= goal else 'MISSED'})")
    return "\n".join(lines)


def paired_ratios(gbps: dict) -> dict:
    return {"save_vs_disk": gbps["save_gbps"] / gbps["disk_write_gbps"],
            "cold_restore_vs_disk": gbps["cold_restore_gbps"] / gbps["disk_read_gbps"],
            "warm_restore_vs_memcpy": gbps["warm_restore_gbps"] / gbps["memcpy_gbps"]}


# -- the run --------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, root: Path) -> dict:
    log(f"generating {format_size(args.size)} of hidden states")
    work = make_workload(args.size)
    out = torch.zeros(GEOMETRY.num_layers, work.n_tokens, GEOMETRY.hidden_size, dtype=torch.float16)
    direct = probe_direct(root)
    disk = open_disk(root / "fio.dat", work.nbytes, direct)
    dram = math.ceil(work.nbytes * 1.5 / (1 << 30)) << 30  # the whole context plus headroom
    daemon = DaemonProcess(root / "hcached", engine=args.engine, dram=str(dram), slab_size=str(SLAB_SIZE))
    runs = []
    try:
        daemon.start()
        with HCacheClient(daemon.socket) as c:
            status = c.status()
            log(f"hcached up: engine {status['engine']}; untimed warm-up save (creates the slab files)")
            warmup_s = save(c, work)
            c.delete(CTX)
        for i in range(args.repeat):  # each baseline runs right next to its hcache counterpart: the disk drifts
            run: dict = {"disk_write_gbps": disk.write()}
            with HCacheClient(daemon.socket) as c:
                run["save_gbps"] = work.nbytes / save(c, work) / GB
            daemon.stop()
            run["drop_caches"] = drop_caches()
            run["disk_read_gbps"] = disk.read()
            drop_caches()
            daemon.start()
            with HCacheClient(daemon.socket) as c:
                run["cold_restore_gbps"] = work.nbytes / restore(c, out) / GB
                run["disk_reads"] = c.status()["disk_reads"]
                verify(out, work)
                out.zero_()
                run["warm_restore_gbps"] = work.nbytes / restore(c, out) / GB
                verify(out, work)
                run["memcpy_gbps"] = work.nbytes / memcpy(out.view(-1).view(torch.uint8), work.flat) / GB
                status = c.status()
                c.delete(CTX)
            run.update(paired_ratios(run))
            log(f"run {i + 1}/{args.repeat}: " + ", ".join(f"{k} {v:.3f}" for k, v in run.items()
                                                           if k.endswith("gbps")))
            runs.append(run)
        daemon.stop()  # a clean stop also removes the arena file from /dev/shm
    finally:
        daemon.cleanup()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k.endswith("_gbps")}
    ratios = paired_ratios(med)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": host_info(root),
        "git": git_info(),
        "dir": str(root.parent),
        "size_bytes": args.size,
        "payload_bytes": work.nbytes,
        "payload": "hidden states only (token ids, chunk headers and 4 KiB padding are not counted)",
        "geometry": GEOMETRY.to_dict(),
        "layers": len(LAYERS),
        "tokens": work.n_tokens,
        "round_tokens": ROUND_TOKENS,
        "engine_requested": args.engine,
        "engine": status["engine"],
        "data_dir_direct_io": status["data_dirs"][0]["direct_io"],
        "dram": dram,
        "slab_size": SLAB_SIZE,
        "warmup": {"save_s": warmup_s, "note": "one untimed save + delete of the same size ran first, so the slab "
                                               "files exist (fallocate'd and written once) and their slots are reused"},
        "repeat": args.repeat,
        "fio": disk.fio_engine is not None,
        "fio_ioengine": disk.fio_engine,
        "disk_tool": disk.tool,
        "disk_direct_io": direct,
        "caches_dropped": all(r["drop_caches"] for r in runs),
        "memcpy": "torch dst.copy_(src) of the same size, best of 3 after one untimed copy",
        **med,
        **ratios,
        "ratios": "median hcache GB/s over median baseline GB/s; each run's own ratios are in runs",
        "goals": GOALS,
        "runs": runs,
    }


def main() -> None:
    args = parse_args()
    result = run_and_save(args.dir, "hcache-io-", lambda root: measure(args, root), lambda r: f"io-{args.engine}",
                          plot)
    print(json.dumps(result) if args.json else summary(result))


if __name__ == "__main__":
    main()
