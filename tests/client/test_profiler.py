"""Profiles: the analytical model's shape, the JSON form and state dir, and a real profile against hcached."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from hcache.client import HCacheClient
from hcache.client.costs import (
    Profile,
    analytical_profile,
    geometry_from_config,
    load_profile,
    profile_fingerprint,
    profiles_dir,
    save_profile,
)
from hcache.client.profiler import _fit, profile
from hcache.layout.geometry import Geometry

MHA = Geometry(num_layers=32, hidden_size=4096, num_kv_heads=32, head_dim=128, dtype="bfloat16")
GQA = Geometry(num_layers=32, hidden_size=4096, num_kv_heads=8, head_dim=128, dtype="bfloat16")
TOKENS = [1, 16, 64, 256, 1024, 4096, 32768]


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HCACHE_HOME", str(tmp_path / "state"))


@pytest.mark.parametrize("device", ["cuda", "cpu"])
@pytest.mark.parametrize("geometry", [MHA, GQA], ids=["mha", "gqa"])
def test_analytical_profile_grows_with_tokens(geometry, device):
    p = analytical_profile(geometry, device=device)
    costs = [p.costs(t) for t in TOKENS]
    for name in ("c_h", "c_tok", "io_h", "io_kv"):
        values = [getattr(c, name) for c in costs]
        assert all(0 < a < b for a, b in zip(values, values[1:], strict=False)), name
    assert p.costs(8192).c_tok > 2 * p.costs(4096).c_tok  # recompute is superlinear
    assert p.costs(0).c_tok == 0
    assert all(c.c_tok >= 6 * c.c_h for c in costs)
    with pytest.raises(ValueError, match=">= 0"):
        p.costs(-1)


def test_hidden_is_larger_than_kv_only_without_gqa():
    assert analytical_profile(MHA).costs(100).io_h < analytical_profile(MHA).costs(100).io_kv
    assert analytical_profile(GQA).costs(100).io_h > analytical_profile(GQA).costs(100).io_kv


def test_profile_json_round_trips_through_the_state_dir(tmp_path):
    p = Profile(GQA, c_h=(1e-7, 2e-5), c_tok=(1e-10, 3e-6, 1e-4), io=(5e-10, 1e-4), device="cpu", source="measured",
                samples={"c_h": [[64, 2.6e-5], [256, 4.6e-5]]})
    assert Profile.from_json(p.to_json()) == p
    assert load_profile(p.fingerprint) is None
    path = save_profile(p)
    assert path == profiles_dir() / "L32-D4096-kv8x128-bfloat16-cpu.json" and path.parent.parent == tmp_path / "state"
    assert load_profile(profile_fingerprint(GQA, "cpu")) == p
    assert p.read_bandwidth == pytest.approx(2e9)


def test_bad_profiles_are_refused_with_the_reason(tmp_path):
    good = analytical_profile(MHA).to_dict()
    for change, reason in [({"version": 99}, "version 1"), ({"c_tok": [1.0, -1.0, 0.0]}, "non-negative"),
                           ({"io": [1.0]}, "2 finite"), ({"device": "tpu"}, "device"), ({"geometry": {}}, "missing")]:
        with pytest.raises(ValueError, match=reason):
            Profile.from_dict({**good, **change})
    with pytest.raises(ValueError, match="fingerprint"):
        load_profile("../etc/passwd")
    profiles_dir().mkdir(parents=True)
    (profiles_dir() / "x.json").write_text(json.dumps({**good, "version": 0}))
    with pytest.raises(ValueError, match="x.json"):
        load_profile("x")


def test_geometry_from_hf_configs():
    base = {"hidden_size": 2048, "num_attention_heads": 32, "num_hidden_layers": 16}
    assert geometry_from_config(base) == Geometry(16, 2048, 32, 64, "float32")
    gqa = {**base, "num_key_value_heads": 8, "head_dim": 128, "torch_dtype": "bfloat16"}
    assert geometry_from_config(gqa) == Geometry(16, 2048, 8, 128, "bfloat16")
    assert geometry_from_config({"text_config": {**base, "dtype": "float16"}}).dtype == "float16"
    assert geometry_from_config(base, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(ValueError, match="num_hidden_layers"):
        geometry_from_config({"hidden_size": 8, "num_attention_heads": 2})
    with pytest.raises(ValueError, match="cannot be stored"):
        geometry_from_config({**base, "torch_dtype": "int4"})


def test_fit_recovers_coefficients_and_never_goes_negative():
    exact = [[t, 2e-9 * t * t + 3e-6 * t + 1e-4] for t in (64, 256, 1024, 4096)]
    assert _fit(exact, 3) == pytest.approx((2e-9, 3e-6, 1e-4), rel=1e-6)
    noisy = [[64, 5e-3], [256, 4e-3], [1024, 4.5e-3]]  # overhead-bound timings that even dip
    coefficients = _fit(noisy, 3)
    assert all(c >= 0 for c in coefficients) and coefficients[2] > 0


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128)
    return LlamaForCausalLM(config).eval()


def test_real_profile_of_a_tiny_model(daemon_factory):
    d = daemon_factory()
    model = _tiny_llama()
    with HCacheClient(d.socket) as client:
        p = profile(model, client, (32, 64, 128), repeats=2)
        assert client.list() == []  # the throwaway context is gone
    assert p.source == "measured" and p.device == "cpu" and p.geometry == Geometry(2, 64, 2, 16, "float32")
    assert all(c >= 0 for c in (*p.c_h, *p.c_tok, *p.io))
    for t in (32, 128, 1024):
        assert all(cost > 0 for cost in _values(p.costs(t)))
    assert len(p.samples["io"]) == len(p.samples["io_arena"]) == 6 and len(p.samples["c_tok"]) == 3
    assert len(p.io_arena) == 2 and all(c >= 0 for c in p.io_arena)
    assert load_profile(p.fingerprint) == p
    with pytest.raises(ValueError, match="3 distinct"):
        profile(model, client, (64, 64, 128))


def _values(costs) -> tuple[float, ...]:
    return (costs.c_h, costs.c_tok, costs.io_h, costs.io_kv)
