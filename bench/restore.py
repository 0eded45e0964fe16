"""Restore throughput of RE, KV, H and auto through the real hcached, with the planner's and capture's key ratios."""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import itertools
import json
import math
import os
import re
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers
from report import git_info, host_info, log, run_and_save, subplots
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.initialization import no_init_weights

from hcache.client import HCacheClient
from hcache.client.costs import Profile, profile_for, save_profile
from hcache.client.planner import plan, simulate
from hcache.client.profiler import profile
from hcache.client.projection import Projector, geometry_of, recompute_prefix, rope_tables
from hcache.client.restorer import choose_methods
from hcache.daemon.process import DaemonProcess
from hcache.layout.geometry import Geometry, Rep
from hcache.layout.units import format_size
from hcache.transformers import CaptureStats, capture, restore

GEOMETRIES = {  # Llama layers at full width; only --layers of them
    "llama-2-7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
                   "num_key_value_heads": 32, "vocab_size": 32000},
    "llama-3-8b-gqa": {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                       "num_key_value_heads": 8, "vocab_size": 32000, "rope_theta": 500000.0},
}
MAIN = "llama-2-7b"
TOKENS = (512, 1024, 2048)
T_RATIOS = 2048  # projection_vs_recompute and auto_vs_best_single are measured at this many tokens
METHODS = {"RE": "recompute", "H": "hidden", "KV": "kv", "auto": "auto"}
SINGLE = ("RE", "H", "KV")
# Read throttles for auto_vs_best_single, as multiples of the balance point: the read rate at which the two fastest
# single-method restores take as long (predicted at T_RATIOS from this host's compute costs), where a mix gains most.
LEVELS = {"fast": 2.0, "balanced": 1.0, "slow": 1 / 3}
DEFAULT_LAYERS = {"cpu": 3, "cuda": 32}
DRAM = {"cpu": "512MiB", "cuda": "1GiB"}  # hcached pre-faults its arena at start: a smaller one restarts faster
PROFILE_T = {"cpu": ((128, 256, 512), 1), "cuda": ((512, 1024, 2048), 3)}  # profiler token counts, repeats
COLD_BUDGET_S = 1.0  # repeat a restore (up to --repeat times) only while its samples took less than this in all
PROJECTION_RUNS = 2  # alternating runs of projection and recompute for projection_vs_recompute
# Cold samples per method and throttle, taken in turn so that load and disk speed that drift hit every method
# alike, each round starting with the next method (the second restore after a restart ran slower here): one round
# of every method; then rounds of those within FAR times the fastest, up to LEVEL_ROUNDS; then more (up to
# MAX_LEVEL_ROUNDS) of those within CONTENDER times the fastest while their samples took under LEVEL_BUDGET_S and
# the level, restarts included, under LEVEL_WALL_S (a lent GPU machine gives the whole run under ten minutes; a
# daemon restart there takes longer than a restore). Uncapped, auto and all-KV restores (the same plan) spread
# +-15% each here: nine rounds left their ratio anywhere from 0.88 to 1.16. Capped at 25 MB/s, where auto plans
# all-H, both took 2.41 s but for one sample in four at 2.7 s: with 8 s of samples a level got three rounds, and
# two slow ones made auto 0.89 of all-H on the same plan.
FAR = 3.0
LEVEL_ROUNDS = 3
MAX_LEVEL_ROUNDS = 21
LEVEL_BUDGET_S = 40.0
LEVEL_WALL_S = {"cpu": 120.0, "cuda": 25.0}
CONTENDER = 1.5
PROMPT_TOKENS = 16
IN_PROCESS = ("hcache-capture", "hcache-client")  # capture's threads beside the model's, under its GIL
TBT_STORES = ("plan", "both")  # capture_tbt_overhead is the first's: capture as deployed
GOALS = {"projection_vs_recompute": 6.0, "auto_vs_best_single": 0.95, "auto_vs_best_single_balanced": 1.0,
         "capture_tbt_overhead": 0.02}



def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", type=Path, default=Path("/var/tmp"),
                   help="where hcached keeps its data and state (a fresh temp dir in it, removed at the end)")
    p.add_argument("--layers", type=int, help="decoder layers per model (default: 3 on CPU, 32 on CUDA)")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="model dtype")
    p.add_argument("--repeat", type=int, default=3, help="most samples of one restore; the median is reported")
    p.add_argument("--tbt-tokens", type=int, default=200,
                   help="decode steps, with capture and without, measured per batch size for capture's overhead")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    args = p.parse_args()
    if args.repeat < 1 or args.tbt_tokens < 2 or (args.layers is not None and args.layers < 1):
        p.error("--repeat and --layers must be at least 1, --tbt-tokens at least 2")
    return args


