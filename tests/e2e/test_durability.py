"""Durability through the real hcached: restarts, kill -9, placement over data dirs, corruption on disk."""

import pytest
import torch

from hcache.client import CorruptChunk, HCacheClient
from hcache.layout.chunks import HEADER_SIZE, chunk_image_size
from hcache.layout.geometry import TOKEN_RECORD_BYTES, Rep
from tests.e2e.data import GQA, MHA, Expected, assert_restores, geometry
from tests.e2e.disk import flip_byte, scan


def _save(c: HCacheClient, exp: Expected, gen: torch.Generator, rounds: list[int], ctx: str = "chat") -> None:
    c.open(ctx, model="tiny", geometry=exp.geometry, layers=exp.layers)
    for n in rounds:
        c.append(ctx, *exp.round(n, gen))


def test_clean_restart_keeps_everything_committed(daemon):
    """SIGTERM flushes what was committed, tails included, without an explicit flush."""
    gen = torch.Generator().manual_seed(11)
    exp = Expected(geometry(MHA, "bfloat16"))
    with HCacheClient(daemon.socket) as c:
        _save(c, exp, gen, [130, 7])
    assert daemon.stop() == 0
    daemon.start()
    with HCacheClient(daemon.socket) as c:
        assert_restores(c, "chat", exp)


def test_a_context_reports_the_bytes_of_its_durable_tokens_across_a_restart(daemon_factory):
    d = daemon_factory()
    exp = Expected(geometry(MHA, "bfloat16"))
    per_token = (len(exp.layers["hidden"]) * exp.geometry.token_bytes(Rep.HIDDEN)
                 + len(exp.layers["kv"]) * exp.geometry.token_bytes(Rep.KV) + TOKEN_RECORD_BYTES)
    with HCacheClient(d.socket) as c:
        _save(c, exp, torch.Generator().manual_seed(10), [100, 50])
        c.flush("chat")
        assert c.stat("chat").raw["bytes"] == 150 * per_token
        c.append("chat", *exp.round(14, torch.Generator().manual_seed(1)))  # the second chunk's tail grows
        c.flush("chat")
        assert c.stat("chat").raw["bytes"] == 164 * per_token
    d.kill()
    d.start()
    with HCacheClient(d.socket) as c:
        assert c.stat("chat").raw["bytes"] == 164 * per_token


def test_kill9_after_durable_ack_restores_bit_exact(daemon_factory, engine):
    d = daemon_factory(n_dirs=2, engine=engine)
    gen = torch.Generator().manual_seed(12)
    exp = Expected(geometry(GQA, "float32"))
    with HCacheClient(d.socket) as c:
        _save(c, exp, gen, [100, 50])
        c.flush("chat")  # durable: 150 tokens, the tail padded on disk
        durable = exp.n_tokens
        c.append("chat", *exp.round(90, gen))  # committed, not flushed
    d.kill()
    d.start()
    with HCacheClient(d.socket) as c:
        n = c.stat("chat").n_tokens
        assert durable <= n <= exp.n_tokens
        assert n == durable or n % 64 == 0  # whatever survived beyond the ack is whole chunks
        assert_restores(c, "chat", exp, n_tokens=n)
        # the next round appends after what survived, and that is durable too
        exp = Expected(exp.geometry, tokens=[torch.cat(exp.tokens)[:n]], hidden=[exp.all("hidden")[:, :n]],
                       kv=[exp.all("kv")[:, :n]])
        c.append("chat", *exp.round(40, gen))
        c.flush("chat")
    d.kill()
    d.start()
    with HCacheClient(d.socket) as c:
        assert_restores(c, "chat", exp)


def test_rewritten_tail_survives_kill9(daemon):
    """A tail flushed, extended and flushed again: the index switches to the new copy only once durable."""
    gen = torch.Generator().manual_seed(13)
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(daemon.socket) as c:
        for n in (10, 20, 30):
            if n == 10:
                _save(c, exp, gen, [n])
            else:
                c.append("chat", *exp.round(n, gen))
            c.flush("chat")
    daemon.kill()
    daemon.start()
    with HCacheClient(daemon.socket) as c:
        assert_restores(c, "chat", exp)
        used = sum(d["used"] for d in c.status()["data_dirs"])
    # each stream holds exactly one chunk on disk: the old tail copies were given back, not leaked
    g = exp.geometry
    reps = [Rep.HIDDEN] * len(exp.layers["hidden"]) + [Rep.KV] * len(exp.layers["kv"]) + [Rep.TOKENS]
    assert used == sum(chunk_image_size(g.token_bytes(r)) for r in reps)


@pytest.mark.parametrize("n_dirs", [2, 3])
def test_chunks_of_one_layer_spread_over_all_data_dirs(daemon_factory, n_dirs):
    d = daemon_factory(n_dirs=n_dirs)
    gen = torch.Generator().manual_seed(14)
    exp = Expected(geometry(MHA, "bfloat16"))
    with HCacheClient(d.socket) as c:
        _save(c, exp, gen, [64 * 6])
        c.flush("chat")
    for layer in exp.layers["hidden"]:
        dirs_holding = {i for i, dd in enumerate(d.data_dirs) for o in scan(dd)
                        if o.header.layer == layer and o.header.rep is Rep.HIDDEN}
        assert dirs_holding == set(range(n_dirs))
    for i, dd in enumerate(d.data_dirs):  # chunk c of layer l on dir (l + c) mod D
        for o in scan(dd):
            if o.header.rep is Rep.HIDDEN:
                assert (o.header.layer + o.header.chunk) % n_dirs == i


def test_corrupted_chunk_is_reported_never_returned(daemon):
    gen = torch.Generator().manual_seed(15)
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(daemon.socket) as c:
        _save(c, exp, gen, [200])
        c.flush("chat")
    daemon.stop()
    victim = next(o for o in scan(daemon.data_dirs[0])
                  if o.header.layer == 1 and o.header.rep is Rep.HIDDEN and o.header.chunk == 2)
    flip_byte(victim.path, victim.offset + HEADER_SIZE + 100)
    daemon.start()
    with HCacheClient(daemon.socket) as c:
        with pytest.raises(CorruptChunk, match="layer 1, chunk 2"):
            c.restore("chat", "hidden", layers=[1])
        with pytest.raises(CorruptChunk):
            c.restore("chat", "hidden", layers=[1], start=128, end=129)
        # everything else still restores, and the daemon keeps serving
        got = c.restore("chat", "hidden", layers=[0, 2])
        assert torch.equal(got, exp.all("hidden")[[0, 2]])
        assert torch.equal(c.restore("chat", "hidden", layers=[1], end=128), exp.all("hidden")[1:2, :128])
        assert torch.equal(c.restore("chat", "kv"), exp.all("kv"))
        assert c.status()["contexts"] == 1
