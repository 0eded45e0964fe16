"""capture() and restore() with real models through the real hcached: every family, fp32 and bf16, every method,
two rounds, and a daemon killed with SIGKILL between rounds."""

import time

import pytest
import torch

from hcache.client import BadRequest, ContextChanged, HCacheClient, UnknownContext
from hcache.client.costs import Profile
from hcache.client.projection import Projector, decoder_layers, geometry_of, project_kv
from hcache.layout.geometry import Rep
from hcache.transformers import capture, restore
from tests.client.test_projection import CONFIGS, DTYPES, VOCAB, model_of

NEW_TOKENS = 32  # generated from each restored cache
FIRST_ROUND_TOKENS = 8
PROMPTS = (20, 6, 5)  # user tokens per round


def _generate(model: torch.nn.Module, ids: torch.Tensor, cache: object = None, n: int = NEW_TOKENS):
    out = model.generate(ids, cache=cache, max_new_tokens=n, do_sample=False, return_dict_in_generate=True,
                         attention_mask=torch.ones_like(ids), pad_token_id=0)
    return out.sequences, out.cache


def _prompt(seed: int, n: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def _round_ids(rnd: int, seqs: torch.Tensor | None) -> torch.Tensor:
    """The input of round rnd: the conversation so far plus the user's new tokens."""
    prompt = _prompt(rnd, PROMPTS[rnd])
    return prompt if seqs is None else torch.cat([seqs, prompt], 1)


def _reference(model: torch.nn.Module, rounds: int) -> list[torch.Tensor]:
    """A conversation without eviction: each round continues on the model's own cache."""
    seqs, cache, out = None, None, []
    for rnd in range(rounds):
        seqs, cache = _generate(model, _round_ids(rnd, seqs), cache, FIRST_ROUND_TOKENS if rnd == 0 else NEW_TOKENS)
        out.append(seqs)
    return out


@pytest.fixture(scope="module")
def hcached(tmp_path_factory):
    from hcache.daemon.process import DaemonProcess

    d = DaemonProcess(tmp_path_factory.mktemp("hcached"), n_dirs=2, dram="256MiB").start()
    yield d
    d.cleanup()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_restored_cache_is_the_prefill_cache_bit_for_bit(hcached, family, dtype):
    model = model_of(family, dtype)
    ids = _prompt(7, 100)  # more than one 64-token chunk
    ctx = f"prefill-{family}-{dtype}"
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, ctx, store="both"), torch.no_grad():
            prefill = model(ids, use_cache=True).cache
        for method in ("hidden", "kv", "recompute", "auto"):
            cache, stored = restore(model, client, ctx, method=method)
            assert torch.equal(stored, ids)
            for i in range(len(decoder_layers(model))):
                assert torch.equal(cache.layers[i].keys, prefill.layers[i].keys), (method, i)
                assert torch.equal(cache.layers[i].values, prefill.layers[i].values), (method, i)
        client.delete(ctx)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", list(CONFIGS))
def test_every_method_continues_the_conversation(hcached, family, dtype):
    model = model_of(family, dtype)
    ref = _reference(model, 2)
    ctx = f"{family}-{dtype}"
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, ctx, store="both"):
            seqs, _ = _generate(model, _round_ids(0, None), n=FIRST_ROUND_TOKENS)
        assert torch.equal(seqs, ref[0])
        n = seqs.shape[1] - 1  # the last generated token has not been through the model yet
        for method in ("hidden", "kv", "recompute", "auto"):
            cache, ids = restore(model, client, ctx, method=method, exact=True)  # decoded: exact keeps the bits
            assert torch.equal(ids, seqs[:, :n])
            got, _ = _generate(model, _round_ids(1, seqs), cache)
            assert torch.equal(got, ref[1]), method
        client.delete(ctx)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", ["llama-gqa", "llama-mha", "qwen3", "gemma2", "phi3", "phi-mha", "opt", "gpt2"])
