"""restore() keeps reading while it recomputes: every read of the plan is under way during the recompute prefix,
not only the first few; and hcache's threads get the GIL promptly meanwhile."""

import sys
import time

import torch
import transformers as tf

from hcache.client import HCacheClient
from hcache.client.costs import Profile
from hcache.client.projection import decoder_layers, geometry_of
from hcache.client.restorer import choose_methods
from hcache.layout.chunks import CHUNK_TOKENS
from hcache.layout.geometry import Rep
from hcache.transformers import capture, restore

LAYERS = 8
T = 300  # 5 chunks per layer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                            num_key_value_heads=4, vocab_size=128, max_position_embeddings=512)
    model = tf.LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = None
    return model


def _recompute_two_then_read_kv(model: torch.nn.Module) -> Profile:
    """Costs under which the plan recomputes layers 0-1 and reads K/V for the other six: a K/V read takes 1 s,
    a recomputed layer 3 s, projecting a layer 100 s."""
    g = geometry_of(model)
    per_byte = 1.0 / (T * g.token_bytes(Rep.KV))
    return Profile(g, c_h=(0.0, 100.0), c_tok=(0.0, 0.0, 3.0), io=(per_byte, 0.0), device="cpu", source="measured")


def test_reads_of_every_layer_stream_during_the_recompute_prefix(daemon_factory):
    model = _model()
    d = daemon_factory()
    ids = torch.randint(1, 128, (1, T), generator=torch.Generator().manual_seed(1))
    with HCacheClient(d.socket) as client, torch.no_grad():
        with capture(model, client, "c", store="both"):
            prefill = model(ids, use_cache=True).cache
    d.restart()  # every chunk comes from disk, and counts as a disk read
    profile = _recompute_two_then_read_kv(model)
    chunks = -(-T // CHUNK_TOKENS)
    wanted = chunks * (1 + LAYERS - 2)  # the token stream, then K/V of layers 2-7
    seen = {}

    def in_the_last_recomputed_layer(module, args, kwargs):  # noqa: ANN001, ANN202
        seen["switch_interval"] = sys.getswitchinterval()
        with HCacheClient(d.socket) as watcher:
            deadline = time.monotonic() + 30
            while (reads := watcher.status()["disk_reads"]) < wanted and time.monotonic() < deadline:
                time.sleep(0.01)
        seen["disk_reads"] = reads

    handle = decoder_layers(model)[1].register_forward_pre_hook(in_the_last_recomputed_layer, with_kwargs=True)
    try:
        with HCacheClient(d.socket) as client:
            assert choose_methods(client.stat("c"), "auto", 1, "cpu", profile) == ["RE"] * 2 + ["KV"] * 6
            cache, _ = restore(model, client, "c", profile=profile)
    finally:
        handle.remove()
    assert seen["disk_reads"] >= wanted  # six layers read while layer 1 was still being recomputed, not three
    assert seen["switch_interval"] <= 0.0005
    assert sys.getswitchinterval() == 0.005  # back to CPython's default
    for got, want in zip(cache.layers, prefill.layers, strict=True):
        assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
