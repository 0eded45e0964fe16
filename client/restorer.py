"""restore(): rebuild a model's KV cache for a saved context by the cheapest per-layer mix of H, KV and RE,
pipelined: reads of later layers are in flight while earlier layers are recomputed or projected."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import itertools
import threading
from collections.abc import Sequence

import torch

from hcache.client.costs import READ_BYTES, Profile
from hcache.client.errors import BadRequest, ContextChanged, ModelMismatch
from hcache.client.gil import responsive
from hcache.client.layout import ContextInfo, Origin
from hcache.client.sync import HCacheClient
from hcache.layout.geometry import Rep

METHODS = ("auto", "hidden", "kv", "recompute")
_READS_IN_FLIGHT = 3
_READ_AHEAD_BYTES = 1 << 30  # read but not yet used: on a GPU, device memory
_REP = {"H": "hidden", "KV": "kv"}


def choose_methods(info: ContextInfo, method: str, passes: int = 1, device: str | None = None,
                   profile: Profile | None = None) -> list[str]:
    """Per layer "RE", "H" or "KV": one method for all, or the planner's fastest plan over what is stored, for a
    context the model built in `passes` forward passes, restored on `device` (costs: `profile`, else this host's
    measured profile, else the analytical one; reads of chunks in hcached's arena at its rate when `info` says
    where they are)."""
    n = info.geometry.num_layers
    have = {"H": set(info.layers.get("hidden", [])), "KV": set(info.layers.get("kv", []))}
    if method == "recompute":
        return ["RE"] * n
    if method in ("hidden", "kv"):
        code = "H" if method == "hidden" else "KV"
        missing = [i for i in range(n) if i not in have[code]]
        if missing:
            raise BadRequest(f"context {info.id!r} holds no {method} for layers {missing} (it stores "
                             f"{info.layers}): restore with method='auto', or capture with store='{method}' or "
                             "'both'")
        return [code] * n
    if method != "auto":
        raise BadRequest(f"method={method!r}: use one of {METHODS}")
    from hcache.client.costs import profile_for
    from hcache.client.planner import plan


    available = [{code for code in ("H", "KV") if i in have[code]} for i in range(n)]
    profile = (profile or profile_for(info.geometry, device)).for_passes(passes).for_resident(*_resident(info))
    return plan(info.geometry, info.n_tokens, available=available, profile=profile).methods


def _resident(info: ContextInfo) -> tuple[float, float]:
    """The share of the context's hidden-state and of its K/V chunks in hcached's arena, from a detailed stat (none
    counted as resident without one)."""
    counts = {"hidden": [0, 0], "kv": [0, 0]}
    for stream in info.raw.get("placement", []):
        if stream["rep"] in counts:
            counts[stream["rep"]][0] += stream["in_arena"]
            counts[stream["rep"]][1] += stream["chunks"]
    (h, h_all), (kv, kv_all) = counts.values()
    return h / h_all if h_all else 0.0, kv / kv_all if kv_all else 0.0


def restore(model: torch.nn.Module, client: HCacheClient, ctx: str | None = None, method: str = "auto",
            model_id: str | None = None, profile: Profile | None = None, exact: bool = False, *,
            tokens: Sequence[int] | torch.Tensor | None = None) -> tuple[object, torch.Tensor]:
    """A transformers cache holding context `ctx`, and its tokens as a LongTensor [1, n]; continue with
    model.generate(torch.cat([token_ids, new_ids], 1), cache=cache).

    With `tokens=ids` instead of a context: the longest leading run of `ids` that hcached holds for this model in
    the client's namespace (whole 64-token chunks, from any context), and that run of ids; run only the rest with
    model.generate(ids, cache=cache). Nothing held: an empty cache and no tokens. A capture of the generation
    that follows into a new context references the restored chunks and saves only the new tokens.

    Projection (H) and recompute (RE) run over all tokens in one pass, as a re-prefill does, so a restore never
    costs more than prefilling the context again: tokens the model did not see in one pass (decode steps, later
    rounds) come back equal up to rounding, as a re-prefill's would. `exact=True` redoes the model's own forward
    passes instead, so the cache is the model's to the bit; a context it decoded token by token then costs a
    projection or a forward per token and layer. K/V reads are exact either way; the planner costs what will run."""
    from transformers import DynamicCache

    from hcache.client.projection import build_cache, fingerprint, geometry_of

    if method not in METHODS:
        raise BadRequest(f"method={method!r}: use one of {METHODS}")
    if (ctx is None) == (tokens is None):
        raise BadRequest("restore needs a context id or tokens=, one of the two")
    want = fingerprint(model, model_id)
    n = None
    if tokens is not None:
        ids = torch.as_tensor(tokens).reshape(-1)
        match = client.locate(want, ids)
        if match.ctx is None:
            return DynamicCache(config=model.config), ids[:0][None]
        ctx, n = match.ctx, match.n_tokens
    info = client.stat(ctx, detail=method == "auto")  # where its chunks are: the planner's read costs
    if info.model != want or info.geometry != geometry_of(model):
        raise ModelMismatch(f"context {ctx!r} was saved by model {info.model} ({info.geometry}); this model is "
                            f"{want} ({geometry_of(model)}): restore with the model that saved it")
    n = info.n_tokens if n is None else min(n, info.n_tokens)
    if n == 0:
        raise BadRequest(f"context {ctx!r} holds no tokens yet: there is nothing to restore")
    with responsive():  # the client's IO thread gets the GIL while this one launches kernels
        kv, token_ids = _rebuild(model, client, ctx, info, n, method, profile, exact)
    if tokens is not None and not torch.equal(token_ids, ids[:n].to(token_ids.dtype)):
        raise ContextChanged(f"context {ctx!r}, found holding the first {n} tokens, holds others now (changed "
                             "meanwhile): restore again")
    cache = build_cache(model, kv)
    cache.hcache_origin = Origin(client.namespace, ctx, n)
    return cache, token_ids[None]


def lookup(model: torch.nn.Module, client: HCacheClient, token_ids: Sequence[int] | torch.Tensor,
           model_id: str | None = None) -> int:
    """How many leading tokens of `token_ids` (LongTensor [n] or [1, n]) hcached holds for this model in the
    client's namespace, over all contexts, in whole 64-token chunks: what restore(tokens=token_ids) gives back."""
    from hcache.client.projection import fingerprint

    ids = torch.as_tensor(token_ids)
    if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
        raise BadRequest(f"token_ids must be [n] or [1, n], got {list(ids.shape)}: look up one request at a time")
    return client.lookup(fingerprint(model, model_id), ids.reshape(-1))


