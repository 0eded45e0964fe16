"""The Prometheus endpoint of the real hcached: text the official parser accepts, counters that move."""

import json
import subprocess
import sys
import urllib.request

import torch
from prometheus_client.parser import text_string_to_metric_families

from hcache.client import HCacheClient
from hcache.layout.geometry import Rep
from tests.e2e.data import MHA, Expected, geometry


def _scrape(address: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_endpoint_serves_prometheus_text_whose_counters_move(daemon_factory):
    d = daemon_factory(extra=["--metrics", "127.0.0.1:0"])
    with HCacheClient(d.socket) as c:
        address = c.status()["metrics"]
        before = _scrape(address)
        assert before[("hcache_saved_bytes_total", ())] == 0 == before[("hcache_logical_bytes", ())]
        assert before[("hcache_io_engine_info", (("engine", c.status()["engine"]),))] == 1
        dirs = [k for k in before if k[0] == "hcache_data_dir_used_bytes"]
        assert [dict(k[1])["dir"] for k in dirs] == [str(p) for p in d.data_dirs]
        exp = Expected(geometry(MHA, "float32"))
        c.open("m", model="tiny", geometry=exp.geometry, layers=exp.layers)
        c.append("m", *exp.round(100, torch.Generator().manual_seed(0)))
        c.flush("m")
        c.restore("m", "hidden")
        after = _scrape(address)
    saved = 100 * sum(exp.geometry.token_bytes(r) * n for r, n in
                      ((Rep.HIDDEN, 3), (Rep.KV, 2), (Rep.TOKENS, 1)))  # 3 hidden layers, 2 kv, the token ids
    assert after[("hcache_saved_bytes_total", ())] == saved
    assert after[("hcache_restored_bytes_total", ())] == 100 * 3 * exp.geometry.token_bytes(Rep.HIDDEN)
    assert after[("hcache_chunk_reads_total", (("source", "arena"),))] > 0
    assert after[("hcache_restore_latency_seconds_count", ())] >= 1
    assert after[("hcache_written_bytes_total", ())] > 0
    assert after[("hcache_data_dir_used_bytes", dirs[0][1])] > before[("hcache_data_dir_used_bytes", dirs[0][1])]
    assert after[("hcache_contexts", ())] == 1
    # hcachectl stats reports the same figures
    stats = subprocess.run([sys.executable, "-m", "hcache.cli.hcachectl", "--socket", d.socket, "--json", "stats"],
                           capture_output=True, text=True, timeout=60)
    figures = {s["name"]: s["value"] for fam in json.loads(stats.stdout)["metrics"] for s in fam["samples"]
               if not s["labels"]}
    assert figures["hcache_saved_bytes_total"] == saved
    # a fork shares the full chunks: logical bytes grow by its chunk row, the data dirs by its own token ids alone
    with HCacheClient(d.socket) as c:
        logical = c.status()["logical"]
        assert after[("hcache_logical_bytes", ())] == logical > 0
        c.fork("m", "m2", 64)
        forked = _scrape(address)
        assert forked[("hcache_logical_bytes", ())] == c.status()["logical"] == logical * 3 // 2  # 2 rows, then 3
    grown = sum(forked[k] - after[k] for k in forked if k[0] == "hcache_data_dir_used_bytes")
    assert 0 < grown < logical // 2
    # a restart starts from the disk: a restore is then counted as disk reads
    d.restart()
    with HCacheClient(d.socket) as c:
        address = c.status()["metrics"]
        c.restore("m", "kv")
    again = _scrape(address)
    assert again[("hcache_chunk_reads_total", (("source", "disk"),))] == 2 * 2  # 2 kv layers x 2 chunks
    assert again[("hcache_logical_bytes", ())] == forked[("hcache_logical_bytes", ())]  # counted again from the index


def test_metrics_are_off_unless_asked_for(daemon_factory):
    d = daemon_factory()
    with HCacheClient(d.socket) as c:
        assert c.status()["metrics"] == ""
