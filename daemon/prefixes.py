"""Shared prefixes: full chunks owned by content key, and which contexts hold the prefix each key names."""

from hcache.daemon.contexts import Chunk, Context
from hcache.layout.chunks import CHUNK_TOKENS
from hcache.layout.geometry import Rep
from hcache.layout.keys import chunk_content_key, prefix_domain, prefix_keys

TOKEN_ID_BYTES = 4  # the id half of a token record; keys are computed over ids only


class Prefixes:
    """An index by content key, never a scan of contexts: lookups cost the chunks matched, whatever is held."""

    def __init__(self) -> None:
        self.holders: dict[bytes, dict[Context, None]] = {}  # key -> contexts whose first chunks it names
        self.chunks: dict[tuple[bytes, int, Rep], Chunk] = {}  # (key, layer, rep) -> its shared chunk

    @staticmethod
    def domain(ctx: Context) -> bytes:
        return prefix_domain(ctx.model, ctx.namespace)

    def lookup(self, model: str, namespace: str, token_ids: bytes) -> tuple[int, Context | None]:
        """How many leading tokens of `token_ids` (int32 little-endian) a context holds, in whole chunks, and the
        context that took them last (not a walk over them: a system prompt may be held by every context)."""
        found: dict[Context, None] | None = None
        n = 0
        for key in prefix_keys(prefix_domain(model, namespace), token_ids, CHUNK_TOKENS * TOKEN_ID_BYTES):
            holders = self.holders.get(key)
            if not holders:
                break
            found, n = holders, n + CHUNK_TOKENS
        if found is None:
            return 0, None
        return n, next(reversed(found))

    def next_key(self, ctx: Context, token_ids: bytes) -> bytes:
        """The content key of the context's next full chunk, whose ids these are."""
        return chunk_content_key(self.domain(ctx), ctx.keys[-1] if ctx.keys else None, token_ids)

    def hold(self, ctx: Context, key: bytes) -> list[Chunk]:
        """The context's chunk row len(ctx.keys) is full, with this key: it is found by lookups from now on, and
        each of its layer chunks becomes the shared one for the key, or is replaced by the shared one that exists
        (first writer wins). Returns the chunks this context no longer references."""
        idx = len(ctx.keys)
        ctx.keys.append(key)
        self.holders.setdefault(key, {})[ctx] = None
        replaced = []
        for s in ctx.streams:
            if s.rep is Rep.TOKENS:
                continue  # a context's token ids stay its own: they name it on disk, for fsck --rebuild
            own = s.chunks[idx]
            shared = self.chunks.get((key, s.layer, s.rep))
            if shared is None:
                own.ckey = key
                self.chunks[(key, s.layer, s.rep)] = own
            elif shared is not own:
                s.put(idx, shared)
                if shared.durable_tokens:
                    ctx.unlinked[shared] = None
                replaced.append(own)
        return replaced

    def register(self, ctx: Context, idx: int, key: bytes) -> None:
        """At start-up: the context held chunk row idx under this key, its shared chunks already in place."""
        while len(ctx.keys) <= idx:
            ctx.keys.append(b"")
        ctx.keys[idx] = key
        self.holders.setdefault(key, {})[ctx] = None
        for s in ctx.streams:
            c = s.chunks[idx] if idx < len(s.chunks) else None
            if c is not None and c.ckey is not None:
                self.chunks.setdefault((c.ckey, c.layer, c.rep), c)

    def release(self, ctx: Context, first: int) -> None:
        """The context no longer holds its chunk rows from `first` on."""
        for key in ctx.keys[first:]:
            holders = self.holders.get(key)
            if holders is not None:
                holders.pop(ctx, None)
                if not holders:
                    del self.holders[key]
        del ctx.keys[first:]

    def forget(self, chunk: Chunk) -> None:
        """A shared chunk no context references any more."""
        if chunk.ckey is not None and self.chunks.get((chunk.ckey, chunk.layer, chunk.rep)) is chunk:
            del self.chunks[(chunk.ckey, chunk.layer, chunk.rep)]
