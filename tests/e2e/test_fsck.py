"""hcachectl fsck with the real hcached: every chunk's crc checked; the index rebuilt from chunk headers alone."""

import json
import subprocess
import sys

import torch

from hcache.client import HCacheClient
from hcache.layout.chunks import HEADER_SIZE
from hcache.layout.geometry import Rep
from tests.e2e.data import GQA, MHA, Expected, assert_restores, geometry
from tests.e2e.disk import flip_byte, scan


def _ctl(d, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hcache.cli.hcachectl", "--socket", d.socket, *args],
                          capture_output=True, text=True, timeout=120)


def _save(c: HCacheClient, name: str, exp: Expected, rounds: list[int], seed: int) -> Expected:
    gen = torch.Generator().manual_seed(seed)
    c.open(name, model="tiny", geometry=exp.geometry, layers=exp.layers)
    for n in rounds:
        c.append(name, *exp.round(n, gen))
        c.flush(name)  # each flush writes the tail padded; the next round rewrites it elsewhere
    return exp


def test_rebuild_after_losing_the_index_brings_back_every_durable_context_bit_exact(daemon_factory):
    d = daemon_factory(n_dirs=2)
    with HCacheClient(d.socket) as c:
        a = _save(c, "a", Expected(geometry(MHA, "float32")), [100, 50, 70], seed=1)
        b = _save(c, "b", Expected(geometry(GQA, "bfloat16"), layers={"hidden": [1], "kv": [0, 2]}), [130], seed=2)
        _save(c, "gone", Expected(geometry(MHA, "float32")), [200], seed=3)
        c.delete("gone")
        _save(c, "again", Expected(geometry(MHA, "float32")), [300], seed=4)
        c.delete("again")
        again = _save(c, "again", Expected(geometry(MHA, "float32")), [90], seed=5)  # fewer tokens than before
        _save(c, "empty-ns", Expected(geometry(MHA, "float32")), [64], seed=6)
    d.stop()
    for f in d.state_dir.glob("index.sqlite*"):
        f.unlink()
    d.start()
    assert "is new but the data dirs hold chunks" in d.log()
    with HCacheClient(d.socket) as c:
        assert c.list() == []
    r = _ctl(d, "fsck", "--rebuild")
    assert r.returncode == 0, r.stderr
    assert "4 contexts" in r.stdout
    with HCacheClient(d.socket) as c:
        assert {i.id for i in c.list()} == {"a", "b", "again", "empty-ns"}  # "gone" stays gone
        assert_restores(c, "a", a)
        assert_restores(c, "b", b)
        assert_restores(c, "again", again)  # the second incarnation, not the deleted one's longer data
    d.restart()  # the rebuilt index is the index now
    with HCacheClient(d.socket) as c:
        assert_restores(c, "a", a)
    r = _ctl(d, "--json", "fsck")
    assert r.returncode == 0 and json.loads(r.stdout)["problems"] == []


def test_fsck_finds_a_corrupted_chunk_and_exits_1(daemon_factory):
    d = daemon_factory()
    with HCacheClient(d.socket) as c:
        _save(c, "chat", Expected(geometry(MHA, "float32")), [200], seed=7)
        _save(c, "fine", Expected(geometry(MHA, "float32")), [100], seed=8)
    ok = _ctl(d, "fsck")
    assert ok.returncode == 0 and "no problems" in ok.stdout
    # chat's full chunks are owned by content (their headers name no context); fine has no full chunk 1
    victim = next(o for o in scan(d.data_dirs[0]) if o.header.meta.get("shared") and o.header.layer == 2
                  and o.header.rep is Rep.HIDDEN and o.header.chunk == 1)
    flip_byte(victim.path, victim.offset + HEADER_SIZE + 7)  # while the daemon runs: fsck reads the disk
    human = _ctl(d, "fsck")
    assert human.returncode == 1
    assert "1 problems" in human.stdout and "payload crc mismatch" in human.stdout
    row = next(line for line in human.stdout.splitlines() if line.startswith("default"))
    assert row.split()[:5] == ["default", "chat", "2", str(int(Rep.HIDDEN)), "1"]
    js = _ctl(d, "--json", "fsck")
    assert js.returncode == 1
    out = json.loads(js.stdout)
    assert [(p["ctx"], p["layer"], p["chunk"]) for p in out["problems"]] == [("chat", 2, 1)]
    assert out["checked"] > 1 and out["contexts"] == 2
    with HCacheClient(d.socket) as c:
        assert sum(x["errors"] for x in c.status()["data_dirs"]) >= 2  # counted for stats and metrics
