"""The restore planner on synthetic cost profiles: optimal, honest about what is stored, and shown per layer."""

import itertools
import json
import random
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from hcache.cli.plan import plan as plan_command
from hcache.client.costs import Profile, analytical_profile, save_profile
from hcache.client.planner import (
    closed_form_plan,
    plan,
    save_plan,
    search_plan,
    simulate,
    single_method_plan,
)
from hcache.layout.geometry import Geometry

MHA = Geometry(num_layers=32, hidden_size=4096, num_kv_heads=32, head_dim=128, dtype="float16")
GQA = Geometry(num_layers=32, hidden_size=4096, num_kv_heads=8, head_dim=128, dtype="float16")  # hidden = 2×KV
# per geometry, a host: (compute FLOP/s, read bytes/s); "balanced" makes projecting as slow as reading hidden
HOSTS = {"io-bound": (100e12, 1e9), "compute-bound": (4e12, 4e9), "balanced": (2 * 4096 * 2e9, 2e9)}


def _profile(geometry: Geometry, host: str, latency: float = 50e-6) -> Profile:
    flops, bandwidth = HOSTS[host]
    return analytical_profile(geometry, flops=flops, bandwidth=bandwidth, latency=latency)


@pytest.fixture(autouse=True)
def _state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HCACHE_HOME", str(tmp_path / "state"))


@pytest.mark.parametrize("tokens", [16, 512, 32768])
@pytest.mark.parametrize("host", sorted(HOSTS))
@pytest.mark.parametrize("geometry", [MHA, GQA], ids=["mha", "gqa"])
def test_best_is_no_slower_than_any_baseline(geometry, host, tokens):
    profile = _profile(geometry, host)
    best = plan(geometry, tokens, profile=profile)
    others = [single_method_plan(m, tokens, profile) for m in ("RE", "H", "KV")] + [closed_form_plan(tokens, profile)]
    for other in others:
        assert best.makespan <= other.makespan * (1 + 1e-9), (other.name, other.methods)
    assert len(best.methods) == geometry.num_layers
    assert best.makespan >= max(best.io_time, best.compute_time)


def test_search_matches_brute_force_over_every_plan_and_availability():
    rng = random.Random(7)
    for _ in range(60):
        geometry = Geometry(num_layers=5, hidden_size=rng.choice([512, 1024]), num_kv_heads=rng.choice([2, 8]),
                            head_dim=64, dtype="bfloat16")
        profile = Profile(geometry, c_h=(rng.uniform(0, 2e-6), rng.uniform(0, 1e-4)),
                          c_tok=(rng.uniform(0, 1e-8), rng.uniform(0, 2e-5), 0.0),
                          io=(rng.uniform(1e-10, 2e-9), rng.uniform(0, 1e-4)))
        available = [rng.choice([{"H"}, {"KV"}, {"H", "KV"}, {"H", "KV"}, set()]) for _ in range(5)]
        tokens = rng.choice([32, 300, 4000])
        best = search_plan(tokens, profile, available)
        brute = min(simulate(methods, tokens, profile).makespan for methods in _every_plan(available))
        assert best.makespan == pytest.approx(brute, rel=1e-9)


def _every_plan(available):
    for r in range(len(available) + 1):
        if any(not a for a in available[r:]):
            continue
        for rest in itertools.product(*(sorted(a) for a in available[r:])):
            yield ["RE"] * r + list(rest)


def test_recompute_prefix_shrinks_as_contexts_grow():
    profile = _profile(MHA, "io-bound")
    # from 1k tokens on, where recompute's T² term (not its per-call overhead) is what grows
    prefixes = [plan(MHA, t, profile=profile).recompute_prefix for t in (1024, 4096, 16384, 131072)]
    assert prefixes == sorted(prefixes, reverse=True)
    assert prefixes[0] > prefixes[-1] > 0


def test_gqa_reads_kv_where_mha_reads_hidden():
    for tokens in (256, 8192):
        mha = plan(MHA, tokens, profile=_profile(MHA, "io-bound"))
        gqa = plan(GQA, tokens, profile=_profile(GQA, "io-bound"))
        assert "H" in mha.methods and "KV" not in mha.methods
        assert set(gqa.methods) <= {"RE", "KV"} and "KV" in gqa.methods
        # the paper's rule, blind to GQA, projects hidden states there and is slower
        assert gqa.makespan < closed_form_plan(tokens, _profile(GQA, "io-bound")).makespan


def test_compute_bound_complements_hidden_with_kv():
    profile = _profile(MHA, "compute-bound")
    best = plan(MHA, 4096, profile=profile)
    assert set(best.methods) == {"H", "KV"}
    assert best.methods == sorted(best.methods, key=["RE", "H", "KV"].index)
    assert set(closed_form_plan(4096, profile).methods) == {"H", "KV"}
    assert set(closed_form_plan(4096, _profile(MHA, "io-bound")).methods) == {"RE", "H"}