def test_auto_plan_over_rounds_survives_sigkill(hcached, family, dtype):
    model = model_of(family, dtype)
    ref = _reference(model, len(PROMPTS))
    ctx = f"auto-{family}-{dtype}"
    seqs = None
    for rnd in range(len(PROMPTS)):
        with HCacheClient(hcached.socket) as client:
            cache = None
            if seqs is not None:
                cache, stored = restore(model, client, ctx, exact=True)  # method="auto" over what the plan stored
                assert torch.equal(stored, seqs[:, :-1])
            with capture(model, client, ctx):  # store="plan", appending from round 2 on
                seqs, _ = _generate(model, _round_ids(rnd, seqs), cache, FIRST_ROUND_TOKENS if rnd == 0 else NEW_TOKENS)
        assert torch.equal(seqs, ref[rnd]), f"round {rnd + 1}"
        hcached.kill()  # durable once capture returned: nothing may be lost
        hcached.start()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", ["llama-gqa", "qwen3", "phi3", "phi-mha", "gpt2"])
def test_one_pass_restore_runs_over_all_tokens_at_once(hcached, family, dtype):
    model = model_of(family, dtype)
    ctx = f"one-pass-{family}-{dtype}"
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, ctx, store="both"):
            seqs, decoded = _generate(model, _prompt(14, 20), n=FIRST_ROUND_TOKENS)  # a prefill, then decode steps
        ids = seqs[:, :-1]
        n = ids.shape[1]
        hidden = client.restore(ctx, "hidden", None, 0, n)  # [layers, n, D], as the decode steps saw them
        positions = torch.arange(n)[None]
        with torch.no_grad():
            prefill = model(ids, use_cache=True).cache  # every token in one forward pass
        for method in ("hidden", "recompute"):
            cache, got = restore(model, client, ctx, method=method, exact=False)
            assert torch.equal(got, ids)
            for i in range(len(decoder_layers(model))):
                k, v = cache.layers[i].keys, cache.layers[i].values
                if method == "hidden":
                    want = project_kv(model, i, hidden[i][None], positions)
                else:
                    want = prefill.layers[i].keys, prefill.layers[i].values
                assert torch.equal(k, want[0]) and torch.equal(v, want[1]), (method, i)
                # The model's own cache, built a token a step: the same up to rounding.
                for got_x, own in ((k, decoded.layers[i].keys), (v, decoded.layers[i].values)):
                    assert (got_x - own).abs().max() <= 0.02 * own.abs().max(), (method, i)
        client.delete(ctx)


def test_auto_plans_for_the_passes_it_will_run(hcached, monkeypatch):
    """A projection that costs a second a call: an exact restore of a decoded context would pay it per decode step
    and layer, so auto reads K/V; a one-pass restore pays it once a layer, so auto projects."""
    model = model_of("llama-mha", "fp32")
    ctx = "plan-passes"
    projected: list[int] = []  # tokens per projection call
    call = Projector.__call__

    def counted(self, layer, hidden, *args):
        projected.append(hidden.shape[1])
        return call(self, layer, hidden, *args)

    monkeypatch.setattr(Projector, "__call__", counted)
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, ctx, store="both"):
            seqs, _ = _generate(model, _prompt(15, 20), n=FIRST_ROUND_TOKENS)  # 8 passes
        n = seqs.shape[1] - 1
        geometry = geometry_of(model)
        # A layer's K/V read takes 3 s, its hidden states 1.5 s; recompute takes 100 s.
        profile = Profile(geometry, c_h=(0.0, 1.0), c_tok=(0.0, 0.0, 100.0),
                          io=(3.0 / (n * geometry.token_bytes(Rep.KV)), 0.0), device="cpu", source="measured")
        restore(model, client, ctx, profile=profile, exact=True)
        assert projected == []
        restore(model, client, ctx, profile=profile)  # one pass, the default
        assert projected and set(projected) == {n}
        client.delete(ctx)


