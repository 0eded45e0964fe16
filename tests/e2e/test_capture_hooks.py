"""capture() takes a layer's input only where something needs it: a layer whose every context keeps K/V stops being
hooked once the contexts are open (a hooked call costs a small model's decode step about 1% over 30 layers)."""

import pytest
import torch

from hcache.client import HCacheClient
from hcache.client.projection import decoder_layers
from hcache.transformers import capture, restore
from tests.client.test_projection import VOCAB, model_of


def _hooked(model: torch.nn.Module) -> list[int]:
    return [i for i, layer in enumerate(decoder_layers(model)) if layer._forward_pre_hooks]


@pytest.mark.parametrize("store, family, hooked", [
    ("kv", "llama-gqa", lambda n, sliding: []),
    ("hidden", "llama-gqa", lambda n, sliding: list(range(n))),
    ("kv", "gemma2", lambda n, sliding: sliding),  # its sliding-window layers' K/V may come from their inputs
])
def test_layers_are_hooked_only_where_their_input_is_saved(daemon, store, family, hooked):
    model = model_of(family, "fp32")
    n = len(decoder_layers(model))
    ids = torch.randint(1, VOCAB, (1, 40), generator=torch.Generator().manual_seed(5))
    with HCacheClient(daemon.socket) as client:
        with capture(model, client, "c", store=store), torch.no_grad():
            assert _hooked(model) == list(range(n))  # until the first pass opens the context
            out = model(ids, use_cache=True)
            sliding = [i for i, s in enumerate(out.cache.is_sliding) if s]
            assert _hooked(model) == hooked(n, sliding)
            following = model(ids[:, :1], cache=out.cache, use_cache=True)
        assert _hooked(model) == []
        cache, stored = restore(model, client, "c", method=store, exact=True)  # built in two passes
        assert stored.shape[1] == 41
        for mine, own in zip(cache.layers, following.cache.layers, strict=True):
            assert torch.equal(mine.keys, own.keys) and torch.equal(mine.values, own.values)
