"""Projection, recompute and cache building are bit-exact against each family's own prefill (tiny random models)."""

import functools
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
import transformers as tf

from hcache.client.errors import HCacheError, UnsupportedModel
from hcache.client.projection import (
    build_cache,
    decoder_layers,
    fingerprint,
    geometry_of,
    project_kv,
    recompute_prefix,
)
from hcache.layout.geometry import Geometry

T = 70
VOCAB = 128
_BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 256}
# Sliding windows shorter than T, so those layers' caches hold only a tail of the context.
CONFIGS = {
    "llama-gqa": lambda: tf.LlamaConfig(**_BASE),
    "llama-mha": lambda: tf.LlamaConfig(**{**_BASE, "num_key_value_heads": 4}),
    "mistral": lambda: tf.MistralConfig(**_BASE, head_dim=16, sliding_window=32),
    "qwen2": lambda: tf.Qwen2Config(**_BASE),
    "qwen3": lambda: tf.Qwen3Config(**_BASE, head_dim=16),
    "gemma": lambda: tf.GemmaConfig(**_BASE, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**_BASE, head_dim=16, sliding_window=32),
    "phi3": lambda: tf.Phi3Config(**_BASE, pad_token_id=0, partial_rotary_factor=0.5),
    # Phi-2's share of rotated dims (0.4 of a head, here 6 of 16); the GQA shape also normalises q and k.
    "phi-mha": lambda: tf.PhiConfig(**{**_BASE, "num_key_value_heads": 4}, partial_rotary_factor=0.4),
    "phi-gqa": lambda: tf.PhiConfig(**_BASE, partial_rotary_factor=0.4, qk_layernorm=True),
    "opt": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                vocab_size=VOCAB, max_position_embeddings=256, word_embed_proj_dim=64),
    "opt-350m-style": lambda: tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=4,
                                           vocab_size=VOCAB, max_position_embeddings=256, word_embed_proj_dim=32,
                                           do_layer_norm_before=False),
    "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB, n_positions=256),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
CASES = [pytest.param(f, d, id=f"{f}-{d}") for f in CONFIGS for d in DTYPES]


def _make(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[family]())
    with torch.no_grad():  # biases and norm weights start as constants; make every parameter matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.generation_config.eos_token_id = None
    return model.eval()


@functools.cache
def model_of(family: str, dtype: str) -> torch.nn.Module:
    return _make(family).to(DTYPES[dtype])


@functools.cache
def prefill(family: str, dtype: str) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], list[tuple[torch.Tensor, ...]]]:
    """Context ids [1, T], the layer inputs and each layer's cached (K, V) from the model's own prefill."""
    ids = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model_of(family, dtype)(input_ids=ids, use_cache=True, output_hidden_states=True)
    return ids, out.hidden_states, [(layer.keys, layer.values) for layer in out.cache.layers]


def projected(family: str, dtype: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    model = model_of(family, dtype)
    _, hidden, _ = prefill(family, dtype)
    positions = torch.arange(T)[None]
    return [project_kv(model, i, hidden[i], positions) for i in range(len(decoder_layers(model)))]


def assert_as_cached(kv: tuple[torch.Tensor, torch.Tensor], cached: tuple[torch.Tensor, ...]) -> None:
    """Full-length K/V equal the cache's; a sliding-window layer's cache holds only the last tokens."""
    n = cached[0].shape[-2]
    assert kv[0].shape[-2] == T and n <= T
    assert torch.equal(kv[0][..., T - n:, :], cached[0])
    assert torch.equal(kv[1][..., T - n:, :], cached[1])


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_projection_is_bit_identical_to_prefill(family: str, dtype: str) -> None:
    model = model_of(family, dtype)
    g = geometry_of(model)
    _, _, cached = prefill(family, dtype)
    for kv, c in zip(projected(family, dtype), cached, strict=True):
        assert kv[0].shape == kv[1].shape == (1, g.num_kv_heads, T, g.head_dim)
        assert kv[0].dtype == kv[1].dtype == DTYPES[dtype]
        assert_as_cached(kv, c)
    if family in ("mistral", "gemma2"):  # the windows really cut the cache, so tails were what got compared
        assert min(c[0].shape[-2] for c in cached) < T


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_recompute_prefix_matches_prefill(family: str, dtype: str) -> None:
    model = model_of(family, dtype)
    ids, _, cached = prefill(family, dtype)
    for n in range(1, len(cached) + 1):
        kv = recompute_prefix(model, ids, n)
        assert len(kv) == n
        for layer_kv, c in zip(kv, cached, strict=False):
            assert_as_cached(layer_kv, c)


@pytest.mark.parametrize(("family", "dtype"), CASES)
def test_generate_continues_from_a_built_cache(family: str, dtype: str) -> None:
    model = model_of(family, dtype)
    ids, _, _ = prefill(family, dtype)
    full = torch.cat([ids, torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(2))], dim=1)
    # An explicit mask over all of full: generate would otherwise take random ids equal to pad_token_id for padding.
    kw = {"attention_mask": torch.ones_like(full), "max_new_tokens": 8, "do_sample": False,
          "return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        restored = model.generate(full, cache=build_cache(model, projected(family, dtype)), **kw)
        own = model.generate(full, cache=_own_cache(family, dtype), **kw)
    assert restored.sequences.shape == (1, full.shape[1] + 8)
    assert torch.equal(restored.sequences, own.sequences)
    assert all(torch.equal(a, b) for a, b in zip(restored.logits, own.logits, strict=True))
    if dtype == "fp32":  # bf16 rounding differs between cached and uncached attention; fp32 agrees on tokens
        with torch.no_grad():
            plain = model.generate(full, **kw)
        assert torch.equal(restored.sequences, plain.sequences)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(restored.logits, plain.logits, strict=True))