def test_capture_reports_its_passes_and_their_cost_on_the_forward_path(hcached):
    model = model_of("llama-gqa", "fp32")
    ids = _prompt(11, 12)
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, "stats", store="both") as stats:
            before = stats.hook_s
            seqs, cache = _generate(model, ids, n=5)  # the prompt's pass and four decode steps
            assert stats.passes == 5 and stats.hook_s > before
            model(seqs[:, -1:], cache=cache, use_cache=True)  # a pass outside generate counts, also with autograd on
            with torch.inference_mode():
                model(seqs[:, -1:], cache=cache, use_cache=True)
            assert stats.passes == 7
        assert stats.send_cpu_s > 0  # the block's end sent what was held back
        model(ids)  # after the block nothing is captured
        assert stats.passes == 7
        client.delete("stats")


def test_capture_sends_held_back_passes_once_they_are_worth_an_append(hcached, monkeypatch):
    from hcache.client import capture as capture_module

    model = model_of("llama-mha", "fp32")
    ids = _prompt(12, 10)
    monkeypatch.setattr(capture_module, "_BATCH_BYTES", 1)  # every pass is worth an append
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, "early", store="hidden") as stats, torch.no_grad():
            cache = model(ids, use_cache=True).cache
            # The next pass hands the prompt's to the sender: a pass waits until the cache shows the tokens it keeps.
            model(ids[:, -1:], cache=cache, use_cache=True)
            deadline = time.monotonic() + 10
            while client.stat("early").n_tokens < ids.shape[1]:  # sent while the block is still open
                assert time.monotonic() < deadline, "the prompt's pass was never sent"
                time.sleep(0.01)
            assert stats.passes == 2
        assert client.stat("early").n_tokens == ids.shape[1] + 1
        client.delete("early")


def test_capture_keeps_only_the_tokens_assisted_decoding_accepts(hcached):
    """Prompt-lookup decoding verifies candidate tokens in a pass, then crops the cache to those accepted: the
    context holds the sequence the model kept, not the candidates it dropped."""
    model = model_of("llama-gqa", "fp32")
    ids = torch.tensor([[5, 6, 7, 8] * 4])  # repeats: the lookup proposes candidates from them
    processed = []
    handle = model.register_forward_pre_hook(lambda m, args, kwargs: processed.append(kwargs["input_ids"].shape[1]),
                                             with_kwargs=True)
    with HCacheClient(hcached.socket) as client:
        try:
            with capture(model, client, "lookup", store="kv"):
                out = model.generate(ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=3,
                                     attention_mask=torch.ones_like(ids), pad_token_id=0, return_dict_in_generate=True)
        finally:
            handle.remove()
        n = out.sequences.shape[1] - 1
        assert sum(processed) > n  # candidates were dropped
        cache, stored = restore(model, client, "lookup", method="kv")
        assert torch.equal(stored, out.sequences[:, :n])
        for i in range(len(decoder_layers(model))):
            assert torch.equal(cache.layers[i].keys, out.cache.layers[i].keys[:, :, :n])
            assert torch.equal(cache.layers[i].values, out.cache.layers[i].values[:, :, :n])
        client.delete("lookup")


@pytest.mark.parametrize("failure", ["hcached down", "another model's context"])
def test_capture_that_cannot_save_lets_the_generation_finish_and_fails_at_the_block_end(daemon_factory, failure):
    from hcache.client import DaemonUnreachable, ModelMismatch

    model = model_of("llama-gqa", "fp32")
    ids = _prompt(16, 10)
    want, _ = _generate(model, ids, n=6)
    d = daemon_factory()
    with HCacheClient(d.socket, connect_timeout=60) as client:
        if failure == "hcached down":
            d.stop()
            deadline = time.monotonic() + 10
            while client.connected:
                assert time.monotonic() < deadline, "the client never saw hcached go"
                time.sleep(0.01)
        else:
            with capture(model_of("llama-mha", "fp32"), client, "taken"):
                _generate(model_of("llama-mha", "fp32"), ids, n=2)
        error = DaemonUnreachable if failure == "hcached down" else ModelMismatch
        start = time.monotonic()
        with pytest.raises(error), capture(model, client, "taken"):
            got, _ = _generate(model, ids, n=6)
            generated = time.monotonic() - start
        assert torch.equal(got, want)  # the model's own work is not lost to hcache's
        assert generated < 30  # no forward pass waited the 60 s connect_timeout


