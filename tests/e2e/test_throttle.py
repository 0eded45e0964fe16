"""--read-throttle caps the daemon's disk reads, so benchmarks can emulate slower disks."""

import time

import torch

from hcache.client import HCacheClient
from tests.e2e.data import Expected, geometry

SHAPE = dict(num_layers=2, hidden_size=1024, num_kv_heads=8, head_dim=128)


def test_cold_reads_take_at_least_bytes_over_the_cap(daemon_factory):
    d = daemon_factory(extra=["--read-throttle", "8MiB"])
    exp = Expected(geometry(SHAPE, "float32"), layers={"hidden": [0, 1], "kv": [0]})
    with HCacheClient(d.socket) as c:
        c.open("t", model="tiny", geometry=exp.geometry, layers=exp.layers)
        c.append("t", *exp.round(512, torch.Generator().manual_seed(0)))  # 4 MiB of hidden states
    d.restart()
    with HCacheClient(d.socket) as c:
        t = time.perf_counter()
        got = c.restore("t", "hidden")
        elapsed = time.perf_counter() - t
    assert torch.equal(got, exp.all("hidden"))
    assert elapsed >= 4 / 8 * 0.9  # 4 MiB (plus headers) at 8 MiB/s
