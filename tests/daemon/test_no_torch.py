"""The daemon runs where torch is not installed: none of its modules may import torch."""

import json
import subprocess
import sys

import pytest

_PROBE = """
import json, sys
for name in sys.argv[1:]:
    __import__(name)
print(json.dumps(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))))
"""


def _torch_modules_after(*modules: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *modules], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_daemon_modules_do_not_import_torch():
    assert _torch_modules_after("hcache.daemon.main", "hcache.daemon.server", "hcache.cli.hcached") == []


def test_every_daemon_and_layout_module_leaves_torch_out():
    modules = ["hcache.daemon.arena", "hcache.daemon.cache", "hcache.daemon.config", "hcache.daemon.contexts",
               "hcache.daemon.flusher", "hcache.daemon.index", "hcache.daemon.io_engine", "hcache.daemon.leases",
               "hcache.daemon.process", "hcache.daemon.slabs", "hcache.daemon.store", "hcache.daemon.thread_engine",
               "hcache.daemon.uring_engine", "hcache.daemon.config_sources", "hcache.daemon.eviction",
               "hcache.daemon.fsck", "hcache.daemon.logs", "hcache.daemon.metrics", "hcache.daemon.notify",
               "hcache.daemon.space",
               "hcache.layout.chunks", "hcache.layout.geometry", "hcache.layout.keys", "hcache.layout.paths",
               "hcache.layout.units", "hcache.layout.wire"]
    assert _torch_modules_after(*modules) == []


def test_the_client_package_loads_torch_only_when_a_data_path_class_is_used():
    assert _torch_modules_after("hcache.client", "hcache.client.errors") == []


def test_the_probe_sees_torch_when_it_is_imported():
    """The check above can fail: a module that does import torch shows up."""
    pytest.importorskip("torch")
    assert "torch" in _torch_modules_after("hcache.client.aio")