def _rebuild(model: torch.nn.Module, client: HCacheClient, ctx: str, info: ContextInfo, n: int, method: str,
             profile: Profile | None, exact: bool) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Every layer's K, V [1, n_kv, n, head_dim] for the context's first n tokens by the chosen methods, and their
    token ids [n]."""
    from hcache.client.projection import Projector, recompute_prefix, rope_tables

    info = dataclasses.replace(info, n_tokens=n)
    token_ids, passes = client.tokens_and_passes(ctx, n)  # passes: redo the model's arithmetic in its pieces
    if not exact:
        passes = [n]
    device = next(model.parameters()).device
    methods = choose_methods(info, method, len(passes), device.type, profile)
    r = methods.count("RE")
    layer_bytes = n * max(info.geometry.token_bytes(Rep.HIDDEN), info.geometry.token_bytes(Rep.KV))
    pending = collections.deque(_read_groups(methods, r, max(1, READ_BYTES // layer_bytes)))
    first = {i: g[0] for g in pending for i in g}  # each layer's group, by its first layer
    reads: dict[int, concurrent.futures.Future] = {}  # by first layer: started, not yet used up
    # The plan has the reads stream from time 0, the recompute prefix meanwhile: a finished read starts the next
    # one (from the client's thread), up to a bound on what is read but not used yet.
    ahead = max(_READS_IN_FLIGHT, _READ_AHEAD_BYTES // (layer_bytes * max(map(len, pending), default=1)))
    lock = threading.RLock()  # a read that is already done runs its callback at once, in the starting thread

    def start_reads(done: concurrent.futures.Future | None = None) -> None:
        with lock:
            if done is not None and done.exception() is not None:
                pending.clear()  # the restore fails with it: read no more
            while (pending and len(reads) < ahead
                   and sum(not f.done() for f in reads.values()) < _READS_IN_FLIGHT):
                group = pending.popleft()
                # On CUDA the client DMAs the layers from the arena to the GPU on a copy stream.
                reads[group[0]] = client.restore_future(ctx, _REP[methods[group[0]]], group, 0, n, device=device)
                reads[group[0]].add_done_callback(start_reads)

    start_reads()
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode():
        if r:
            kv += recompute_prefix(model, token_ids[None].to(device), r, passes)
        positions = torch.arange(n, device=device)[None]
        project = Projector(model)
        pieces = list(itertools.pairwise([0, *itertools.accumulate(passes)]))
        ropes: list = []  # per pass: the same for every layer projected
        for i in range(r, len(methods)):
            data = reads[first[i]].result()[i - first[i]]
            if i + 1 == len(methods) or first.get(i + 1) != first[i]:  # the group's last layer
                with lock:
                    del reads[first[i]]
                start_reads()
            if device.type == "cuda":  # allocated on the copy stream: keep it from reuse while this one reads it
                data.record_stream(torch.cuda.current_stream(device))
            if methods[i] == "H":
                ropes = ropes or [rope_tables(model, data[None, a:b], positions[:, a:b]) for a, b in pieces]
                parts = [project(i, data[None, a:b], positions[:, a:b], rope)
                         for (a, b), rope in zip(pieces, ropes, strict=True)]
                kv.append(parts[0] if len(parts) == 1 else
                          (torch.cat([k for k, _ in parts], 2), torch.cat([v for _, v in parts], 2)))
            else:  # [T, 2, n_kv, hd] -> K, V as [1, n_kv, T, hd]
                kv.append((data[:, 0].transpose(0, 1)[None], data[:, 1].transpose(0, 1)[None]))
    return kv, token_ids


def _read_groups(methods: list[str], start: int, most: int) -> list[list[int]]:
    """Layers from `start` on in read requests: runs of consecutive layers of one method, at most `most` each."""
    groups: list[list[int]] = []
    for i in range(start, len(methods)):
        if groups and methods[groups[-1][0]] == methods[i] and len(groups[-1]) < most:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
