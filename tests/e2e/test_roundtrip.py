"""Bit-exact round trips through the real hcached: MHA and GQA, fp32 and bf16, 1-3 data dirs, both engines."""

import pytest
import torch

from hcache.client import HCacheClient
from tests.e2e.data import GQA, MHA, Expected, assert_restores, geometry

ROUNDS = [100, 28, 64, 1]  # 100 (not a multiple of 64), 128 (one), 192 (one), 193


@pytest.mark.parametrize("n_dirs", [1, 2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [MHA, GQA], ids=["mha", "gqa"])
def test_rounds_restore_bit_exact(daemon_factory, engine, shape, dtype, n_dirs):
    d = daemon_factory(n_dirs=n_dirs, engine=engine)
    gen = torch.Generator().manual_seed(7)
    exp = Expected(geometry(shape, dtype))
    with HCacheClient(d.socket) as c:
        assert c.status()["engine"] == engine
        c.open("chat", model="tiny", geometry=exp.geometry, layers=exp.layers)
        for n in ROUNDS:
            ids, data = exp.round(n, gen)
            assert c.append("chat", ids, data) == exp.n_tokens
            assert_restores(c, "chat", exp)  # straight from the arena, before it is durable
            c.flush("chat")
            assert c.stat("chat").durable_tokens == exp.n_tokens
    d.restart()  # cold: everything comes back from disk
    with HCacheClient(d.socket) as c:
        assert_restores(c, "chat", exp)
        assert c.status()["disk_reads"] > 0


def test_partial_ranges_and_layers(daemon):
    gen = torch.Generator().manual_seed(1)
    exp = Expected(geometry(GQA, "bfloat16"))
    with HCacheClient(daemon.socket) as c:
        c.open("r", model="tiny", geometry=exp.geometry, layers=exp.layers)
        ids, data = exp.round(300, gen)
        c.append("r", ids, data)
        c.flush()
        got = c.restore("r", "hidden", layers=[2], start=63, end=130)
        assert torch.equal(got[0], exp.all("hidden")[2, 63:130])
        got = c.restore("r", "kv", layers=[2], start=5, end=6)
        assert torch.equal(got[0], exp.all("kv")[1, 5:6])
        assert torch.equal(c.tokens("r", 64, 128), ids[64:128])


def test_flush_with_drop_sends_the_next_reads_to_disk(daemon):
    gen = torch.Generator().manual_seed(3)
    exp = Expected(geometry(MHA, "bfloat16"))
    with HCacheClient(daemon.socket) as c:
        c.open("d", model="tiny", geometry=exp.geometry, layers=exp.layers)
        c.append("d", *exp.round(150, gen))
        c.flush("d")
        before = c.status()["disk_reads"]
        assert_restores(c, "d", exp)
        assert c.status()["disk_reads"] == before  # still in the arena
        c.flush("d", drop=True)
        assert_restores(c, "d", exp)
        assert c.status()["disk_reads"] > before


def test_contexts_are_separate_and_deletable(daemon):
    gen = torch.Generator().manual_seed(2)
    a, b = Expected(geometry(MHA, "float32")), Expected(geometry(MHA, "float32"))
    with HCacheClient(daemon.socket) as c:
        for name, exp in (("a", a), ("b", b)):
            c.open(name, model="tiny", geometry=exp.geometry, layers=exp.layers)
            c.append(name, *exp.round(70, gen))
        c.flush()
        c.delete("a")
        assert [i.id for i in c.list()] == ["b"]
        assert_restores(c, "b", b)
    daemon.restart()
    with HCacheClient(daemon.socket) as c:
        assert [i.id for i in c.list()] == ["b"]
        assert_restores(c, "b", b)


def test_a_client_remembers_a_bounded_number_of_contexts_and_appends_to_the_others_all_the_same(daemon, monkeypatch):
    from hcache.client import aio

    monkeypatch.setattr(aio, "_REMEMBERED", 2)  # a serving process meets millions of contexts over its life
    gen = torch.Generator().manual_seed(3)
    contexts = {name: Expected(geometry(MHA, "float32")) for name in ("a", "b", "c")}
    with HCacheClient(daemon.socket) as c:
        for rnd in range(2):
            for name, exp in contexts.items():  # each append continues one the client has forgotten since
                if rnd == 0:
                    c.open(name, model="tiny", geometry=exp.geometry, layers=exp.layers)
                c.append(name, *exp.round(40, gen))
            assert len(c._aio._info) == 2
        for name, exp in contexts.items():
            assert_restores(c, name, exp)


def test_arena_smaller_than_the_data_applies_backpressure(daemon_factory, engine):
    """A 16 MiB arena still takes 40 MiB of saves: dirty chunks flush, clean ones make room."""
    d = daemon_factory(engine=engine, dram="16MiB")
    gen = torch.Generator().manual_seed(3)
    exp = Expected(geometry(dict(num_layers=4, hidden_size=1024, num_kv_heads=8, head_dim=128), "float32"),
                   layers={"hidden": [0, 1, 2, 3], "kv": [1]})
    with HCacheClient(d.socket) as c:
        c.open("big", model="tiny", geometry=exp.geometry, layers=exp.layers)
        for _ in range(4):
            c.append("big", *exp.round(512, gen))
        c.flush("big")
        assert_restores(c, "big", exp)