def test_availability_is_honoured():
    n = MHA.num_layers
    available = [{"H"} if i % 3 == 0 else {"KV"} if i % 3 == 1 else {"H", "KV"} for i in range(n)]
    available[5] = set()  # nothing stored: only recomputing it, and so every layer before it, works
    for host in HOSTS:
        for tokens in (64, 4096):
            best = plan(MHA, tokens, available=available, profile=_profile(MHA, host))
            r = best.recompute_prefix
            assert r >= 6 and best.methods[:r] == ["RE"] * r and "RE" not in best.methods[r:]
            for i, m in enumerate(best.methods[r:], r):
                assert m in available[i], (i, m, available[i])
            assert best.baselines()["all hidden"] is None and best.baselines()["all kv"] is None


def test_simulate_refuses_recompute_after_a_read_and_unstored_layers():
    profile = _profile(MHA, "balanced")
    with pytest.raises(ValueError, match="prefix"):
        simulate(["H", "RE"] + ["KV"] * 30, 100, profile)
    with pytest.raises(ValueError, match="not stored"):
        simulate(["KV"] * 32, 100, profile, available=[{"H"}] * 32)
    with pytest.raises(ValueError, match="each of the 32 layers"):
        plan(MHA, 100, available=[{"H"}] * 3, profile=profile)
    with pytest.raises(ValueError, match="only 'H' and/or 'KV'"):
        plan(MHA, 100, available=[{"hidden"}] * 32, profile=profile)
    with pytest.raises(ValueError, match="not Geometry"):
        plan(GQA, 100, profile=profile)
    assert plan(MHA, 0, profile=profile).makespan == 0


def test_pipeline_schedule_of_one_plan():
    geometry = Geometry(num_layers=4, hidden_size=8, num_kv_heads=1, head_dim=4, dtype="float32")  # 32 B, 32 B
    profile = Profile(geometry, c_h=(0.0, 3.0), c_tok=(0.0, 0.0, 5.0), io=(1 / 32, 0.0))  # 1 s per layer read
    p = simulate(["RE", "H", "KV", "H"], 1, profile)
    # IO: H1 0-1, KV2 1-2, H3 2-3; compute: RE0 0-5, H1 5-8, H3 8-11
    assert [s.ready for s in p.steps] == [5, 8, 2, 11]
    assert (p.io_time, p.compute_time, p.makespan) == (3, 11, 11)


def test_explain_names_every_layer_and_the_baselines():
    best = plan(GQA, 2048, profile=_profile(GQA, "io-bound"), available=[{"KV"}] * 32)
    text = best.explain()
    lines = text.splitlines()
    for i, method in enumerate(best.methods):
        assert any(line.split()[:2] == [str(i), method] for line in lines), i
    for name in ("all recompute", "all hidden", "all kv", "closed form"):
        assert name in text
    assert "not stored" in text and "1.00x" in text
    assert json.loads(json.dumps(best.to_dict()))["baselines"]["all hidden"] is None


@pytest.mark.parametrize("geometry, smaller", [(MHA, "hidden"), (GQA, "kv")], ids=["mha", "gqa"])
def test_save_plan_stores_the_plan_and_the_smaller_form_for_the_prefix(geometry, smaller):
    profile = _profile(geometry, "io-bound")
    store = save_plan(geometry, 1024, profile)
    chosen = plan(geometry, 1024, profile=profile)
    assert chosen.recompute_prefix > 0
    assert sorted(store["hidden"] + store["kv"]) == list(range(geometry.num_layers))
    for i, m in enumerate(chosen.methods):
        assert i in store[{"H": "hidden", "KV": "kv", "RE": smaller}[m]]


def test_plan_uses_the_measured_profile_in_the_state_dir():
    assert plan(MHA, 100).profile.source == "analytical"
    measured = Profile(MHA, c_h=(1e-6, 0.0), c_tok=(0.0, 1e-3, 0.0), io=(1e-12, 0.0), device="cpu",
                       source="measured")
    save_profile(measured)
    assert plan(MHA, 100).profile == measured
    assert plan(MHA, 100).methods == ["KV"] * 32  # reads almost free


def _cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def main(as_json: bool = typer.Option(False, "--json")) -> None:
        """hcachectl's global options, as plan sees them."""

    app.command()(plan_command)
    return app