# -- setup ----------------------------------------------------------------------------------------
def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else lambda: None


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds fn() takes, the device's queue drained before and after."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def build_model(name: str, layers: int, dtype: torch.dtype, device: torch.device, seed: int) -> LlamaForCausalLM:
    """A random Llama of the named geometry: uniform weights of std 0.02 (fast to draw), norms at 1."""
    config = LlamaConfig(**GEOMETRIES[name], num_hidden_layers=layers, max_position_embeddings=4096)
    with no_init_weights(), device:  # transformers' own init takes longer than the benchmark's restores
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    bound = 0.02 * math.sqrt(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.uniform_(-bound, bound, generator=gen)
            else:
                p.fill_(1.0)
    model.generation_config.eos_token_id = None
    return model


class Hcached:
    """The real daemon on one root, restarted cold (page cache dropped) and with a read throttle on demand."""

    def __init__(self, root: Path, dram: str) -> None:
        self.root, self.dram = root, dram
        self.proc: DaemonProcess | None = None
        self.caches_dropped = True

    def start(self, throttle: int = 0) -> None:
        self.stop()
        extra = ["--read-throttle", str(throttle)] if throttle else []
        self.proc = DaemonProcess(self.root, dram=self.dram, slab_size="256MiB", extra=extra).start()

    def cold(self) -> None:
        """Restart with an empty arena and nothing of the data dirs in the page cache."""
        assert self.proc is not None
        self.proc.stop()
        self.caches_dropped &= drop_caches()
        self.proc.start()

    def client(self) -> HCacheClient:
        assert self.proc is not None
        return HCacheClient(self.proc.socket)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.cleanup()
            self.proc = None


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


# -- restores -------------------------------------------------------------------------------------
def random_ids(n: int, batch: int, vocab: int, seed: int, device: torch.device) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, n), generator=torch.Generator().manual_seed(seed)).to(device)