@pytest.mark.parametrize("how", ["generate", "forward", "not a Cache", "use_cache=False"])
def test_capture_refuses_a_cache_it_cannot_follow_before_storing_anything(hcached, how):
    from transformers import StaticCache

    model = model_of("llama-gqa", "fp32")
    ids = _prompt(13, 6)
    with HCacheClient(hcached.socket) as client:
        with pytest.raises(BadRequest, match="(?i)dynamic ?cache|use_cache=True"), \
                capture(model, client, f"static-{how}"):
            if how == "generate":  # a prepared 4D mask, and a StaticCache
                model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static", pad_token_id=0,
                               attention_mask=torch.ones_like(ids))
            elif how == "forward":
                model(ids, cache=StaticCache(model.config, max_cache_len=16), use_cache=True)
            elif how == "not a Cache":  # the tuples of transformers 4's legacy cache
                model(ids, cache=((torch.zeros(1), torch.zeros(1)),), use_cache=True)
            else:  # every step would recompute, and capture save, the whole sequence again
                model.generate(ids, max_new_tokens=2, do_sample=False, use_cache=False, pad_token_id=0,
                               attention_mask=torch.ones_like(ids))
        with pytest.raises(UnknownContext):
            client.stat(f"static-{how}")


def test_capture_refuses_one_context_for_two_rows(hcached):
    with HCacheClient(hcached.socket) as client:
        with pytest.raises(BadRequest, match=r"\['twice'\] for more than one batch row"):
            with capture(model_of("llama-gqa", "fp32"), client, ["twice", "once", "twice"]):
                pass
        with pytest.raises(UnknownContext):
            client.stat("twice")


def test_capture_refuses_a_model_split_over_devices_before_storing_anything(hcached):
    import copy

    model = copy.deepcopy(model_of("llama-gqa", "fp32"))
    model.model.layers[2].to("meta")  # as a device_map would place a layer on another device
    with HCacheClient(hcached.socket) as client:
        with pytest.raises(BadRequest, match="one device"), capture(model, client, "split"):
            pass
        with pytest.raises(UnknownContext):
            client.stat("split")


def test_capture_blocks_in_two_threads_on_one_model_each_save_their_own_conversation(hcached):
    import threading

    model = model_of("llama-mha", "fp32")
    prompts = {"thread-a": _prompt(17, 9), "thread-b": _prompt(18, 14)}
    want = {ctx: _generate(model, ids, n=12) for ctx, ids in prompts.items()}
    # Each forward pass yields the interpreter, so the two generations interleave pass by pass.
    handle = model.register_forward_hook(lambda *_: time.sleep(0.002))
    start, errors = threading.Barrier(2), []

    def converse(ctx: str) -> None:
        try:
            with HCacheClient(hcached.socket) as client, capture(model, client, ctx, store="kv"):
                start.wait()
                _generate(model, prompts[ctx], n=12)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=converse, args=(ctx,)) for ctx in prompts]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        handle.remove()
    assert not errors
    with HCacheClient(hcached.socket) as client:
        for ctx, (seqs, own) in want.items():
            n = seqs.shape[1] - 1
            cache, ids = restore(model, client, ctx, method="kv")
            assert torch.equal(ids, seqs[:, :n]), ctx
            for i in range(len(decoder_layers(model))):
                assert torch.equal(cache.layers[i].keys, own.layers[i].keys), (ctx, i)
            client.delete(ctx)


