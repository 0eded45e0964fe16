"""Client-side shapes: what a context stores, and how tensors map onto streams of bytes per token."""

from dataclasses import dataclass

import torch

from hcache.layout.geometry import Geometry, Rep, rep_from_name

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def geometry_dtype(dtype: torch.dtype) -> str:
    for name, t in TORCH_DTYPES.items():
        if t == dtype:
            return name
    raise ValueError(f"dtype {dtype} cannot be stored: use one of {sorted(TORCH_DTYPES)}")


@dataclass(frozen=True, slots=True)
class ContextInfo:
    """What the daemon says about a context."""

    namespace: str
    id: str
    model: str
    geometry: Geometry
    layers: dict[str, list[int]]
    n_tokens: int
    durable_tokens: int
    streams: list[tuple[int, Rep]]
    raw: dict

    @classmethod
    def from_reply(cls, r: dict) -> "ContextInfo":
        return cls(r["namespace"], r["ctx"], r["model"], Geometry.from_dict(r["geometry"]), r["layers"],
                   r["n_tokens"], r["durable_tokens"], [(layer, Rep(rep)) for layer, rep in r["streams"]], r)

    def token_bytes(self, rep: Rep) -> int:
        return self.geometry.token_bytes(rep)

    def item_shape(self, rep: Rep) -> tuple[int, ...]:
        """Shape of one token of one layer as a tensor of the model's dtype."""
        g = self.geometry
        return (g.hidden_size,) if rep is Rep.HIDDEN else (2, g.num_kv_heads, g.head_dim)


@dataclass(frozen=True, slots=True)
class PrefixMatch:
    """How many leading tokens of a request hcached holds, and a context that holds them (None when none)."""

    n_tokens: int
    ctx: str | None


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a restored cache came from (set on it as `hcache_origin`): a capture into a new context forks that."""

    namespace: str
    ctx: str
    n_tokens: int


def stream_bytes(t: torch.Tensor, n_layers: int, n_tokens: int, token_bytes: int, what: str) -> torch.Tensor:
    """A tensor [layers, tokens, ...] as uint8 [layers, tokens, token_bytes], each layer's tokens contiguous (copied
    only where they are not), checking its size."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.dim() < 2 or t.shape[0] != n_layers or t.shape[1] != n_tokens:
        raise ValueError(f"{what}: expected a tensor [{n_layers} layers, {n_tokens} tokens, ...], got "
                         f"{list(t.shape)}")
    if t.numel() * t.element_size() != n_layers * n_tokens * token_bytes:
        raise ValueError(f"{what}: each token of each layer must take {token_bytes} bytes, got "
                         f"{t[0, 0].numel() * t.element_size()} (check hidden size, heads and dtype)")
    t = t.reshape(n_layers, n_tokens, -1)
    if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
        t = t.contiguous()
    return t.view(torch.uint8)


def rep_of(name: str) -> Rep:
    rep = rep_from_name(name)
    if rep is Rep.TOKENS:
        raise ValueError("token ids are passed as token_ids, not as a representation")
    return rep
