"""In-memory state of the contexts the daemon holds: their streams and the state of every chunk."""

import asyncio
from dataclasses import dataclass, field

import msgpack

from hcache.daemon.slabs import SlotRef
from hcache.layout.chunks import CHUNK_TOKENS, chunk_image_size, chunk_range
from hcache.layout.geometry import Geometry, Rep, rep_from_name
from hcache.layout.wire import BAD_REQUEST, WireError


@dataclass(eq=False, slots=True)
class Chunk:
    """One 64-token chunk of one (layer, representation): how much of it is committed, durable, resident, in use,
    and which contexts reference it. A full chunk of a sharing context is owned by its content key (`ckey`) and
    may be referenced by every context of the same model and namespace whose tokens start the same way."""

    owner: "Context"  # the context that wrote it: a private chunk's header names it
    layer: int
    rep: Rep
    idx: int
    token_bytes: int
    image_size: int
    refs: dict["Context", None] = field(default_factory=dict)  # contexts whose streams hold it (insertion order)
    ckey: bytes | None = None  # its content key, once it is full and shared
    name: bytes | None = None  # its row in the index, once durable
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
    def dead(self) -> bool:
        """No context references it any more: it is neither flushed nor kept."""
        return not self.refs

    @property
    def evictable(self) -> bool:
        return not (self.dirty or self.pins or self.flushing or self.loading)

    @property
    def header_key(self) -> bytes:
        """The key its on-disk header carries: its content key when shared, else its owner's context key."""
        return self.ckey if self.ckey is not None else self.owner.key

    @property
    def label(self) -> str:
        return f"context {self.owner.ctx_id!r}, layer {self.layer}, chunk {self.idx}"

    def made_durable(self, slot: SlotRef, n_tokens: int, name: bytes) -> None:
        """The chunk's first n_tokens are durable in `slot`, indexed as `name` (a flush writes each new image to a
        fresh slot)."""
        self.disk = slot
        self.durable_tokens = n_tokens
        self.name = name


@dataclass(eq=False, slots=True)
class Stream:
    """The chunks one context holds for one (layer, representation)."""

    ctx: "Context"
    layer: int
    rep: Rep
    token_bytes: int
    image_size: int
    chunks: list[Chunk] = field(default_factory=list)

    def chunk(self, idx: int) -> Chunk:
        """The chunk at idx, a new private one of this context's where it holds none yet."""
        while len(self.chunks) <= idx:
            c = Chunk(self.ctx, self.layer, self.rep, len(self.chunks), self.token_bytes, self.image_size)
            c.refs[self.ctx] = None
            self.chunks.append(c)
        return self.chunks[idx]

    def put(self, idx: int, chunk: Chunk) -> Chunk | None:
        """Reference `chunk` at idx (the next position, or in place of the one there); returns the one replaced,
        no longer referenced by this context."""
        chunk.refs[self.ctx] = None
        if idx == len(self.chunks):
            self.chunks.append(chunk)
            return None
        old, self.chunks[idx] = self.chunks[idx], chunk
        if old is not chunk:
            old.refs.pop(self.ctx, None)
            self.ctx.unlinked.pop(old, None)
        return old

    def durable_prefix(self, pending: dict[Chunk, int]) -> int:
        """Tokens durable from position 0 on, counting `pending` (chunk -> tokens) as durable and linked; a chunk
        this context references but whose reference is not in the index yet counts as not durable."""
        total = 0
        for c in self.chunks:
            n = pending[c] if c in pending else 0 if c in self.ctx.unlinked else c.durable_tokens
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


@dataclass(slots=True)
class Usage:
    """Disk bytes of all contexts' durable chunks as if none were shared: what sharing is measured against."""

    logical: int = 0


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
    _durable: int = 0
    share: bool = True  # its full chunks are owned by content: shared with, and found by, other contexts
    writer: object | None = None  # the open append lease, at most one
    deleted: bool = False
    keys: list[bytes] = field(default_factory=list)  # content keys of its full chunks, in order (sharing only)
    unlinked: dict[Chunk, None] = field(default_factory=dict)  # referenced, the reference not yet in the index
    usage: Usage | None = None  # the daemon's total, kept as durable lengths change
    streams: list[Stream] = field(default_factory=list)
    _by_id: dict[tuple[int, Rep], Stream] = field(default_factory=dict)
    _row_bytes: int = 0  # a chunk row's images over all streams

    @property
    def durable(self) -> int:
        return self._durable

    @durable.setter
    def durable(self, n: int) -> None:
        if self.usage is not None:
            self.usage.logical += (len(chunk_range(0, n)) - len(chunk_range(0, self._durable))) * self._row_bytes
        self._durable = n

    @property
    def token_bytes(self) -> int:
        """Bytes one token takes over all its streams."""
        return sum(s.token_bytes for s in self.streams)

    @property
    def durable_bytes(self) -> int:
        """The bytes of its durable tokens, whether shared or its own."""
        return self.durable * self.token_bytes

    @property
    def disk_bytes(self) -> int:
        """The slots its durable chunks take, counting shared ones as if they were its own."""
        return len(chunk_range(0, self.durable)) * self._row_bytes

    @property
    def tokens(self) -> Stream:
        return self.streams[-1]

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
            self._row_bytes += s.image_size

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
                "created": self.created,  # tells a re-created context's chunks from its deleted namesake's
                "share": self.share}

    def packed_meta(self) -> bytes:
        return msgpack.packb(self.meta(), use_bin_type=True)

    def info(self) -> dict:
        return {"namespace": self.namespace, "ctx": self.ctx_id, "model": self.model,
                "geometry": self.geometry.to_dict(), "layers": self.layers, "n_tokens": self.n_tokens,
                "durable_tokens": self.durable, "bytes": self.durable_bytes, "created": self.created,
                "accessed": self.accessed, "pinned": self.pinned, "share": self.share,
                "streams": [[s.layer, int(s.rep)] for s in self.streams]}