@pytest.mark.parametrize("family", ["llama-mha", "mistral"])  # mistral: K/V past its window projected in capture
def test_capture_of_a_conversation_prefilled_anew_saves_only_what_its_context_lacks(hcached, family):
    """An engine that prefills the whole conversation again (it did not restore) under capture of its context: the
    tokens the context holds are checked and not saved twice, and the context continues the conversation."""
    model = model_of(family, "fp32")
    ctx = f"anew-{family}"
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, ctx, store="kv"):
            first, _ = _generate(model, _round_ids(0, None), n=FIRST_ROUND_TOKENS)
        with capture(model, client, ctx, store="kv"):  # no cache: the model processes round 1's tokens again
            second, own = _generate(model, _round_ids(1, first), n=4)  # a sliding window keeps some of the prefill
        n = second.shape[1] - 1
        assert torch.equal(client.tokens(ctx), second[0, :n])
        cache, _ = restore(model, client, ctx, method="kv")
        for i, layer in enumerate(own.layers):  # round 1's K/V came from other passes: equal up to rounding
            torch.testing.assert_close(cache.layers[i].keys, layer.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(cache.layers[i].values, layer.values, atol=1e-5, rtol=1e-4)
        third = _round_ids(2, second)
        assert torch.equal(_generate(model, third, cache)[0], _generate(model, third)[0])
        client.delete(ctx)


def test_capture_of_a_padded_batch_prefilled_anew_skips_each_rows_saved_tokens(hcached):
    model = model_of("llama-gqa", "fp32")
    with HCacheClient(hcached.socket) as client:
        saved, _ = _generate(model, _prompt(20, 9), n=4)
        with capture(model, client, "rows-saved"):
            _generate(model, saved[:, :-1], n=1)  # the context holds saved's tokens but its last
        rows = [torch.cat([saved, _prompt(21, 3)], 1), _prompt(22, 5)]
        width = max(r.shape[1] for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(rows):  # left padding
            ids[i, width - r.shape[1]:], mask[i, width - r.shape[1]:] = r[0], 1
        with capture(model, client, ["rows-saved", "rows-new"]):
            seqs = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
        for i, ctx in enumerate(["rows-saved", "rows-new"]):
            assert torch.equal(client.tokens(ctx), seqs[i, width - rows[i].shape[1]: -1]), ctx
            client.delete(ctx)


def test_capture_of_an_edited_conversation_keeps_the_common_prefix_and_saves_the_rest(hcached):
    model = model_of("llama-gqa", "fp32")
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, "edited"):
            first, _ = _generate(model, _prompt(23, 12), n=4)
        edited = first.clone()
        edited[0, 7] = edited[0, 7] % (VOCAB - 1) + 1  # another token, as an edited message has
        with capture(model, client, "edited"):
            got, _ = _generate(model, edited, n=4)
        assert torch.equal(got, _generate(model, edited, n=4)[0])  # the generation itself went on
        assert torch.equal(client.tokens("edited"), got[0, :-1])  # cut back at position 7, then the edit saved
        cache, ids = restore(model, client, "edited", method="kv")
        assert torch.equal(ids, got[:, :-1])
        client.delete("edited")


@pytest.mark.parametrize("context", ["deleted", "shorter"])
def test_capture_refuses_a_cache_holding_more_than_its_context(hcached, context):
    """The model's cache holds tokens the context lacks (it was evicted after the restore, or is another one): they
    cannot be saved now, and saving what follows them at the context's end would shift every position."""
    model = model_of("llama-gqa", "fp32")
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, "longer"):
            first, _ = _generate(model, _prompt(24, 12), n=4)
        cache, ids = restore(model, client, "longer")
        if context == "shorter":
            with capture(model, client, "shorter"):
                _generate(model, first[:, :5], n=1)
        client.delete("longer")
        target = "longer" if context == "deleted" else "shorter"
        with pytest.raises(ContextChanged, match="cache held 15 tokens"), capture(model, client, target):
            _generate(model, torch.cat([first, _prompt(25, 3)], 1), cache)
        if context == "deleted":  # not created empty either
            with pytest.raises(UnknownContext):
                client.stat("longer")
        else:
            assert client.stat("shorter").n_tokens == 5
            client.delete("shorter")


