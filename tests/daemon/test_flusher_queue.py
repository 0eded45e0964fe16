"""The flusher's queue: a chunk taken into a batch is never taken into a second one while in flight."""

from hcache.daemon.contexts import Context
from hcache.daemon.flusher import Flusher
from hcache.layout.chunks import CHUNK_TOKENS
from hcache.layout.geometry import Geometry


def _dirty_context() -> Context:
    g = Geometry(num_layers=2, hidden_size=64, num_kv_heads=2, head_dim=32, dtype="float32")
    ctx = Context(b"k" * 16, "default", "c", "tiny", g, {"hidden": [0, 1]}, 0.0, 0.0)
    for s in ctx.streams:
        for i in range(3):
            c = s.chunk(i)
            c.n_tokens = CHUNK_TOKENS
            c.arena_off = 0
    ctx.n_tokens = 3 * CHUNK_TOKENS  # committed, none durable yet
    return ctx


def test_arena_pressure_does_not_queue_a_taken_chunk_for_a_second_batch():
    ctx = _dirty_context()
    flusher = Flusher(cache=None, dirs=[], index=None, batch_bytes=1 << 40, space=None)
    flusher.add_all_dirty([ctx])
    first = flusher._take_batch()
    assert len(first) == 9
    flusher.add_all_dirty([ctx])  # what arena pressure does while the first batch waits for its IO slot
    assert flusher._take_batch() == []
    for c in first:  # once written, the chunks are clean and leave the queue
        c.flushing = False
        c.durable_tokens = c.n_tokens
    assert flusher._take_batch() == []
    assert not flusher.queue