def _own_cache(family: str, dtype: str) -> object:
    """A fresh copy of the model's own prefill cache (generate grows the cache it is given)."""
    ids, _, _ = prefill(family, dtype)
    with torch.no_grad():
        return model_of(family, dtype)(input_ids=ids, use_cache=True).cache


@pytest.mark.parametrize("family", ["llama-gqa", "gemma2", "gpt2"])
def test_cache_of_all_but_the_last_token_continues_the_context(family: str) -> None:
    model = model_of(family, "fp32")
    ids, _, _ = prefill(family, "fp32")
    kv = [(k[..., :-1, :], v[..., :-1, :]) for k, v in projected(family, "fp32")]
    with torch.no_grad():
        kw = {"attention_mask": torch.ones_like(ids), "max_new_tokens": 8, "do_sample": False}
        restored = model.generate(ids, cache=build_cache(model, kv), **kw)
        plain = model.generate(ids, **kw)
    assert torch.equal(restored, plain)


def test_geometry() -> None:
    assert geometry_of(model_of("llama-gqa", "fp32")) == Geometry(3, 64, 2, 16, "float32")
    assert geometry_of(model_of("llama-mha", "bf16")) == Geometry(3, 64, 4, 16, "bfloat16")
    assert geometry_of(model_of("phi3", "fp32")) == Geometry(3, 64, 2, 16, "float32")
    assert geometry_of(model_of("phi-mha", "bf16")) == Geometry(3, 64, 4, 16, "bfloat16")
    assert geometry_of(model_of("phi-gqa", "fp32")) == Geometry(3, 64, 2, 16, "float32")
    assert geometry_of(model_of("gpt2", "bf16")) == Geometry(3, 64, 4, 16, "bfloat16")
    assert geometry_of(model_of("opt-350m-style", "fp32")) == Geometry(3, 64, 4, 16, "float32")
    assert len(decoder_layers(model_of("opt", "fp32"))) == 3


def test_fingerprint_is_stable_and_tells_models_apart() -> None:
    a, b = _make("llama-gqa", seed=0), _make("llama-gqa", seed=5)
    assert fingerprint(a) == fingerprint(b)  # names and shapes, not values
    assert fingerprint(a).startswith("LlamaModel:")
    assert fingerprint(a) == fingerprint(a.model)  # a bare LlamaModel has the same layers, so the same states
    assert fingerprint(a) != fingerprint(_make("llama-mha"))
    assert fingerprint(a) != fingerprint(_make("llama-gqa").to(torch.bfloat16))
    assert fingerprint(a, "meta/llama-3") == fingerprint(b, "meta/llama-3") != fingerprint(a, "meta/llama-3.1")
    assert fingerprint(a, "meta/llama-3") != fingerprint(a)
    assert fingerprint(_make("qwen2")) != fingerprint(_make("llama-gqa"))
    # Config that changes K/V with the same weights: another rotary base, another norm epsilon; not other config.
    rope, eps, other = (_make("llama-gqa") for _ in range(3))
    rope.config.rope_parameters = {**rope.config.rope_parameters, "rope_theta": 500000.0}
    eps.config.rms_norm_eps = 1e-5
    other.config.max_position_embeddings *= 2
    assert fingerprint(rope) != fingerprint(a) != fingerprint(eps)
    assert fingerprint(other) == fingerprint(a)


def test_fingerprint_is_the_same_in_another_process() -> None:
    code = ("import sys; sys.path.insert(0, 'tests/client'); import test_projection as t; "
            "from hcache.client.projection import fingerprint; print(fingerprint(t._make('qwen3')))")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert out.stdout.strip() == fingerprint(_make("qwen3"))


@pytest.mark.parametrize(("build", "name"), [
    (lambda: tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, vocab_size=64)), "BertModel"),
    (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=64)), "GPTNeoXForCausalLM"),
    (lambda: torch.nn.Linear(4, 4), "Linear"),
])
def test_unsupported_model_is_refused_by_name(build: Callable[[], torch.nn.Module], name: str) -> None:
    model = build()
    calls = [lambda: decoder_layers(model), lambda: geometry_of(model), lambda: fingerprint(model),
             lambda: project_kv(model, 0, torch.zeros(1, 2, 32), torch.arange(2)[None]),
             lambda: recompute_prefix(model, torch.zeros(1, 2, dtype=torch.long), 1), lambda: build_cache(model, [])]
    for call in calls:
        with pytest.raises(UnsupportedModel, match=name) as err:
            call()
        assert isinstance(err.value, HCacheError) and err.value.code == "unsupported_model"
        assert "llama" in str(err.value) and "gpt2" in str(err.value)


def test_bad_layer_numbers_are_refused() -> None:
    model = model_of("llama-gqa", "fp32")
    ids, hidden, _ = prefill("llama-gqa", "fp32")
    with pytest.raises(ValueError, match="0..2"):
        project_kv(model, 3, hidden[0], torch.arange(T)[None])
    with pytest.raises(ValueError, match="1..3"):
        recompute_prefix(model, ids, 0)
    with pytest.raises(ValueError, match="all 3 layers"):
        build_cache(model, projected("llama-gqa", "fp32")[:2])
