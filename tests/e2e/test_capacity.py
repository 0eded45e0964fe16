"""Capacity and eviction with the real hcached: LRU of whole contexts, pins, watermarks, TTL, SIGHUP."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from hcache.client import HCacheClient, OverCapacity
from hcache.client.control import ControlClient
from tests.e2e.data import MHA, Expected, assert_restores, geometry

MIB = 1 << 20
# ~1 MiB on disk per context of 256 tokens with this geometry; 1 MiB slab files keep growth fine-grained
SLABS = "1MiB"


def _save(c: HCacheClient, name: str, n: int = 256, seed: int = 0) -> Expected:
    exp = Expected(geometry(MHA, "float32"))
    c.open(name, model="tiny", geometry=exp.geometry, layers=exp.layers)
    c.append(name, *exp.round(n, torch.Generator().manual_seed(seed)))
    c.flush(name)
    return exp


def _pin(d, name: str) -> None:
    with ControlClient(d.socket) as ctl:
        ctl.call("pin", ns="default", ctx=name)


def _names(c: HCacheClient) -> set[str]:
    return {i.id for i in c.list()}


def _wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _ctl(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hcache.cli.hcachectl", "--socket", d.socket, *args],
                          capture_output=True, text=True, timeout=60)


def test_filling_past_capacity_evicts_lru_contexts_never_pinned_and_never_exceeds_it(daemon_factory):
    capacity = 8 * MIB
    d = daemon_factory(slab_size=SLABS, extra=["--capacity", "8MiB"])
    saved: dict[str, Expected] = {}
    with HCacheClient(d.socket) as c:
        saved["c0"] = _save(c, "c0", seed=0)
        _pin(d, "c0")  # the oldest, but pinned
        for i in range(1, 10):  # 7 contexts fit in 8 MiB of 1 MiB slab files
            saved[f"c{i}"] = _save(c, f"c{i}", seed=i)
            if i == 5:
                c.restore("c1", "hidden")  # c1 is now more recent than c2..c5
            s = c.status()
            assert s["used"] <= capacity and sum(x["allocated"] for x in s["data_dirs"]) <= capacity
        names = _names(c)
        assert "c0" in names and "c1" in names and "c9" in names
        assert not {"c2", "c3"} & names  # the least recently used went first
        for name in names:
            assert_restores(c, name, saved[name])  # whatever stayed is whole
        s = c.status()
        assert s["evictions"]["capacity"] == 10 - len(names) >= 2
        assert s["used"] <= capacity


def test_a_save_that_can_never_fit_is_refused_at_once(daemon_factory):
    d = daemon_factory(slab_size=SLABS, extra=["--capacity", "4MiB"])
    with HCacheClient(d.socket) as c:
        exp = Expected(geometry(MHA, "float32"))
        c.open("huge", model="tiny", geometry=exp.geometry, layers=exp.layers)
        started = time.monotonic()
        with pytest.raises(OverCapacity, match="capacity"):
            c.append("huge", *exp.round(64 * 20, torch.Generator().manual_seed(1)))  # ~5 MiB on disk
        assert time.monotonic() - started < 2
        _save(c, "small")  # the daemon goes on serving
        assert _names(c) == {"huge", "small"}


def test_evict_until_free_frees_at_least_that_much_lru_first(daemon_factory):
    d = daemon_factory(slab_size=SLABS, extra=["--capacity", "8MiB"])
    with HCacheClient(d.socket) as c:
        for i in range(5):
            _save(c, f"c{i}", seed=i)
        _pin(d, "c0")
        before = c.status()
    assert before["free"] < 5 * MIB
    r = _ctl(d, "--json", "evict", "--until-free", "5MiB")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    with HCacheClient(d.socket) as c:
        after = c.status()
        assert after["free"] >= 5 * MIB and out["free"] == after["free"]
        assert before["used"] - after["used"] == out["freed"] >= 5 * MIB - before["free"]
        assert [name for _, name in out["evicted"]] == ["c1", "c2"]  # least recently used first, c0 pinned
        assert _names(c) == {"c0", "c3", "c4"}
    r = _ctl(d, "evict", "--until-free", "8MiB")  # only the pinned context could make that room
    assert r.returncode == 1 and "pinned" in r.stderr
    with HCacheClient(d.socket) as c:
        assert _names(c) == {"c0"}


@pytest.mark.parametrize("restart", [False, True])
def test_reads_make_contexts_recently_used_also_across_a_clean_restart(daemon_factory, restart):
    d = daemon_factory(slab_size=SLABS, extra=["--capacity", "8MiB"])
    with HCacheClient(d.socket) as c:
        for i in range(4):
            _save(c, f"c{i}", seed=i)
        for name in ("c0", "c2"):  # read after all were saved
            c.restore(name, "hidden", [0])
    if restart:  # sooner than the evictor writes read accesses to the index on its own (every 10 s)
        d.stop()
        d.start()
    with HCacheClient(d.socket) as c:
        free = c.status()["free"]
    r = _ctl(d, "--json", "evict", "--until-free", str(free + 3 * MIB // 2))  # room for two contexts' worth
    assert r.returncode == 0, r.stderr
    assert [name for _, name in json.loads(r.stdout)["evicted"]] == ["c1", "c3"]


def test_ttl_expires_contexts_not_accessed_but_never_pinned_ones(daemon_factory):
    d = daemon_factory(slab_size=SLABS, extra=["--ttl", "1s"])
    with HCacheClient(d.socket) as c:
        _save(c, "old")
        _save(c, "kept")
        _pin(d, "kept")
        assert _wait_for(lambda: "old" not in _names(c), timeout=6)
        time.sleep(1.5)
        assert _names(c) == {"kept"}
        assert c.status()["evictions"]["ttl"] == 1


def test_sighup_changes_capacity_live_and_evicts_down_to_the_low_watermark(daemon_factory, tmp_path):
    config = tmp_path / "hcached.toml"
    config.write_text('capacity = "16MiB"\nlow_watermark = 0.5\nhigh_watermark = 0.6\n')
    d = daemon_factory(slab_size=SLABS, extra=["--config", str(config)])
    with HCacheClient(d.socket) as c:
        for i in range(6):
            _save(c, f"c{i}", seed=i)
        assert c.status()["capacity"] == 16 * MIB and len(_names(c)) == 6
        config.write_text('capacity = "6MiB"\nlow_watermark = 0.5\nhigh_watermark = 0.6\nttl = "1h"\n')
        d.proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: c.status()["capacity"] == 6 * MIB)
        assert _wait_for(lambda: c.status()["used"] <= 3 * MIB)
        s = c.status()
        assert s["ttl"] == 3600 and s["evictions"]["capacity"] >= 3
        assert "c5" in _names(c) and "c0" not in _names(c)
    assert "SIGHUP: capacity 16.0 MiB -> 6.0 MiB" in d.log()


def test_an_append_that_fits_only_without_the_pinned_contexts_is_refused_until_they_are_unpinned(daemon_factory):
    d = daemon_factory(slab_size=SLABS, extra=["--capacity", "8MiB"])
    with HCacheClient(d.socket) as c:
        for i in range(4):  # ~4 MiB on disk, pinned
            _save(c, f"p{i}", seed=i)
            _pin(d, f"p{i}")
        big = Expected(geometry(MHA, "float32"))
        c.open("big", model="tiny", geometry=big.geometry, layers=big.layers)
        ids, data = big.round(1280, torch.Generator().manual_seed(9))  # ~5 MiB: fits 8, not 8 less 4 pinned
        with pytest.raises(OverCapacity, match="pinned"):
            c.append("big", ids, data)
    d.kill()  # the pinned bytes are counted again from the index at start-up
    d.start()
    with HCacheClient(d.socket) as c:
        with pytest.raises(OverCapacity, match="pinned"):
            c.append("big", ids, data)
        with ControlClient(d.socket) as ctl:
            for i in range(4):
                ctl.call("pin", ns="default", ctx=f"p{i}", pinned=False)
        c.append("big", ids, data)
        c.flush("big")
        assert "big" in _names(c)


def test_capacity_pressure_never_frees_a_chunk_a_kept_context_references(daemon_factory):
    d = daemon_factory(slab_size=SLABS, extra=["--capacity", "8MiB"], engine="threads")
    with HCacheClient(d.socket) as c:
        base = _save(c, "base", n=256, seed=100)  # the oldest: evicted first
        c.fork("base", "kept", 256)  # shares all of base's layer chunks
        _pin(d, "kept")
        for i in range(12):  # far more than fits: base and the older of these go
            _save(c, f"c{i}", seed=i)
        names = _names(c)
        assert "base" not in names and "kept" in names
        assert_restores(c, "kept", base)
