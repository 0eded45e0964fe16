"""Shared prefixes through the real hcached: lookup by tokens, restore of the longest stored prefix, contexts built on
it that share its chunks, fork, truncate, an edited turn, space, eviction and SIGKILL."""

import pytest
import torch
import transformers as tf

from hcache.client import ContextChanged, HCacheClient
from hcache.client.projection import fingerprint
from hcache.transformers import capture, lookup, restore

VOCAB = 128
PREFIX = 2048
METHODS = ("hidden", "kv", "recompute", "auto")


def _model(kv_heads: int, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                            num_key_value_heads=kv_heads, vocab_size=VOCAB, max_position_embeddings=4096)
    return tf.LlamaForCausalLM(config).eval()


def _ids(seed: int, n: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _kv(cache: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


def _assert_same(cache: object, own: list[tuple[torch.Tensor, torch.Tensor]], what: str) -> None:
    for i, (k, v) in enumerate(own):
        assert torch.equal(cache.layers[i].keys, k), (what, i)
        assert torch.equal(cache.layers[i].values, v), (what, i)


def _assert_close(cache: object, own: list[tuple[torch.Tensor, torch.Tensor]], what: object) -> None:
    for i, (k, v) in enumerate(own):
        assert torch.allclose(cache.layers[i].keys, k, atol=1e-5), (what, i)
        assert torch.allclose(cache.layers[i].values, v, atol=1e-5), (what, i)


def _extend(model: torch.nn.Module, client: HCacheClient, ctx: str, ids: torch.Tensor
            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """What an engine does with a new request: restore the longest stored prefix, run the rest under capture of a
    new context; returns the model's own cache after it."""
    cache, held = restore(model, client, tokens=ids, method="kv")
    with capture(model, client, ctx), torch.no_grad():
        out = model(ids[:, held.shape[1]:], cache=cache, use_cache=True)
    return _kv(out.cache)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_contexts_on_one_prefix_share_it_and_restore_exactly(daemon_factory, kv_heads):
    # 4 layers: each context's own token ids (8 KiB per 64 tokens, the prefix's too) are 1/9 of a GQA row here;
    # a real model's rows are hundreds of times larger.
    model = _model(kv_heads, layers=4)
    d = daemon_factory(engine="threads", dram="512MiB")
    prefix, n_ctx, own_tokens = _ids(1, PREFIX), 200, 256
    with HCacheClient(d.socket) as client:
        assert lookup(model, client, prefix) == 0
        with capture(model, client, "first", store="both"), torch.no_grad():
            model(prefix, use_cache=True)
        assert lookup(model, client, prefix) == PREFIX
        assert lookup(model, client, torch.cat([prefix, _ids(2, 100)], 1)) == PREFIX
        assert lookup(model, client, _ids(3, PREFIX)) == 0
        assert lookup(model, client, prefix[:, :1000]) == 960  # whole chunks
        own = {}
        for i in range(n_ctx):
            own[f"c{i}"] = _extend(model, client, f"c{i}", torch.cat([prefix, _ids(100 + i, own_tokens)], 1))
        status = client.status()
        row = client.stat("c0")
        per_row = sum(s["stored"] for s in _row_bytes(client, "c0"))
        assert row.n_tokens == PREFIX + own_tokens
        expected = (PREFIX // 64 + n_ctx * own_tokens // 64) * per_row
        assert status["used"] <= 1.2 * expected, (status["used"], expected)
        assert status["logical"] > 5 * status["used"]  # every context counts the prefix as its own
        placement = client.stat("c7", detail=True).raw["placement"]
        assert all(s["shared"] == PREFIX // 64 for s in placement if s["rep"] != "tokens")

        def check(which: list[str], methods: tuple[str, ...]) -> None:
            for ctx in which:
                for method in methods:
                    cache, got = restore(model, client, ctx, method=method, exact=True)
                    assert got.shape[1] == PREFIX + own_tokens
                    _assert_same(cache, own[ctx], (ctx, method))

        check(list(own), ("kv",))
        check([f"c{i}" for i in range(0, n_ctx, 20)], METHODS)
        client.delete("first")
        check(["c0", "c199"], METHODS)
    d.kill()
    d.start()
    with HCacheClient(d.socket) as client:
        assert lookup(model, client, prefix) == PREFIX
        check(list(own), ("kv",))
        check([f"c{i}" for i in range(5, n_ctx, 40)], METHODS)
        fsck = client._run(client._aio._call("fsck"))[0]
        assert not fsck["problems"] and fsck["leaked"] == 0 and fsck["dangling"] == 0, fsck
        for ctx in own:
            client.delete(ctx)
        assert client.status()["used"] == 0
        assert lookup(model, client, prefix) == 0


def _row_bytes(client: HCacheClient, ctx: str) -> list[dict]:
    """Per stream of a context, the bytes one 64-token chunk image takes on disk."""
    info = client.stat(ctx)
    from hcache.layout.chunks import chunk_image_size

    return [{"stored": chunk_image_size(info.token_bytes(rep))} for _, rep in info.streams]


def test_fork_and_truncate(daemon_factory):
    model = _model(2)
    d = daemon_factory(engine="threads")
    ids = _ids(5, 300)
    with HCacheClient(d.socket) as client:
        with capture(model, client, "src", store="both"), torch.no_grad():
            full = _kv(model(ids, use_cache=True).cache)
        client.fork("src", "half", 150)  # two shared chunks and a partial one, copied
        client.fork("src", "whole", 300)
        client.truncate("src", 100)
        for ctx, n in (("half", 150), ("whole", 300), ("src", 100)):
            for method in METHODS:
                cache, got = restore(model, client, ctx, method=method, exact=True)
                assert torch.equal(got, ids[:, :n])
                kv = [(k[:, :, :n], v[:, :, :n]) for k, v in full]
                if method in ("kv", "hidden"):
                    _assert_same(cache, kv, (ctx, method))
                else:  # recomputing part of a pass attends over fewer tokens than it did: equal up to rounding
                    _assert_close(cache, kv, (ctx, method))
        placement = client.stat("whole", detail=True).raw["placement"]
        # of its 4 full chunks, half references 2 and src (cut to 100 tokens) 1; the other 2 are whole's alone now
        assert all(s["shared"] == 2 for s in placement if s["rep"] != "tokens")
        client.delete("src")
        client.truncate("whole", 64)
        cache, got = restore(model, client, "half", method="kv")
        _assert_same(cache, [(k[:, :, :150], v[:, :, :150]) for k, v in full], "half after src went")
        d.kill()
        d.start()
    with HCacheClient(d.socket) as client:
        assert client.stat("whole").n_tokens == 64
        cache, _ = restore(model, client, "half", method="hidden", exact=True)
        _assert_same(cache, [(k[:, :, :150], v[:, :, :150]) for k, v in full], "half after restart")
        fsck = client._run(client._aio._call("fsck"))[0]
        assert not fsck["problems"] and fsck["leaked"] == 0 and fsck["dangling"] == 0, fsck


def test_an_edited_turn_keeps_the_common_prefix(daemon_factory):
    model = _model(2)
    d = daemon_factory(engine="threads")
    first = _ids(7, 200)
    edited = torch.cat([first[:, :130], _ids(8, 50)], 1)
    with HCacheClient(d.socket) as client:
        with capture(model, client, "chat", store="kv"), torch.no_grad():
            model(first, use_cache=True)
        with capture(model, client, "chat", store="kv"), torch.no_grad():  # prefilled anew, edited at 130
            own = _kv(model(edited, use_cache=True).cache)
        cache, got = restore(model, client, "chat", method="kv")
        assert torch.equal(got, edited)
        # the 130 tokens in common keep the first prefill's bits: equal to the second's up to rounding
        _assert_close(cache, own, "edited")
        for i, (k, _) in enumerate(own):
            assert torch.equal(cache.layers[i].keys[:, :, 130:], k[:, :, 130:]), i  # the edit is saved as computed


def test_a_context_that_prefilled_a_stored_prefix_shares_it(daemon_factory):
    model = _model(2)
    d = daemon_factory(engine="threads")
    ids = _ids(9, 200)
    with HCacheClient(d.socket) as client:
        with capture(model, client, "a", store="kv"), torch.no_grad():
            model(ids, use_cache=True)
        with capture(model, client, "b", store="kv"), torch.no_grad():
            own = _kv(model(ids, use_cache=True).cache)
        with capture(model, client, "private", store="kv", share=False), torch.no_grad():
            model(ids, use_cache=True)
        placement = client.stat("b", detail=True).raw["placement"]
        assert all(s["shared"] == 3 for s in placement if s["rep"] == "kv")
        assert all(s["shared"] == 0 for s in client.stat("private", detail=True).raw["placement"])
        cache, _ = restore(model, client, "b", method="kv")
        _assert_same(cache, own, "b")  # one pass each: the first writer's bits are b's own here
        assert client.lookup(fingerprint(model), ids) == 192


def test_restore_without_a_stored_prefix_gives_an_empty_cache(daemon_factory):
    model = _model(2)
    d = daemon_factory(engine="threads")
    with HCacheClient(d.socket) as client:
        cache, got = restore(model, client, tokens=_ids(11, 100))
        assert got.shape == (1, 0) and cache.get_seq_length() == 0
        with torch.no_grad():
            prefilled = model(_ids(11, 100), use_cache=True).cache
        with pytest.raises(ContextChanged):  # a cache not from a restore: nothing to fork from
            with capture(model, client, "x"), torch.no_grad():
                model(_ids(12, 5), cache=prefilled, use_cache=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_prefix_prefilled_again_comes_back_within_rounding(daemon_factory, dtype):
    """Two conversations prefilled on their own share the chunks of their common start: the second gets the
    first's bits, equal to its own up to rounding, and continues greedily the same."""
    model = _model(2, layers=4).to(dtype)
    d = daemon_factory(engine="threads")
    common = _ids(20, 200)
    a, b = torch.cat([common, _ids(21, 90)], 1), torch.cat([common, _ids(22, 40)], 1)
    with HCacheClient(d.socket) as client:
        with capture(model, client, "a", store="kv"), torch.no_grad():
            model(a, use_cache=True)
        with capture(model, client, "b", store="kv"), torch.no_grad():
            own = model(b, use_cache=True).cache
        cache, _ = restore(model, client, "b", method="kv")
        worst = max(float((cache.layers[i].keys - own.layers[i].keys).abs().max()) for i in range(4))
        worst = max(worst, *(float((cache.layers[i].values - own.layers[i].values).abs().max()) for i in range(4)))
        assert worst <= (1e-5 if dtype == torch.float32 else 2e-2), worst
        assert torch.equal(cache.layers[0].keys, own.layers[0].keys)  # a layer's input is the embedding: exact
        step = torch.cat([b, _ids(23, 3)], 1)
        with torch.no_grad():
            mine = model.generate(step, cache=own, max_new_tokens=16, do_sample=False, pad_token_id=0)
            shared = model.generate(step, cache=cache, max_new_tokens=16, do_sample=False, pad_token_id=0)
        assert torch.equal(mine, shared)


def test_rebuild_recovers_shared_chunks_and_every_reference(daemon_factory):
    from tests.e2e.data import GQA, Expected, assert_restores, geometry

    d = daemon_factory(engine="threads", n_dirs=2)
    gen = torch.Generator().manual_seed(30)
    base = Expected(geometry(GQA, "float32"))

    def prefix(n: int) -> Expected:
        return Expected(base.geometry, tokens=[torch.cat(base.tokens)[:n]], hidden=[base.all("hidden")[:, :n]],
                        kv=[base.all("kv")[:, :n]])

    with HCacheClient(d.socket) as c:
        c.open("base", model="m", geometry=base.geometry, layers=base.layers)
        c.append("base", *base.round(200, gen))
        c.flush("base")
        c.fork("base", "f", 130)
        f = prefix(130)
        c.append("f", *f.round(100, gen))
        same = prefix(192)
        c.open("same", model="m", geometry=base.geometry, layers=base.layers)
        c.append("same", torch.cat(same.tokens), {"hidden": same.all("hidden"), "kv": same.all("kv")})
        c.append("same", *same.round(10, gen))
        for ctx in ("f", "same"):
            c.flush(ctx)
        c.delete("base")
    d.stop()
    for path in d.state_dir.glob("index.sqlite*"):
        path.unlink()
    d.start()
    with HCacheClient(d.socket) as c:
        rebuilt = c._run(c._aio._call("fsck", rebuild=True))[0]
        assert rebuilt["contexts"] == 2, rebuilt
        assert_restores(c, "f", f)
        assert_restores(c, "same", same)
        assert all(s["shared"] == 2 for s in c.stat("f", detail=True).raw["placement"] if s["rep"] != "tokens")
        fsck = c._run(c._aio._call("fsck"))[0]
        assert not fsck["problems"] and fsck["leaked"] == 0 and fsck["dangling"] == 0, fsck
        assert c.lookup("m", torch.cat(same.tokens)) == 192


def test_share_false_on_a_restored_prefix_copies_it(daemon_factory):
    model = _model(2)
    d = daemon_factory(engine="threads")
    ids = _ids(40, 200)
    with HCacheClient(d.socket) as client:
        with capture(model, client, "a", store="kv"), torch.no_grad():
            model(ids, use_cache=True)
        longer = torch.cat([ids, _ids(41, 100)], 1)
        cache, held = restore(model, client, tokens=longer, method="kv")
        with capture(model, client, "own", share=False), torch.no_grad():
            own = _kv(model(longer[:, held.shape[1]:], cache=cache, use_cache=True).cache)
        assert all(s["shared"] == 0 for s in client.stat("own", detail=True).raw["placement"])
        assert lookup(model, client, longer) == 192  # a's chunks only: "own" is not found
        cache, _ = restore(model, client, "own", method="kv")
        _assert_same(cache, own, "own")
