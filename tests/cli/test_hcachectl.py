"""hcachectl against the real daemon, in human and --json form, and with no daemon at all."""

import json
import subprocess
import sys

import torch

from hcache.client import HCacheClient
from tests.e2e.data import MHA, Expected, geometry


def _ctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hcache.cli.hcachectl", *args], capture_output=True, text=True,
                          timeout=60)


def test_status_human_and_json(daemon_factory):
    d = daemon_factory(n_dirs=2)
    exp = Expected(geometry(MHA, "float32"))
    with HCacheClient(d.socket) as c:
        c.open("s", model="tiny", geometry=exp.geometry, layers=exp.layers)
        c.append("s", *exp.round(100, torch.Generator().manual_seed(0)))
        c.flush()
    human = _ctl("--socket", d.socket, "status")
    assert human.returncode == 0, human.stderr
    assert "io engine  io_uring" in human.stdout
    for dd in d.data_dirs:
        assert str(dd) in human.stdout
    assert "O_DIRECT" in human.stdout and "contexts   1" in human.stdout
    js = _ctl("--socket", d.socket, "--json", "status")
    assert js.returncode == 0, js.stderr
    s = json.loads(js.stdout)
    assert s["engine"] == "io_uring" and s["contexts"] == 1
    assert [x["path"] for x in s["data_dirs"]] == [str(p) for p in d.data_dirs]
    assert sum(x["used"] for x in s["data_dirs"]) > 0 and s["arena"]["dirty"] == 0


def test_daemon_not_running_exits_3_naming_the_socket(tmp_path):
    sock = str(tmp_path / "none.sock")
    for extra in ([], ["--json"]):
        r = _ctl("--socket", sock, *extra, "status")
        assert r.returncode == 3
        assert sock in r.stderr and "HCACHE_SOCKET" in r.stderr
