"""Rebuild a transformers causal LM's KV cache from saved layer inputs (projection) or from tokens (recompute)."""

import hashlib
import json
import re
import weakref
from collections.abc import Sequence
from functools import reduce

import torch
from torch import nn
from transformers import DynamicCache

from hcache.client.families import KV, family_of, rotate_of
from hcache.client.layout import geometry_dtype
from hcache.layout.geometry import Geometry

# Config keys K/V depend on besides the weights and the geometry: rotary parameters (theta, scaling, the rotated
# share of a head), the input norms' epsilons, whether OPT norms before attention.
_SHAPES_KV = re.compile(r"rope|rotary|eps|norm")


class _Stop(Exception):
    """Raised by a forward pre-hook to end a forward pass after the layers that were wanted."""


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers in order; a forward pre-hook on layer i sees layer i's input hidden state."""
    family = family_of(model)
    return list(reduce(getattr, family.stack.split("."), model.base_model))


def geometry_of(model: nn.Module) -> Geometry:
    """The storage geometry of the model's decoder stack, in the model's dtype."""
    family = family_of(model)
    layers = decoder_layers(model)
    config = model.config
    attn = getattr(layers[0], family.attn)
    return Geometry(num_layers=len(layers), hidden_size=config.hidden_size,
                    num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                    head_dim=attn.head_dim, dtype=geometry_dtype(model.dtype))


def fingerprint(model: nn.Module, model_id: str | None = None) -> str:
    """A key like "LlamaModel:<32 hex>": blake2b over the base model's class, the geometry (dtype included), the
    config that shapes K/V besides the weights (rotary parameters, norms' epsilons) and model_id, or without one the
    sorted (name, shape) of the base model's state dict; the same in every process. Weight values are not read: two
    fine-tunes of one base model agree unless given model ids."""
    geometry = geometry_of(model)
    base = model.base_model
    arch = type(base).__name__
    config = {k: v for k, v in sorted(model.config.to_dict().items()) if _SHAPES_KV.search(k)}
    parts: dict[str, object] = {"arch": arch, "geometry": geometry.to_dict(), "config": config}
    if model_id is not None:
        parts["model_id"] = model_id
    else:
        parts["tensors"] = _tensor_shapes(base)
    h = hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16, person=b"hcache-model")
    return f"{arch}:{h.hexdigest()}"


_SHAPES: weakref.WeakKeyDictionary[nn.Module, list] = weakref.WeakKeyDictionary()


def _tensor_shapes(base: nn.Module) -> list:
    """The sorted (name, shape) of a model's state dict, once per model (walking the state dict cost 4.6 ms of every
    lookup, restore and capture of SmolLM2); moving the model to another dtype or device keeps them."""
    if base not in _SHAPES:
        _SHAPES[base] = sorted((name, list(t.shape)) for name, t in base.state_dict().items())
    return _SHAPES[base]


def rope_tables(model: nn.Module, hidden: torch.Tensor, position_ids: torch.Tensor) -> KV | None:
    """cos, sin of the model's rotary embedding at positions [B, T] (None for a model without one): the model
    computes them once per forward for all its layers, and so can a restore for all the layers it projects."""
    if not family_of(model).rope:
        return None
    with torch.no_grad():
        # They take the dtype of the embeddings, which is the layer inputs' one.
        return model.base_model.rotary_emb(hidden.to(model.dtype), position_ids.to(hidden.device))


class Projector:
    """project_kv for one model, with its family, layers, their devices and rotary functions looked up once: a
    restore projects every layer pass by pass, and on a GPU each call's Python is on the launch path."""

    def __init__(self, model: nn.Module) -> None:
        self.family = family_of(model)
        self.model = model
        self.dtype = model.dtype  # a property that walks the parameters
        self.layers = decoder_layers(model)
        self.devices = [next(layer.parameters()).device for layer in self.layers]
        attns = [getattr(layer, self.family.attn) for layer in self.layers]
        self.rotate = [rotate_of(self.family, attn) for attn in attns] if self.family.rope else None

    def __call__(self, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor, rope: KV | None = None) -> KV:
        """K, V [B, n_kv, T, head_dim] of `layer` from its input hidden state [B, T, D] at positions [B, T]: see
        project_kv."""
        if not 0 <= layer < len(self.layers):
            raise ValueError(f"layer must be in 0..{len(self.layers) - 1}, got {layer}")
        hidden = hidden.to(device=self.devices[layer], dtype=self.dtype)
        with torch.no_grad():
            k, v = self.family.kv(self.layers[layer], hidden)
            if self.rotate is not None:
                cos, sin = rope if rope is not None else rope_tables(self.model, hidden, position_ids)
                k = self.rotate[layer](k, cos.to(k.device), sin.to(k.device))
        return k, v


def project_kv(model: nn.Module, layer: int, hidden: torch.Tensor, position_ids: torch.Tensor,
               rope: KV | None = None) -> KV:
    """K, V [B, n_kv, T, head_dim] of `layer` from its input hidden state [B, T, D] at positions [B, T], computed by
    the layer's own modules: bit-identical to what the model's prefill of the same tokens puts in its cache.
    `rope`: rope_tables() for these positions, when the caller projects several layers (and then Projector saves
    the lookups of each call)."""
    return Projector(model)(layer, hidden, position_ids, rope)


def recompute_prefix(model: nn.Module, token_ids: torch.Tensor, n_layers: int,
                     passes: Sequence[int] | None = None) -> list[KV]:
    """K, V of layers 0..n_layers-1 over all of token_ids [1, n], by running the model's own forward that far,
    in forward passes of the given token counts (default: one) so the arithmetic is the original one."""
    layers = decoder_layers(model)
    if not 0 < n_layers <= len(layers):
        raise ValueError(f"n_layers must be in 1..{len(layers)}, got {n_layers}")
    # No config: every layer keeps its full K/V, sliding-window layers included, as project_kv returns them.
    cache = DynamicCache()
    handle = layers[n_layers].register_forward_pre_hook(_stop) if n_layers < len(layers) else None
    try:
        start = 0
        for n in passes or [token_ids.shape[1]]:
            mask = torch.ones((1, start + n), dtype=torch.long, device=token_ids.device)  # as generate passes it
            try:
                with torch.no_grad():  # the base model: no lm_head
                    model.base_model(input_ids=token_ids[:, start : start + n], attention_mask=mask, cache=cache,
                                     use_cache=True)
            except _Stop:
                pass
            start += n
    finally:
        if handle is not None:
            handle.remove()
    return [(cache.layers[i].keys, cache.layers[i].values) for i in range(n_layers)]


def build_cache(model: nn.Module, kv: list[KV]) -> DynamicCache:
    """A cache holding every layer's full K, V [B, n_kv, n, head_dim] for the first n tokens of a sequence.

    Continue with model.generate(full_ids, cache=cache) where full_ids [B, m] starts with those n tokens and
    m > n: generate feeds only full_ids[:, n:]. With m == n it would feed all n tokens again on top of the cache;
    to continue right after the cached tokens, build the cache from their first n - 1 positions instead. An
    attention_mask, if passed, covers all m tokens."""
    layers = decoder_layers(model)
    if len(kv) != len(layers):
        raise ValueError(f"build_cache needs K/V for all {len(layers)} layers, got {len(kv)}")
    # With the config, sliding-window layers keep only their window, yet count all n tokens for positions.
    return DynamicCache(ddp_cache_data=kv, config=model.config)


def _stop(module: nn.Module, args: tuple) -> None:
    raise _Stop
