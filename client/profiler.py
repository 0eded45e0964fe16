"""Measure one model's restore costs on this host (projection, recompute, reads) and fit them into a Profile."""

from __future__ import annotations

import itertools
import os
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from functools import partial

import torch

from hcache.client.costs import DEVICES, Profile, save_profile
from hcache.client.projection import Projector, geometry_of, recompute_prefix, rope_tables
from hcache.client.sync import HCacheClient
from hcache.layout.geometry import Geometry, Rep


def profile(model: torch.nn.Module, client: HCacheClient, T_values: Sequence[int] = (64, 256, 1024), *,
            repeats: int = 5, io_layers: int = 4, save: bool = True) -> Profile:
    """Time one layer's projection as a restore runs it, the rotary tables at hand (C_H), and a recompute of every
    layer (C_tok, per layer) at each token count, and single-layer reads of hidden states and K/V of a throwaway
    context through `client` (IO); fit c_h = a·T + b, c_tok = a·T² + b·T + c and io = bytes/bandwidth + latency.
    `save` keeps it in the state dir."""
    if len(set(T_values)) < 3 or min(T_values) < 1:
        raise ValueError(f"T_values needs at least 3 distinct positive token counts, got {list(T_values)}")
    param = next(model.parameters())
    if param.device.type not in DEVICES:
        raise ValueError(f"can profile on {DEVICES}, not on {param.device.type}")
    geometry = geometry_of(model)
    sync = torch.cuda.synchronize if param.device.type == "cuda" else _no_sync
    vocab = model.get_input_embeddings().num_embeddings
    token_counts = sorted(set(T_values))
    samples: dict[str, list[list[float]]] = {"c_h": [], "c_tok": [], "io": [], "io_arena": []}
    project = Projector(model)
    with torch.inference_mode():
        for t in token_counts:
            hidden = torch.randn(1, t, geometry.hidden_size, dtype=param.dtype, device=param.device)
            positions = torch.arange(t, device=param.device)[None]
            ids = torch.randint(vocab, (1, t), device=param.device)
            rope = rope_tables(model, hidden, positions)  # once per restore, for all the layers it projects
            samples["c_h"].append([t, _time(partial(project, 0, hidden, positions, rope), repeats, sync)])
            everything = partial(recompute_prefix, model, ids, geometry.num_layers)
            samples["c_tok"].append([t, _time(everything, repeats, sync) / geometry.num_layers])
    samples["io"], samples["io_arena"] = _time_reads(client, geometry, param.dtype, token_counts, repeats,
                                                     min(io_layers, geometry.num_layers))
    result = Profile(geometry, c_h=_fit(samples["c_h"], 2), c_tok=_fit(samples["c_tok"], 3),
                     io=_fit(samples["io"], 2), device=param.device.type, source="measured", samples=samples,
                     io_arena=_fit(samples["io_arena"], 2))
    if save:
        save_profile(result)
    return result


def _no_sync() -> None:
    pass


def _time(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of fn() after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _time_reads(client: HCacheClient, geometry: Geometry, dtype: torch.dtype, token_counts: list[int],
                repeats: int, n_layers: int) -> tuple[list[list[float]], list[list[float]]]:
    """(bytes, median seconds) of single-layer reads of hidden states and K/V of a context made for it: from disk
    (dropped from the daemon's memory before each read), and again right after, from the daemon's arena."""
    ctx = f"hcache-profile-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    layers = list(range(n_layers))
    n = max(token_counts)
    client.open(ctx, model="hcache-profiler", geometry=geometry, layers={"hidden": layers, "kv": layers})
    try:
        item = {"hidden": (geometry.hidden_size,), "kv": (2, geometry.num_kv_heads, geometry.head_dim)}
        data = {name: torch.randn(n_layers, n, *shape).to(dtype) for name, shape in item.items()}
        client.append(ctx, torch.randint(1000, (n,)), data)
        client.flush(ctx)
        disk, arena = [], []
        for t, (name, rep) in itertools.product(token_counts, (("hidden", Rep.HIDDEN), ("kv", Rep.KV))):
            buffer = torch.empty(1, t, *item[name], dtype=dtype)
            times: dict[str, list[float]] = {"disk": [], "arena": []}
            for layer in itertools.islice(itertools.cycle(layers), repeats * n_layers):
                client.flush(ctx, drop=True)  # the first read is from disk, the second from the daemon's memory
                for where in ("disk", "arena"):
                    start = time.perf_counter()
                    client.restore(ctx, name, [layer], 0, t, buffer)
                    times[where].append(time.perf_counter() - start)
            disk.append([t * geometry.token_bytes(rep), statistics.median(times["disk"])])
            arena.append([t * geometry.token_bytes(rep), statistics.median(times["arena"])])
        return disk, arena
    finally:
        client.delete(ctx)


def _fit(points: list[list[float]], terms: int) -> tuple[float, ...]:
    """Non-negative least squares of seconds on (x^(k-1), ..., x, 1), relative to each sample so that short
    and long T count alike; with at most 3 terms, trying every subset of terms is exact and cheap."""
    x = torch.tensor([p[0] for p in points], dtype=torch.float64)
    y = torch.tensor([p[1] for p in points], dtype=torch.float64)
    columns = torch.stack([x ** (terms - 1 - k) for k in range(terms)], dim=1)
    scale = columns.abs().amax(dim=0)
    design = columns / scale / y[:, None]
    best, best_error = (0.0,) * terms, float("inf")
    for size in range(1, terms + 1):
        for subset in map(list, itertools.combinations(range(terms), size)):
            solution = torch.linalg.lstsq(design[:, subset], torch.ones_like(y)[:, None]).solution[:, 0]
            if (solution < 0).any():
                continue
            error = float(((design[:, subset] @ solution - 1) ** 2).sum())
            if error < best_error:
                coefficients = [0.0] * terms
                for column, value in zip(subset, solution.tolist(), strict=True):
                    coefficients[column] = value / float(scale[column])
                best, best_error = tuple(coefficients), error
    return best