def test_cli_plans_from_a_config(tmp_path):
    config = {"hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 32,
              "intermediate_size": 14336, "torch_dtype": "bfloat16"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    runner = CliRunner()
    text = runner.invoke(_cli(), ["plan", "--model", str(tmp_path), "--tokens", "4096"])
    assert text.exit_code == 0, text.output
    assert "L32-D4096-kv8x128-bfloat16" in text.output and "closed form" in text.output
    for flags in (["plan", "--json"], ["--json", "plan"]):
        js = runner.invoke(_cli(), [*flags, "--model", str(tmp_path / "config.json"), "--tokens", "64",
                                    "--bandwidth", "4", "--device", "cpu"])
        assert js.exit_code == 0, js.output
        out = json.loads(js.output)
        assert out["tokens"] == 64 and len(out["layers"]) == 32 and out["profile"]["source"] == "analytical"
    other = tmp_path / "other.json"
    other.write_text(_profile(MHA, "balanced").to_json())
    bad = runner.invoke(_cli(), ["plan", "--model", str(tmp_path), "--tokens", "64", "--profile", str(other)])
    assert bad.exit_code == 2 and "not this model's" in bad.output
    missing = runner.invoke(_cli(), ["plan", "--model", str(tmp_path / "nope"), "--tokens", "64"])
    assert missing.exit_code == 2 and "config.json" in missing.output
    counts = {}
    for passes in ("1", "500"):  # a context decoded token by token: exact restores pay per pass, reads do not
        js = runner.invoke(_cli(), ["plan", "--json", "--model", str(tmp_path), "--tokens", "1024", "--bandwidth", "2",
                                    "--passes", passes])
        assert js.exit_code == 0, js.output
        counts[passes] = [layer["method"] for layer in json.loads(js.output)["layers"]].count("KV")
    assert counts["500"] > counts["1"]


def test_planning_does_not_load_torch():
    code = ("import sys, hcache.cli.plan, hcache.client.planner; from hcache.client import plan, Geometry; "
            "print(plan(Geometry(num_layers=2, hidden_size=64, num_kv_heads=2, head_dim=16, dtype='float16'), 100)"
            ".explain()); "
            "assert 'torch' not in sys.modules")
    out = subprocess.run([sys.executable, "-c", code], check=True, timeout=60, capture_output=True, text=True)
    assert "LAYER" in out.stdout and "all recompute" in out.stdout  # hcache.client.plan explains itself


def test_contexts_built_by_many_decode_steps_plan_fewer_recomputes():
    """Exact restores redo each forward pass: a context of 500 one-token decode steps makes recompute and
    projection pay their per-call cost 500 times, and reads win."""
    profile = _profile(MHA, "balanced")
    one_pass = plan(MHA, 1024, profile=profile)
    decoded = plan(MHA, 1024, profile=profile.for_passes(500))
    assert decoded.methods.count("KV") > one_pass.methods.count("KV")
    assert decoded.methods.count("H") < one_pass.methods.count("H")
    assert decoded.makespan <= min(p.makespan for p in decoded.baselines().values() if p is not None)


def test_reads_of_chunks_in_the_arena_cost_the_arena_rate():
    """A context hcached holds in memory is read at the arena's rate: where reads from a slow disk make recomputing
    the first layers pay, reading every layer from the arena is faster still."""
    slow_disk = Profile(GQA, c_h=(1e-7, 0.0), c_tok=(0.0, 1e-4, 0.0), io=(1 / 0.2e9, 0.0), device="cpu",
                        io_arena=(1 / 10e9, 0.0))
    stored = [{"KV"}] * 32
    cold = plan(GQA, 1024, profile=slow_disk, available=stored)
    warm = plan(GQA, 1024, profile=slow_disk.for_resident(1.0, 1.0), available=stored)
    assert cold.recompute_prefix > 0
    assert warm.methods == ["KV"] * 32 and warm.makespan < cold.makespan / 10
    half = slow_disk.for_resident(0.0, 0.5).costs(1024)
    assert half.io_kv == pytest.approx((slow_disk.costs(1024).io_kv + warm.profile.costs(1024).io_kv) / 2)
    assert half.io_h == slow_disk.costs(1024).io_h  # no hidden state resident
    assert Profile.from_dict(json.loads(json.dumps(slow_disk.to_dict()))) == slow_disk
    with pytest.raises(ValueError, match="within 0..1"):
        slow_disk.for_resident(1.5, 0.0)


def test_small_layers_share_a_read_requests_latency():
    """restore() reads small layers several to a request (up to 4 MiB): the planner charges each its share."""
    latency_only = Profile(GQA, c_h=(0.0, 0.0), c_tok=(0.0, 0.0, 0.0), io=(0.0, 1e-3))
    assert latency_only.costs(64).io_kv == pytest.approx(1e-3 / 16)  # 4 KiB a token: 256 KiB a layer
    assert latency_only.costs(4096).io_kv == pytest.approx(1e-3)  # 16 MiB: a request of its own
