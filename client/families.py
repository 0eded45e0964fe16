"""Per model family: where a transformers causal LM keeps its decoder layers and how one layer's input becomes K/V."""

import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hcache.client.errors import UnsupportedModel

KV = tuple[torch.Tensor, torch.Tensor]
Rotate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (K, cos, sin) -> rotated K


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, n * head_dim] -> [B, n, T, head_dim], the same view + transpose the attention modules do."""
    return x.view(*x.shape[:-1], -1, head_dim).transpose(1, 2)


def _separate(layer: nn.Module, x: torch.Tensor) -> KV:
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    return _heads(attn.k_proj(h), attn.head_dim), _heads(attn.v_proj(h), attn.head_dim)


def _k_norm(layer: nn.Module, x: torch.Tensor) -> KV:
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    # Qwen3 normalises the keys per head before the transpose, as its attention does.
    k = attn.k_norm(attn.k_proj(h).view(*h.shape[:-1], -1, attn.head_dim)).transpose(1, 2)
    return k, _heads(attn.v_proj(h), attn.head_dim)


def _phi(layer: nn.Module, x: torch.Tensor) -> KV:
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    k = _heads(attn.k_proj(h), attn.head_dim)
    if attn.qk_layernorm:  # after the transpose, as Phi's attention does (Qwen3's k_norm runs before it)
        k = attn.k_layernorm(k)
    return k, _heads(attn.v_proj(h), attn.head_dim)


def _fused_qkv(layer: nn.Module, x: torch.Tensor) -> KV:
    attn = layer.self_attn
    # The whole qkv_proj runs, Q included: a GEMM over a slice of the weight is not guaranteed the same bits.
    qkv = attn.qkv_proj(layer.input_layernorm(x))
    q = attn.config.num_attention_heads * attn.head_dim
    kv = attn.num_key_value_heads * attn.head_dim
    return _heads(qkv[..., q:q + kv], attn.head_dim), _heads(qkv[..., q + kv:], attn.head_dim)


def _opt(layer: nn.Module, x: torch.Tensor) -> KV:
    attn = layer.self_attn
    h = layer.self_attn_layer_norm(x) if layer.do_layer_norm_before else x  # OPT-350m norms after attention
    return _heads(attn.k_proj(h), attn.head_dim), _heads(attn.v_proj(h), attn.head_dim)


def _gpt2(layer: nn.Module, x: torch.Tensor) -> KV:
    attn = layer.attn
    _, k, v = attn.c_attn(layer.ln_1(x)).split(attn.split_size, dim=2)
    return _heads(k, attn.head_dim), _heads(v, attn.head_dim)


@dataclass(frozen=True, slots=True)
class Family:
    """How one family's layers are laid out and turn their input into K/V (before RoPE)."""

    stack: str  # dotted path from the base model to its ModuleList of decoder layers
    attn: str  # the attention module's attribute on a decoder layer
    kv: Callable[[nn.Module, torch.Tensor], KV]  # (layer, layer input [B, T, D]) -> K, V [B, n_kv, T, head_dim]
    rope: bool  # K gets the model's rotary embedding (base_model.rotary_emb)
    # The attention itself, not its apply_rotary_pos_emb, rotates only K's first attn.rotary_ndims dims.
    partial: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family("layers", "self_attn", _separate, True),
    "mistral": Family("layers", "self_attn", _separate, True),
    "qwen2": Family("layers", "self_attn", _separate, True),
    "qwen3": Family("layers", "self_attn", _k_norm, True),
    "gemma": Family("layers", "self_attn", _separate, True),
    "gemma2": Family("layers", "self_attn", _separate, True),
    "phi": Family("layers", "self_attn", _phi, True, partial=True),
    "phi3": Family("layers", "self_attn", _fused_qkv, True),
    "opt": Family("decoder.layers", "self_attn", _opt, False),
    "gpt2": Family("h", "attn", _gpt2, False),
}


def architecture(model: nn.Module) -> str:
    """The model's class, and the checkpoint's declared architectures where they say something else."""
    name = type(model).__name__
    archs = getattr(getattr(model, "config", None), "architectures", None) or [name]
    return name if archs == [name] else f"{name} ({', '.join(archs)})"


def family_of(model: nn.Module) -> Family:
    """The model's family; UnsupportedModel unless it runs transformers' own code for one of FAMILIES."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = FAMILIES.get(model_type)
    base = getattr(model, "base_model", None)
    # Bit-exactness was checked against transformers' own modeling code only, not remote code of the same type.
    if family is None or type(base).__module__ != f"transformers.models.{model_type}.modeling_{model_type}":
        raise UnsupportedModel(f"{architecture(model)} (model_type {model_type!r}) is not supported: hcache can "
                               f"rebuild K/V only for transformers' own {', '.join(sorted(FAMILIES))} models: "
                               "use a model of one of these families")
    return family


def rotate_of(family: Family, attn: nn.Module) -> Rotate:
    """K rotated as the attention module rotates it, by the apply_rotary_pos_emb its own modeling file calls."""
    apply = sys.modules[type(attn).__module__].apply_rotary_pos_emb

    def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # apply_rotary_pos_emb rotates (q, k) independently; an empty q costs no kernels.
        return apply(k[:, :0], k, cos, sin)[1]

    if not family.partial:
        return rotate
    n = attn.rotary_ndims

    def rotate_share(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return torch.cat((rotate(k[..., :n], cos, sin), k[..., n:]), dim=-1)

    return rotate_share
