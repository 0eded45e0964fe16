"""In-memory state of the contexts the daemon holds: their streams and the state of every chunk."""

import asyncio
from dataclasses import dataclass, field

import msgpack

from hcache.daemon.slabs import SlotRef
from hcache.layout.chunks import CHUNK_TOKENS, chunk_image_size
from hcache.layout.geometry import Geometry, Rep, rep_from_name
from hcache.layout.wire import BAD_REQUEST, WireError


@dataclass(eq=False, slots=True)
class Chunk:
    """One 64-token chunk of one stream: how much of it is committed, durable, resident, in use."""

    stream: "Stream"
    idx: int
    n_tokens: int = 0  # committed (in the arena, or on disk)
    durable_tokens: int = 0  # of those, written, synced and indexed
    disk: SlotRef | None = None
    arena_off: int | None = None
    pins: int = 0
    flushing: bool = False
    loading: asyncio.Future | None = None
    error: str = ""

    @property
    def dirty(self) -> bool:
        return self.n_tokens > self.durable_tokens

    @property
    def evictable(self) -> bool:
        return not (self.dirty or self.pins or self.flushing or self.loading)

    def made_durable(self, slot: SlotRef, n_tokens: int) -> None:
        """The chunk's first n_tokens are durable in `slot` (a flush writes each new image to a fresh one)."""
        ctx = self.stream.ctx
        ctx.disk_bytes += slot.slot_size - (self.disk.slot_size if self.disk is not None else 0)
        ctx.durable_bytes += (n_tokens - self.durable_tokens) * self.stream.token_bytes
        self.disk = slot
        self.durable_tokens = n_tokens


@dataclass(eq=False, slots=True)
class Stream:
    """The chunks of one (layer, representation) of a context."""

    ctx: "Context"
    layer: int
    rep: Rep
    token_bytes: int
    image_size: int
    chunks: list[Chunk] = field(default_factory=list)

    def chunk(self, idx: int) -> Chunk:
        while len(self.chunks) <= idx:
            self.chunks.append(Chunk(self, len(self.chunks)))
        return self.chunks[idx]

    def durable_prefix(self, pending: dict[Chunk, int]) -> int:
        """Tokens durable from position 0 on, counting `pending` (chunk -> tokens) as already durable."""
        total = 0
        for c in self.chunks:
            n = pending.get(c, c.durable_tokens)
            total += n
            if n < CHUNK_TOKENS:
                break
        return total


def parse_layers(spec: object, geometry: Geometry) -> dict[str, list[int]]:
    """Validate which layers keep which representation: {"hidden": [...], "kv": [...]}."""
    if not isinstance(spec, dict):
        raise WireError(BAD_REQUEST, "layers must be a map like {'hidden': [0, 1], 'kv': [2]}")
    layers: dict[str, list[int]] = {}
    for name, items in spec.items():
        if name not in ("hidden", "kv"):
            raise WireError(BAD_REQUEST, f"layers: unknown representation {name!r} (use 'hidden' or 'kv')")
        if not isinstance(items, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            raise WireError(BAD_REQUEST, f"layers[{name!r}] must be a list of layer numbers")
        bad = [i for i in items if not 0 <= i < geometry.num_layers]
        if bad or len(set(items)) != len(items):
            raise WireError(BAD_REQUEST, f"layers[{name!r}] has repeated layers or layers outside "
                                         f"0..{geometry.num_layers - 1}: {bad or items}")
        layers[name] = sorted(items)
    return layers


@dataclass(eq=False)
class Context:
    """A saved conversation: model, geometry, which layers keep what, and its streams."""

    key: bytes
    namespace: str
    ctx_id: str
    model: str
    geometry: Geometry
    layers: dict[str, list[int]]
    created: float
    accessed: float
    pinned: bool = False
    n_tokens: int = 0  # committed
    durable: int = 0
    writer: object | None = None  # the open append lease, at most one
    # Kept as chunks become durable, not summed over every chunk per request: the slots its chunks hold on disk,
    # and its durable tokens' bytes.
    disk_bytes: int = 0
    durable_bytes: int = 0
    deleted: bool = False
    streams: list[Stream] = field(default_factory=list)
    _by_id: dict[tuple[int, Rep], Stream] = field(default_factory=dict)

    @property
    def dirty(self) -> bool:
        """Some committed token is not durable yet; only then does a chunk of it need flushing."""
        return self.durable < self.n_tokens

    def __post_init__(self) -> None:
        order = [(layer, rep_from_name(name)) for name in ("hidden", "kv") for layer in self.layers.get(name, [])]
        order.append((self.geometry.num_layers, Rep.TOKENS))  # token ids: one extra stream
        for layer, rep in order:
            tb = self.geometry.token_bytes(rep)
            s = Stream(self, layer, rep, tb, chunk_image_size(tb))
            self.streams.append(s)
            self._by_id[(layer, rep)] = s

    def stream(self, layer: int, rep: int) -> Stream:
        try:
            return self._by_id[(layer, Rep(rep))]
        except (KeyError, ValueError):
            raise WireError(BAD_REQUEST, f"context {self.ctx_id!r} stores no representation {rep} for layer "
                                         f"{layer}; it stores {self.layers}") from None

    def meta(self) -> dict:
        """What chunk headers and the index carry to describe this context."""
        return {"ns": self.namespace, "id": self.ctx_id, "model": self.model,
                "geometry": self.geometry.to_dict(), "layers": self.layers,
                "created": self.created}  # tells a re-created context's chunks from its deleted namesake's

    def packed_meta(self) -> bytes:
        return msgpack.packb(self.meta(), use_bin_type=True)

    def info(self) -> dict:
        return {"namespace": self.namespace, "ctx": self.ctx_id, "model": self.model,
                "geometry": self.geometry.to_dict(), "layers": self.layers, "n_tokens": self.n_tokens,
                "durable_tokens": self.durable, "bytes": self.durable_bytes, "created": self.created,
                "accessed": self.accessed, "pinned": self.pinned,
                "streams": [[s.layer, int(s.rep)] for s in self.streams]}