def test_capture_saves_a_batch_row_only_until_generate_finishes_it(hcached):
    """generate() feeds a row that has finished its end-of-sequence token and then padding, under a mask of ones,
    until every row has: the row's context ends where its conversation does, as a single row's would."""
    model = model_of("llama-gqa", "fp32")
    ids = torch.cat([_prompt(26, 8), _prompt(27, 8)])
    mask = torch.ones_like(ids)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    row0, row1 = free[0, 8:].tolist(), free[1, 8:].tolist()
    # an end-of-sequence token for row 0 alone, a few tokens before the end
    end = next(i for i in range(1, 6) if row0[i] not in row1 and row0[i] not in row0[:i])
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, ["finished", "going"], store="kv"):
            seqs = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                  eos_token_id=row0[end])
        assert torch.equal(client.tokens("finished"), seqs[0, : 8 + end])  # up to its end-of-sequence token
        assert torch.equal(client.tokens("going"), seqs[1, :-1])
        cache, _ = restore(model, client, "finished", method="kv")
        following = torch.cat([seqs[:1, : 8 + end + 1], _prompt(28, 3)], 1)  # the next round of its conversation
        assert torch.equal(_generate(model, following, cache)[0], _generate(model, following)[0])
        client.delete("finished")
        client.delete("going")


def test_capture_takes_a_mask_of_the_new_tokens_alone_as_following_the_whole_cache(hcached):
    """A forward pass on a restored cache given a mask of its own tokens only (models accept it): the cache's
    length says where the new tokens go, not the mask's zero tokens before them."""
    model = model_of("llama-gqa", "fp32")
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, "short-mask"):
            first, _ = _generate(model, _prompt(29, 10), n=3)
        cache, ids = restore(model, client, "short-mask")
        more = _prompt(30, 4)
        with capture(model, client, "short-mask"), torch.no_grad():
            model(more, cache=cache, attention_mask=torch.ones_like(more), use_cache=True)
        assert torch.equal(client.tokens("short-mask"), torch.cat([ids, more], 1)[0])
        client.delete("short-mask")


@pytest.mark.parametrize("on_its_cache", [True, False], ids=["on the model's cache", "prefilled anew"])
def test_capture_of_two_rounds_in_one_block_saves_the_conversation_once(hcached, on_its_cache):
    model = model_of("llama-mha", "fp32")
    ctx = f"one-block-{on_its_cache}"
    with HCacheClient(hcached.socket) as client:
        with capture(model, client, ctx):
            first, cache = _generate(model, _round_ids(0, None), n=FIRST_ROUND_TOKENS)
            second, _ = _generate(model, _round_ids(1, first), cache if on_its_cache else None)
        assert torch.equal(client.tokens(ctx), second[0, :-1])
        restored, _ = restore(model, client, ctx)
        third = _round_ids(2, second)
        assert torch.equal(_generate(model, third, restored)[0], _generate(model, third)[0])
        client.delete(ctx)


def test_a_generate_starting_anew_after_hcached_went_down_does_not_wait_for_it(daemon_factory):
    from hcache.client import DaemonUnreachable

    model = model_of("llama-gqa", "fp32")
    d = daemon_factory()
    with HCacheClient(d.socket, connect_timeout=8) as client:
        with pytest.raises(DaemonUnreachable), capture(model, client, "gone"):
            first, _ = _generate(model, _round_ids(0, None), n=FIRST_ROUND_TOKENS)
            d.stop()
            deadline = time.monotonic() + 10
            while client.connected:
                assert time.monotonic() < deadline, "the client never saw hcached go"
                time.sleep(0.01)
            start = time.monotonic()
            second, _ = _generate(model, _round_ids(1, first))  # a new cache: the context is looked up again
            generated = time.monotonic() - start
        assert generated < 6  # no forward pass waited the 8 s connect_timeout
        assert torch.equal(second, _generate(model, _round_ids(1, first))[0])


def test_capture_warns_when_the_model_ran_only_in_another_thread(hcached, caplog):
    """The streaming pattern (generate() in a thread of its own, the block around it in the caller's) saves nothing:
    the block says so rather than end as if it had saved the conversation."""
    import threading

    model = model_of("llama-gqa", "fp32")
    with HCacheClient(hcached.socket) as client:
        with caplog.at_level("WARNING", logger="hcache.client"), capture(model, client, "elsewhere"):
            worker = threading.Thread(target=_generate, args=(model, _prompt(31, 6)), kwargs={"n": 3})
            worker.start()
            worker.join()
        assert "saved nothing" in caplog.text and "other threads" in caplog.text
        with pytest.raises(UnknownContext):
            client.stat("elsewhere")
