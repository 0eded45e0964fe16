"""restore(method="auto") plans with where a context's chunks are: in hcached's arena, read at its rate, or on
disk."""

import torch

from hcache.client import HCacheClient
from hcache.client.costs import Profile
from hcache.client.projection import geometry_of
from hcache.client.restorer import _resident, choose_methods
from hcache.transformers import capture, restore
from tests.client.test_projection import VOCAB, model_of


def test_auto_reads_from_the_arena_what_it_would_recompute_from_disk(daemon):
    model = model_of("llama-gqa", "fp32")
    ids = torch.randint(1, VOCAB, (1, 200), generator=torch.Generator().manual_seed(3))
    slow_disk = Profile(geometry_of(model), c_h=(1.0, 0.0), c_tok=(0.0, 1e-3, 0.0), io=(1e-3, 0.0), device="cpu",
                        io_arena=(1e-12, 0.0))  # a disk read of a layer takes far longer than recomputing it
    with HCacheClient(daemon.socket) as client:
        with capture(model, client, "c", store="kv"), torch.no_grad():
            model(ids, use_cache=True)
        warm = client.stat("c", detail=True)
        assert _resident(warm) == (0.0, 1.0)  # just saved: its K/V chunks are in the arena
        client.flush("c", drop=True)
        cold = client.stat("c", detail=True)
        assert _resident(cold) == (0.0, 0.0)
        assert choose_methods(warm, "auto", profile=slow_disk) == ["KV"] * len(warm.layers["kv"])
        assert choose_methods(cold, "auto", profile=slow_disk)[0] == "RE"
        restore(model, client, "c", method="kv")  # reads the chunks into the arena again
        assert _resident(client.stat("c", detail=True)) == (0.0, 1.0)
        assert _resident(client.stat("c")) == (0.0, 0.0)  # without detail, nothing counts as resident
