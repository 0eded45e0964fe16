"""restore(): rebuild a model's KV cache for a saved context by the cheapest per-layer mix of H, KV and RE,
pipelined: reads of later layers are in flight while earlier layers are recomputed or projected."""

from __future__ import annotations

import collections
import concurrent.futures
import itertools

import torch

from hcache.client.costs import Profile
from hcache.client.errors import BadRequest, ModelMismatch
from hcache.client.layout import ContextInfo
from hcache.client.sync import HCacheClient

METHODS = ("auto", "hidden", "kv", "recompute")
_LAYERS_IN_FLIGHT = 3
_REP = {"H": "hidden", "KV": "kv"}


def choose_methods(info: ContextInfo, method: str, passes: int = 1, device: str | None = None,
                   profile: Profile | None = None) -> list[str]:
    """Per layer "RE", "H" or "KV": one method for all, or the planner's fastest plan over what is stored, for a
    context the model built in `passes` forward passes, restored on `device` (costs: `profile`, else this host's
    measured profile, else the analytical one)."""
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
    profile = (profile or profile_for(info.geometry, device)).for_passes(passes)
    return plan(info.geometry, info.n_tokens, available=available, profile=profile).methods


def restore(model: torch.nn.Module, client: HCacheClient, ctx: str, method: str = "auto",
            model_id: str | None = None, profile: Profile | None = None) -> tuple[object, torch.Tensor]:
    """A transformers cache holding context `ctx`, and its tokens as a LongTensor [1, n]; continue with
    model.generate(torch.cat([token_ids, new_ids], 1), cache=cache)."""
    from hcache.client.projection import build_cache, fingerprint, geometry_of, project_kv, recompute_prefix

    if method not in METHODS:
        raise BadRequest(f"method={method!r}: use one of {METHODS}")
    info = client.stat(ctx)
    want = fingerprint(model, model_id)
    if info.model != want or info.geometry != geometry_of(model):
        raise ModelMismatch(f"context {ctx!r} was saved by model {info.model} ({info.geometry}); this model is "
                            f"{want} ({geometry_of(model)}): restore with the model that saved it")
    n = info.n_tokens
    if n == 0:
        raise BadRequest(f"context {ctx!r} holds no tokens yet: there is nothing to restore")
    token_ids, passes = client.tokens_and_passes(ctx, n)  # passes: redo the model's arithmetic in its pieces
    device = next(model.parameters()).device
    methods = choose_methods(info, method, len(passes), device.type, profile)
    r = methods.count("RE")
    pending = collections.deque(i for i in range(r, len(methods)))
    reads: dict[int, concurrent.futures.Future] = {}

    def start_reads() -> None:
        # On CUDA the client DMAs each layer from the arena to the GPU on a copy stream: layer i+1 crosses PCIe
        # while layer i is projected.
        while pending and len(reads) < _LAYERS_IN_FLIGHT:
            i = pending.popleft()
            reads[i] = client.restore_future(ctx, _REP[methods[i]], [i], 0, n, device=device)

    start_reads()
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.inference_mode():
        if r:
            kv += recompute_prefix(model, token_ids[None].to(device), r, passes)
        positions = torch.arange(n, device=device)[None]
        bounds = [0, *itertools.accumulate(passes)]
        for i in range(r, len(methods)):
            data = reads.pop(i).result()[0]
            start_reads()
            if device.type == "cuda":  # allocated on the copy stream: keep it from reuse while this one reads it
                data.record_stream(torch.cuda.current_stream(device))
            if methods[i] == "H":
                pieces = [project_kv(model, i, data[None, a:b], positions[:, a:b])
                          for a, b in itertools.pairwise(bounds)]
                kv.append((torch.cat([k for k, _ in pieces], 2), torch.cat([v for _, v in pieces], 2)))
            else:  # [T, 2, n_kv, hd] -> K, V as [1, n_kv, T, hd]
                kv.append((data[:, 0].transpose(0, 1)[None], data[:, 1].transpose(0, 1)[None]))
    return build_cache(model, kv), token_ids[None]

