"""Random contexts for round-trip tests: MHA and GQA geometries, hidden and K/V per layer."""

from dataclasses import dataclass, field

import torch

from hcache.client.layout import TORCH_DTYPES
from hcache.layout.geometry import Geometry

MHA = dict(num_layers=3, hidden_size=128, num_kv_heads=4, head_dim=32)  # n_kv * head_dim == hidden
GQA = dict(num_layers=3, hidden_size=192, num_kv_heads=2, head_dim=32)  # 6 query heads share 2 KV heads
LAYERS = {"hidden": [0, 1, 2], "kv": [0, 2]}


@dataclass
class Expected:
    """What a context should hold: everything appended so far, per representation."""

    geometry: Geometry
    layers: dict[str, list[int]] = field(default_factory=lambda: {k: list(v) for k, v in LAYERS.items()})
    tokens: list[torch.Tensor] = field(default_factory=list)
    hidden: list[torch.Tensor] = field(default_factory=list)
    kv: list[torch.Tensor] = field(default_factory=list)

    def round(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Make the next n tokens' data, remember it, and return it as append() takes it."""
        g = self.geometry
        dtype = TORCH_DTYPES[g.dtype]
        ids = torch.randint(0, 50_000, (n,), generator=gen)
        h = torch.randn(len(self.layers["hidden"]), n, g.hidden_size, generator=gen).to(dtype)
        kv = torch.randn(len(self.layers["kv"]), n, 2, g.num_kv_heads, g.head_dim, generator=gen).to(dtype)
        self.tokens.append(ids)
        self.hidden.append(h)
        self.kv.append(kv)
        return ids, {"hidden": h, "kv": kv}

    @property
    def n_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    def all(self, rep: str) -> torch.Tensor:
        return torch.cat(getattr(self, rep), dim=1)


def geometry(shape: dict, dtype: str) -> Geometry:
    return Geometry(dtype=dtype, **shape)


def assert_restores(client, ctx: str, exp: Expected, n_tokens: int | None = None) -> None:
    """Every representation and the token ids come back bit-exact (the first n_tokens of them)."""
    n = exp.n_tokens if n_tokens is None else n_tokens
    assert client.stat(ctx).n_tokens == n
    for rep in ("hidden", "kv"):
        got = client.restore(ctx, rep)
        want = exp.all(rep)[:, :n]
        assert got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8)), f"{rep} differs"
    assert torch.equal(client.tokens(ctx), torch.cat(exp.tokens)[:n])