def capture_prefill(model: LlamaForCausalLM, hc: Hcached, ctx: str, ids: torch.Tensor
                    ) -> tuple[float, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Seconds to prefill `ids` under capture(store="both") until durable, and the prefill's own K/V."""
    sync = synchronizer(ids.device)
    with hc.client() as client:
        start = time.perf_counter()
        with capture(model, client, ctx, store="both"), torch.no_grad():
            cache = model(input_ids=ids, use_cache=True, logits_to_keep=1).cache
        sync()
        seconds = time.perf_counter() - start
    return seconds, [(layer.keys, layer.values) for layer in cache.layers]


def timed_restore(model: LlamaForCausalLM, client: HCacheClient, ctx: str, method: str) -> tuple[float, object]:
    sync = synchronizer(next(model.parameters()).device)
    sync()
    start = time.perf_counter()
    cache, _ = restore(model, client, ctx, method=METHODS[method])
    sync()
    return time.perf_counter() - start, cache


def same_cache(cache: object, prefill: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    return all(torch.equal(c.keys, k) and torch.equal(c.values, v)
               for c, (k, v) in zip(cache.layers, prefill, strict=True))


def measure_method(model: LlamaForCausalLM, hc: Hcached, ctx: str, method: str, repeat: int, warm: bool,
                   prefill: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict:
    """Median seconds of cold restores (and of a warm one right after each), repeated while cheap; the first
    cold cache checked against the prefill's. RE reads only the token ids, but after the restart all the same: the
    first restore after a restart pays for a cold daemon, whatever it reads."""
    cold: list[float] = []
    hot: list[float] = []
    equal = None
    while len(cold) < repeat and sum(cold) + sum(hot) < COLD_BUDGET_S:
        hc.cold()
        with hc.client() as client:
            seconds, cache = timed_restore(model, client, ctx, method)
            if prefill is not None and equal is None:
                equal = same_cache(cache, prefill)
            del cache
            cold.append(seconds)
            if warm:
                hot.append(timed_restore(model, client, ctx, method)[0])
    out = {"cold_s": statistics.median(cold), "cold_samples": cold}
    if warm:
        out |= {"warm_s": statistics.median(hot), "warm_samples": hot}
    if equal is not None:
        out["equal"] = equal
    return out


def io_fitted(base: Profile, seconds_kv: float, layers: int, tokens: int) -> Profile:
    """The compute costs of `base` with reads at the speed a cold all-KV restore just achieved (under a throttle,
    or with several reads in flight, not what the profiler's single reads saw): seconds per byte past the profiled
    request latency."""
    latency = base.io[1]
    per_byte = max(seconds_kv / layers - latency, 0.0) / (tokens * base.geometry.token_bytes(Rep.KV))
    return Profile(base.geometry, base.c_h, base.c_tok, (per_byte, latency), base.device, "measured", base.samples)


def predictions(geometry: Geometry, tokens: int, prof: Profile) -> dict:
    """The planner's choice and predicted makespans (seconds) of it and the single-method plans."""
    chosen = plan(geometry, tokens, profile=prof)
    single = {m: simulate([m] * geometry.num_layers, tokens, prof).makespan for m in SINGLE}
    return {"methods": chosen.methods, "auto_s": chosen.makespan, **{f"{m}_s": s for m, s in single.items()}}


def run_config(model: LlamaForCausalLM, hc: Hcached, name: str, tokens: int, base: Profile, args: argparse.Namespace
               ) -> dict:
    """Capture a prefill of `tokens` random tokens (store="both"), then restore it by every method, cold and
    warm; auto plans with this host's profile, its reads fitted to the cold all-KV restore just measured."""
    ctx = f"{name}-{tokens}"
    ids = random_ids(tokens, 1, model.config.vocab_size, args.seed + tokens, next(model.parameters()).device)
    capture_s, prefill = capture_prefill(model, hc, ctx, ids)
    out: dict = {"capture_s": capture_s, "methods": {}}
    for method in METHODS:
        if method == "auto":
            prof = io_fitted(base, out["methods"]["KV"]["cold_s"], model.config.num_hidden_layers, tokens)
            save_profile(prof)  # where restore(method="auto") finds it: $HCACHE_HOME/profiles
            out["plan"] = predictions(prof.geometry, tokens, prof)
            with hc.client() as client:  # restore() takes no profile: check it plans with the one just saved
                chosen = choose_methods(client.stat(ctx), "auto", 1, next(model.parameters()).device.type)
                out["restorer_uses_profile"] = chosen == out["plan"]["methods"]
        out["methods"][method] = measure_method(model, hc, ctx, method, args.repeat, method != "RE", prefill)
        log(f"{name} T={tokens} {method}: cold {out['methods'][method]['cold_s']:.3f}s")
    out["all_equal"] = all(m["equal"] for m in out["methods"].values())
    return out


# -- ratios ---------------------------------------------------------------------------------------
def projection_vs_recompute(model: LlamaForCausalLM, tokens: int, seed: int) -> dict:
    """C_tok / C_H per layer, each as a restore of every layer pays it: recomputing them all from tokens (the
    embedding and rotary tables once) over projecting every layer's input (the rotary tables once, as restore
    does). Runs alternate, so load that comes and goes hits both alike, and the best of each counts: load only adds
    time."""
    device = next(model.parameters()).device
    sync = synchronizer(device)
    layers = model.config.num_hidden_layers
    ids = random_ids(tokens, 1, model.config.vocab_size, seed, device)
    hidden = torch.randn(layers, 1, tokens, model.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    hidden = hidden.to(device=device, dtype=model.dtype)
    positions = torch.arange(tokens, device=device)[None]

    project = Projector(model)

    def project_all() -> None:
        rope = rope_tables(model, hidden[0], positions)
        for i in range(layers):
            project(i, hidden[i], positions, rope)

    runs: dict[str, Callable[[], object]] = {"c_h": project_all,
                                             "c_tok": lambda: recompute_prefix(model, ids, layers)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        runs["c_h"]()  # warm-up
        for _ in range(PROJECTION_RUNS):
            for name, fn in runs.items():
                times[name].append(timed(fn, sync) / layers)
    c_h, c_tok = min(times["c_h"]), min(times["c_tok"])
    g, inter = geometry_of(model), model.config.intermediate_size
    d, kv_dim = g.hidden_size, g.num_kv_heads * g.head_dim
    flops_per_token = 4 * d * d + 4 * d * kv_dim + 6 * d * inter + 2 * tokens * d  # as in costs.analytical_profile
    return {"tokens": tokens, "layers": layers, "per": "layer, over a restore of every layer", "c_tok_s": c_tok,
            "c_h_s": c_h, "ratio": c_tok / c_h, "flop_ratio": flops_per_token / (4 * d * kv_dim),
            "samples_s": times}


def pinned(base: Profile, tokens: int, c_h: float, c_tok: float) -> Profile:
    """`base` with compute costs that are exactly the measured c_h and c_tok at `tokens` (linear through 0): the
    planner sees the true costs there rather than the profiler's extrapolation from shorter contexts."""
    return Profile(base.geometry, (c_h / tokens, 0.0), (0.0, c_tok / tokens, 0.0), base.io, base.device, "measured")


def at_rate(base: Profile, rate: float) -> Profile:
    return Profile(base.geometry, base.c_h, base.c_tok, (1 / rate, base.io[1]), base.device, "measured")


def fastest_single(base: Profile, tokens: int, rate: float) -> str:
    return min(SINGLE, key=lambda m: simulate([m] * base.geometry.num_layers, tokens, at_rate(base, rate)).makespan)


def balance_points(base: Profile, tokens: int) -> list[float]:
    """Read rates (bytes/s, fastest first) at which the fastest single method changes, so two tie: scanned over
    1 MB/s to 1 TB/s, then bisected."""
    grid = [10 ** (6 + 6 * k / 240) for k in range(241)]
    fastest = [fastest_single(base, tokens, rate) for rate in grid]
    points = []
    for (lo, hi), (slow_side, fast_side) in zip(itertools.pairwise(grid), itertools.pairwise(fastest), strict=True):
        if slow_side != fast_side:
            for _ in range(40):
                mid = math.sqrt(lo * hi)
                lo, hi = (mid, hi) if fastest_single(base, tokens, mid) == slow_side else (lo, mid)
            points.append(math.sqrt(lo * hi))
    return sorted(points, reverse=True)


def auto_vs_best(model: LlamaForCausalLM, hc: Hcached, base: Profile, unthrottled: dict, costs: dict,
                 args: argparse.Namespace) -> dict:
    """Per read throttle: cold all-KV, all-H, all-RE (it reads the token ids, through the throttle like the rest)
    and auto restores of the T_RATIOS context, and best single ÷ auto; auto plans with c_h and c_tok as
    measured at T_RATIOS (c_tok: the all-RE restore's per layer) and reads as fast as the all-KV restore at that
    throttle. Throttles are multiples of the fastest balance point this disk can serve (else the slowest one there
    is); levels the disk is too slow for are replaced by fractions of the disk's own rate, and the unthrottled disk
    counts as a level at its rate."""
    ctx, layers = f"{MAIN}-{T_RATIOS}", model.config.num_hidden_layers
    g = base.geometry
    # c_tok per layer as the all-RE restore paid it, the token ids' read and the cache's set-up included.
    base = pinned(base, T_RATIOS, costs["c_h_s"], unthrottled["methods"]["RE"]["cold_s"] / layers)
    kv_s = unthrottled["methods"]["KV"]["cold_s"]
    disk_rate = layers * T_RATIOS * g.token_bytes(Rep.KV) / kv_s
    points = balance_points(base, T_RATIOS)
    balance = next((p for p in points if p <= disk_rate), points[-1] if points else disk_rate)
    levels: dict[str, dict] = {}
    log(f"balance points {[format_size(p) + '/s' for p in points]}; disk reads {format_size(disk_rate)}/s")
    rates = {level: math.ceil(balance * ratio) for level, ratio in LEVELS.items()}
    reachable = {level: rate for level, rate in rates.items() if rate < disk_rate}
    slower = {f"disk/{d}": math.ceil(disk_rate / d) for d in (2, 4, 8)}  # tops up to three levels the disk can do
    for level, rate in rates.items():
        if level not in reachable:
            levels[level] = {"rate": rate, "throttle": None, "note": "the disk alone is slower"}
    # "none" is measured like the throttled levels, not taken from the main table: methods measured in turn see
    # the same disk, whose speed drifts from minute to minute here.
    throttles = {"none": 0} | reachable | dict(list(slower.items())[: len(LEVELS) - len(reachable)])
    for level, throttle in throttles.items():
        hc.start(throttle)
        samples: dict[str, list[float]] = {"KV": [], "H": [], "RE": [], "auto": []}
        rounds, racing, started = 0, list(samples), time.perf_counter()
        while rounds < LEVEL_ROUNDS or (rounds < MAX_LEVEL_ROUNDS and
                                        sum(sum(samples[m]) for m in racing) < LEVEL_BUDGET_S and
                                        time.perf_counter() - started < LEVEL_WALL_S[model.device.type]):
            if rounds in (1, LEVEL_ROUNDS):  # a method far behind the fastest decides nothing: rounds for the rest
                fastest = min(statistics.median(samples[m]) for m in racing)
                bound = FAR if rounds == 1 else CONTENDER
                racing = [m for m in racing if statistics.median(samples[m]) <= bound * fastest]
            order = racing[rounds % len(racing) :] + racing[: rounds % len(racing)]
            rounds += 1
            for method in order:
                got = samples[method]
                if method == "auto" and len(got) == 0:  # plan with reads as fast as the first all-KV restore
                    prof = io_fitted(base, samples["KV"][0], layers, T_RATIOS)
                    save_profile(prof)
                    expected = predictions(g, T_RATIOS, prof)
                got.append(measure_method(model, hc, ctx, method, 1, False)["cold_s"])
        seconds = {m: statistics.median(v) for m, v in samples.items()}
        levels[level] = {"rate": throttle or disk_rate, "throttle": throttle, "samples": samples,
                         **level_summary(seconds, expected)}
        log(f"throttle {level} ({format_size(throttle or disk_rate)}/s): plan {expected['methods']}, "
            f"auto vs best single {levels[level]['auto_vs_best_single']:.3f}")
    hc.start()
    measured = [k for k, v in levels.items() if "auto_vs_best_single" in v]
    nearest = min(measured, key=lambda k: abs(math.log(levels[k]["rate"] / balance)))
    return {"balance_points": points, "balance": balance, "disk_rate": disk_rate, "nearest_balance": nearest,
            "levels": levels}


def level_summary(seconds: dict[str, float], expected: dict) -> dict:
    best = min(SINGLE, key=lambda m: seconds[m])
    return {"seconds": seconds, "best_single": best, "auto_vs_best_single": seconds[best] / seconds["auto"],
            "plan": expected["methods"], "predicted_s": {m: expected[f"{m}_s"] for m in METHODS}}


def twin(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """The same model, sharing every weight, as modules of its own: capture's hooks on `model` never run in it."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo=shared)


class Greedy:
    """One batch's greedy decode, a forward pass at a time, on a cache of its own (what generate() runs per step,
    without its logits processing: a shorter step, so a fixed cost per step weighs more)."""

    def __init__(self, model: LlamaForCausalLM, ids: torch.Tensor) -> None:
        self.model, self.next, self.mask, self.cache = model, ids, torch.ones_like(ids), None

    @torch.no_grad()
    def step(self) -> None:
        out = self.model(input_ids=self.next, attention_mask=self.mask, cache=self.cache, use_cache=True)
        self.cache = out.cache
        self.next = out.logits[:, -1].argmax(-1, keepdim=True)
        self.mask = torch.cat([self.mask, torch.ones_like(self.next)], 1)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far, its exited threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tasks() -> set[int]:
    """This process's threads as the kernel knows them (torch's OpenMP workers are not Python threads)."""
    return {int(t) for t in os.listdir("/proc/self/task")}


def background_cpu_s(daemon_pid: int, decoding: set[int], stats: CaptureStats) -> dict[str, float]:
    """CPU seconds used so far by the daemon and by this process's threads but the `decoding` ones (the main thread
    and its OpenMP workers): capture's sender (as it counts itself: its thread is gone once the block has ended),
    the client's loop, ZeroMQ's I/O, and the OpenMP workers these start for their own copies ("other")."""
    ours = {t.native_id: t.name for t in threading.enumerate() if t.name in IN_PROCESS}
    out = {"hcached": process_cpu_s(daemon_pid), "hcache-capture": stats.send_cpu_s}
    for tid in tasks() - decoding - {tid for tid, name in ours.items() if name == "hcache-capture"}:
        task = Path(f"/proc/self/task/{tid}")
        try:
            comm, cpu_ns = (task / "comm").read_text(), int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        name = ours.get(tid) or ("zmq" if comm.startswith("ZMQbg") else "other")
        out[name] = out.get(name, 0.0) + cpu_ns / 1e9
    return out


def interleaved_steps(model: LlamaForCausalLM, plain: LlamaForCausalLM, ids: torch.Tensor, steps: int,
                      client: HCacheClient, ctxs: list[str], store: str, daemon_pid: int, decoding: set[int]
                      ) -> tuple[list[float], list[float], float, dict[str, float]]:
    """Decode step times of `model` under capture(store=store) into `ctxs` and of its twin without, taken in turn
    (which goes first alternates); the seconds capture's hooks took in the captured steps; the CPU seconds
    hcache's threads and the daemon used from the first measured step to the block's end, which sends what is
    still held back (up to 32 MiB: at batch 1 most of what the steps captured) and waits until it is durable."""
    sync = synchronizer(ids.device)
    captured, uncaptured = Greedy(model, ids), Greedy(plain, ids)
    times: dict[Greedy, list[float]] = {captured: [], uncaptured: []}
    with capture(model, client, ctxs[0] if len(ctxs) == 1 else ctxs, store=store) as stats:
        captured.step()  # the prompt
        uncaptured.step()
        sync()
        before, hooks = background_cpu_s(daemon_pid, decoding, stats), stats.hook_s
        for i in range(steps):
            for g in (captured, uncaptured) if i % 2 == 0 else (uncaptured, captured):
                t = time.perf_counter()
                g.step()
                sync()
                times[g].append(time.perf_counter() - t)
        hooks = stats.hook_s - hooks
    after = background_cpu_s(daemon_pid, decoding, stats)
    for ctx in ctxs:
        client.delete(ctx)
    if not torch.equal(captured.next, uncaptured.next):
        log("the twin decoded other tokens than the captured model: their steps may differ in work")
    return times[captured], times[uncaptured], hooks, {k: after[k] - before.get(k, 0.0) for k in after}


def warm_capture(model: LlamaForCausalLM, ids: torch.Tensor, client: HCacheClient, ctxs: list[str], store: str,
                 steps: int) -> None:
    """Capture as many steps as a measured block, unmeasured: a shape's first steps and the process's first appends
    are behind, and the block's host buffers are pooled (page-locked, on a GPU), as in a server that has been
    capturing a while; their first use takes page faults (or pinning) that a measured block would count."""
    g = Greedy(model, ids)
    with capture(model, client, ctxs, store=store):
        for _ in range(steps + 1):
            g.step()
    for ctx in ctxs:
        client.delete(ctx)


def hook_dispatch_s(calls: int = 20000) -> float:
    """What a module's call costs beyond its forward once a forward hook with kwargs is registered on it (nn.Module
    leaves its fast path), on this host: capture's hooks time their own bodies, not this."""
    module, x = torch.nn.Identity(), torch.zeros(1)

    def per_call() -> float:
        start = time.perf_counter()
        for _ in range(calls):
            module(x)
        return (time.perf_counter() - start) / calls

    plain = min(per_call() for _ in range(5))
    handle = module.register_forward_pre_hook(lambda m, a, kw: None, with_kwargs=True)
    hooked = min(per_call() for _ in range(5))
    handle.remove()
    return max(hooked - plain, 0.0)


def capture_tbt(model: LlamaForCausalLM, hc: Hcached, args: argparse.Namespace, decoding: set[int]) -> dict:
    """Capture's cost per decode step, batch 1 and 8, as deployed (store="plan") and saving every layer's hidden
    states and K/V (store="both": three times the bytes, for MHA): the time its hooks take inside the steps, plus
    the CPU time of the work it moves off them, over the steps' time without capture. On a CPU, whose cores the
    model's OpenMP workers fill, all of that work counts (its sender, the client's loop, ZeroMQ's threads, the
    daemon), as if it were all taken from the decoding cores. On a GPU the decode is one Python thread on a host
    with cores to spare: the daemon and ZeroMQ's threads run beside it, and what can slow it is the CPU of capture's
    threads in the serving process (its sender, the client's loop), which share its interpreter lock: that counts,
    in whole (an upper bound: their copies and socket calls release the lock), and the all-CPU figure is reported
    beside. Timing steps with capture on against steps without could not resolve this here: whole generate() runs
    differed by several percent from load alone, and steps taken in turn with those of a twin sharing the model's
    weights still spread +-5% each (their median ratio, reported beside, is within about a percent)."""
    assert hc.proc is not None and hc.proc.proc is not None
    device, pid = next(model.parameters()).device, hc.proc.proc.pid
    plain = twin(model)
    dispatch = hook_dispatch_s() * (model.config.num_hidden_layers + 2)  # a step's hooked calls: layers, model x2
    out: dict[str, dict] = {}
    with hc.client() as client:
        for store in TBT_STORES:
            for batch in (1, 8):
                ids = random_ids(PROMPT_TOKENS, batch, model.config.vocab_size, args.seed + batch, device)
                warm_capture(model, ids, client, [f"tbt-warm-{r}" for r in range(batch)], store, args.tbt_tokens)
                on, off, hooks, cpu = interleaved_steps(model, plain, ids, args.tbt_tokens, client,
                                                        [f"tbt-{batch}-{r}" for r in range(batch)], store, pid,
                                                        decoding)
                out.setdefault(store, {})[str(batch)] = tbt_summary(store, batch, on, off, hooks, dispatch, cpu,
                                                                    spare_cores=device.type == "cuda")
    del plain
    return out


def tbt_summary(store: str, batch: int, on: list[float], off: list[float], hooks: float, dispatch: float,
                cpu: dict[str, float], spare_cores: bool) -> dict:
    """`hooks`: seconds inside capture's hooks over the steps; `dispatch`: seconds a step's hooked module calls
    cost besides; `cpu`: CPU seconds off the steps' path."""
    step_s = sum(off)
    on_path, background = (hooks + dispatch * len(on)) / step_s, sum(cpu.values()) / step_s
    in_process = sum(cpu.get(k, 0.0) for k in IN_PROCESS) / step_s
    overhead = on_path + (in_process if spare_cores else background)
    ratios = [a / b for a, b in zip(on, off, strict=True)]
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    se = 1.2533 * (q3 - q1) / 1.349 / math.sqrt(len(ratios))
    log(f"store={store} batch {batch}: {statistics.median(off) * 1e3:.1f} ms a step; capture's hooks "
        f"{hooks * 1e3 / len(on):.2f} ms + their dispatch {dispatch * 1e3:.3f} ms ({on_path:.2%}) + CPU off the "
        f"step's path {background:.2%} ("
        + ", ".join(f"{k} {v * 1e3 / len(on):.2f}" for k, v in cpu.items())
        + f" ms a step) = {on_path + background:+.2%}; hooks and capture's threads in this process "
        f"{on_path + in_process:+.2%}; steps in turn with the twin: median ratio {median:.3f} +- {se:.3f} (quartiles "
        f"{q1:.3f}, {q3:.3f}); counted: {overhead:+.2%}")
    return {"overhead": overhead, "overhead_counts": "in_process" if spare_cores else "all_cpu",
            "overhead_all_cpu": on_path + background, "overhead_in_process": on_path + in_process,
            "on_path": on_path, "background": background, "in_process": in_process,
            "hook_ms_per_step": hooks * 1e3 / len(on), "hook_dispatch_ms_per_step": dispatch * 1e3,
            "background_cpu_ms_per_step": {k: v * 1e3 / len(on) for k, v in cpu.items()},
            "off_ms": statistics.median(off) * 1e3,
            "interleaved": {"median_ratio": median, "ratio_quartiles": [q1, q3], "median_se": se},
            "steps_ms": {"on": [x * 1e3 for x in on], "off": [x * 1e3 for x in off]}}


# -- report ---------------------------------------------------------------------------------------
def device_info(directory: Path, device: torch.device) -> dict:
    return {**host_info(directory), "torch_threads": torch.get_num_threads(), "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def tokens_per_s(restores: dict, which: str) -> dict:
    """{geometry: {method: {T: tokens/s}}} of the cold or warm medians."""
    key = f"{which}_s"
    return {name: {m: {t: int(t) / r["methods"][m][key] for t, r in per_t.items() if key in r["methods"][m]}
                   for m in METHODS} for name, per_t in restores.items()}


def plot(result: dict) -> Any:
    names = list(result["tokens_per_s"]["cold"])
    fig, axes = subplots(1, len(names) + 1, figsize=(5.2 * (len(names) + 1), 4.6))
    colors = {"RE": "tab:red", "H": "tab:blue", "KV": "tab:green", "auto": "black"}
    for ax, name in zip(axes, names, strict=False):
        for which, style in (("cold", "-o"), ("warm", ":x")):
            for m, per_t in result["tokens_per_s"][which][name].items():
                if per_t:
                    ts = [int(t) for t in per_t]
                    ax.plot(ts, list(per_t.values()), style, color=colors[m], label=f"{m} {which}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(TOKENS, [str(t) for t in TOKENS])
        ax.set_xlabel("context tokens T")
        ax.set_ylabel("restore tokens/s")
        ax.set_title(f"{name}, {result['layers']} layers, {result['dtype']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    ax = axes[-1]
    levels = {k: v for k, v in result["auto_vs_best"]["levels"].items() if v.get("seconds")}
    width = 0.2
    for j, m in enumerate(METHODS):
        xs = [i + (j - 1.5) * width for i in range(len(levels))]
        ax.bar(xs, [T_RATIOS / v["seconds"][m] for v in levels.values()], width, color=colors[m], label=m)
    for i, v in enumerate(levels.values()):
        ratio = v["auto_vs_best_single"]
        ax.text(i, T_RATIOS / v["seconds"]["auto"] * 1.15, f"{ratio:.2f}x", ha="center", fontsize=9,
                fontweight="bold", color="tab:green" if ratio >= GOALS["auto_vs_best_single"] else "tab:red")
    ax.set_xticks(range(len(levels)), [f"{k}\n{format_size(v['throttle']) + '/s' if v['throttle'] else 'no cap'}"
                                       for k, v in levels.items()])
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 3)
    ax.set_ylabel("cold restore tokens/s (median)")
    ax.set_title(f"{MAIN}, T={T_RATIOS}: auto vs best single per read throttle", fontsize=9)
    ax.legend(fontsize=7)
    h = result["host"]
    fig.suptitle(f"hcache restore on {result['device']} ({h['cpu_count']} CPUs, {h['fs_type']}); "
                 f"projection/recompute {result['projection_vs_recompute']:.2f}, auto/best single "
                 f"{result['auto_vs_best_single']:.2f}, capture TBT overhead {result['capture_tbt_overhead']:+.1%}",
                 fontsize=9)
    return fig


def summary(result: dict) -> str:
    lines = [f"hcache restore bench on {result['device']}: {result['layers']} layers, {result['dtype']}, "
             f"{result['runtime_s']:.0f} s; cold tokens/s"]
    for name, per_m in result["tokens_per_s"]["cold"].items():
        for m, per_t in per_m.items():
            lines.append(f"  {name:15s} {m:5s} " + "  ".join(f"T={t}: {v:9.0f}" for t, v in per_t.items()))
    for key, goal in GOALS.items():
        value = result[key]
        met = value > goal if key == "auto_vs_best_single_balanced" else (
            value <= goal if key == "capture_tbt_overhead" else value >= goal)
        lines.append(f"  {key:30s} {value:7.3f}  (goal {goal}: {'met' if met else 'MISSED'})")
    lines.append(f"  {'capture_tbt_overhead_both':30s} {result['capture_tbt_overhead_both']:7.3f}  (store='both')")
    lines.append(f"  {'capture_tbt_overhead_all_cpu':30s} {result['capture_tbt_overhead_all_cpu']:7.3f}  (all "
                 "background CPU counted)")
    return "\n".join(lines)


# -- the run --------------------------------------------------------------------------------------
def measure(args: argparse.Namespace, root: Path) -> dict:
    start = time.perf_counter()
    loadavg = [os.getloadavg()]
    os.environ["HCACHE_HOME"] = str(root / "home")  # measured profiles go here, not to the user's state dir
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    layers = args.layers or DEFAULT_LAYERS[device.type]
    profile_t, profile_repeats = PROFILE_T[device.type]
    hc = Hcached(root / "hcached", dram=DRAM[device.type])
    torch.ones(1 << 20).sum()  # starts the main thread's OpenMP workers, before any hcache thread exists
    decoding = tasks()
    result: dict = {"restores": {}, "profiles": {}, "fallback_plans": {}}
    try:
        hc.start()
        for name in GEOMETRIES:
            log(f"{name}: building {layers} random layers in {args.dtype} on {device}")
            model = build_model(name, layers, dtype, device, args.seed)
            g = geometry_of(model)
            fallback = profile_for(g, device.type)  # what restore() plans with before this host was profiled
            result["fallback_plans"][name] = {"profile": f"{fallback.source} {fallback.device}",
                                              **predictions(g, T_RATIOS, fallback)}
            with hc.client() as client:
                base = profile(model, client, profile_t, repeats=profile_repeats, save=False)
            result["profiles"][name] = base.to_dict()
            per_t = {str(t): run_config(model, hc, name, t, base, args) for t in TOKENS}
            result["restores"][name] = per_t
            if name == MAIN:
                result["projection"] = projection_vs_recompute(model, T_RATIOS, args.seed)
                result["auto_vs_best"] = auto_vs_best(model, hc, base, per_t[str(T_RATIOS)],
                                                      result["projection"], args)
                result["capture_tbt"] = capture_tbt(model, hc, args, decoding)
            del model
            gc.collect()
    finally:
        hc.stop()
    loadavg.append(os.getloadavg())
    balance = result["auto_vs_best"]
    levels = balance["levels"]
    measured = [v["auto_vs_best_single"] for v in levels.values() if "auto_vs_best_single" in v]
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "device": device_slug(device),
        "host": device_info(root, device),
        "git": git_info(),
        "loadavg_start_end": loadavg,
        "runtime_s": time.perf_counter() - start,
        "layers": layers,
        "dtype": args.dtype,
        "tokens": list(TOKENS),
        "geometries": {name: {**cfg, "num_hidden_layers": layers} for name, cfg in GEOMETRIES.items()},
        "weights": "random, uniform with std 0.02, norms 1, seed " + str(args.seed),
        "method_names": METHODS,
        "cold": "daemon restarted (empty arena) and page cache dropped before each sample, RE's too (it reads the "
                "token ids)",
        "caches_dropped": hc.caches_dropped,
        "warm": "the same restore again right after a cold one, chunks in the arena (none of RE: it reads no layers)",
        "repeat": f"up to {args.repeat} samples per restore while they took < {COLD_BUDGET_S}s in all; medians",
        "projection_vs_recompute": result["projection"]["ratio"],
        "auto_vs_best_single": min(measured),
        "auto_vs_best_single_note": "minimum over the measured levels, 'none' (no cap) included",
        "auto_vs_best_single_balanced": levels[balance["nearest_balance"]]["auto_vs_best_single"],
        "auto_vs_best_single_balanced_note": "at the measured level nearest the balance point (read rate where the "
                                             "two fastest single methods tie): " + balance["nearest_balance"],
        "capture_tbt_overhead": max(v["overhead"] for v in result["capture_tbt"][TBT_STORES[0]].values()),
        "capture_tbt_overhead_note": f"store={TBT_STORES[0]!r} (the default), the worse of batch 1 and 8; counting "
                                     + ("hooks and capture's threads in the serving process (a GPU host has cores to "
                                        "spare for the daemon)" if device.type == "cuda" else
                                        "hooks and all background CPU (the model's threads fill this host's cores)"),
        "capture_tbt_overhead_all_cpu": max(v["overhead_all_cpu"]
                                            for v in result["capture_tbt"][TBT_STORES[0]].values()),
        "capture_tbt_overhead_both": max(v["overhead"] for v in result["capture_tbt"][TBT_STORES[1]].values()),
        "goals": GOALS,
        "tokens_per_s": {"cold": tokens_per_s(result["restores"], "cold"),
                         "warm": tokens_per_s(result["restores"], "warm")},
        "all_equal": all(r["all_equal"] for per_t in result["restores"].values() for r in per_t.values()),
        "profile_note": "compute from hcache.client.profiler.profile at T=" + ",".join(map(str, profile_t)) +
                        "; reads refitted to the cold all-KV restore at each throttle (profiled reads are single)",
        **result,
        "capture_tbt_setup": {"prompt_tokens": PROMPT_TOKENS, "steps": args.tbt_tokens, "stores": TBT_STORES,
                              "warmup": "an unmeasured capture of as many steps first",
                              "statistic": "(seconds in capture's hooks and their dispatch (nn.Module's slow "
                                           "path, measured on an Identity) + CPU seconds of capture's sender, the "
                                           "client's loop, ZeroMQ's threads, their OpenMP workers and hcached; on "
                                           "CUDA of the sender and the client's loop alone) over the steps / the "
                                           "same steps' time without capture (the twin's)"},
    }


def main() -> None:
    args = parse_args()
    result = run_and_save(args.dir, "hcache-restore-", lambda root: measure(args, root),
                          lambda r: f"restore-{r['device']}", plot)
    print(json.dumps(result) if args.json else summary(result))


if __name__ == "__main__":
    main()
