"""The sdist and the wheel built from it, installed into a fresh venv: hcached, hcachectl and a save/restore."""

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Callable
from email.parser import Parser
from pathlib import Path

import pytest

import hcache
from hcache.daemon.process import DaemonProcess

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[2]
DIST = "hcache-kv"
WHEEL_STEM = f"hcache_kv-{hcache.__version__}"
TORCH_PIN = "torch==2.13.0"  # as the Makefile pins: the CPU build pip finds in its find-links
PACKAGES = ["hcache", "hcache/cli", "hcache/client", "hcache/daemon", "hcache/layout"]
# No PYTHONPATH or PYTHONHOME: nothing but the fresh venv may supply hcache.
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}

# Run by the fresh venv's python (in isolated mode, from a temp dir) against the installed hcached.
CLIENT = """
import importlib.metadata, json, sys
import torch
import hcache
from hcache.client import Geometry, HCacheClient

geometry = Geometry(dtype="bfloat16", num_layers=2, hidden_size=128, num_kv_heads=4, head_dim=32)
gen = torch.Generator().manual_seed(0)
ids = torch.randint(0, 50_000, (100,), generator=gen)
data = {"hidden": torch.randn(2, 100, 128, generator=gen).to(torch.bfloat16),
        "kv": torch.randn(1, 100, 2, 4, 32, generator=gen).to(torch.bfloat16)}
with HCacheClient(sys.argv[1]) as c:
    c.open("wheel", model="tiny", geometry=geometry, layers={"hidden": [0, 1], "kv": [1]})
    c.append("wheel", ids, data)
    c.flush("wheel", drop=True)  # drop: the restores read the chunks back from the data dir
    same = {rep: torch.equal(c.restore("wheel", rep).view(torch.uint8), t.view(torch.uint8))
            for rep, t in data.items()}
    same["tokens"] = torch.equal(c.tokens("wheel"), ids)
    print(json.dumps({"file": hcache.__file__, "version": hcache.__version__,
                      "dist_version": importlib.metadata.version("hcache-kv"),
                      "durable": c.stat("wheel").durable_tokens, "same": same,
                      "disk_reads": c.status()["disk_reads"]}))
"""


def _run(cmd: list[str | Path], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run cmd; fail the test naming what did not work, with the end of its output."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=240)
    if r.returncode != 0:
        pytest.fail(f"{what} failed (exit {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist built from the work tree, and the wheel that sdist builds (python -m build's default)."""
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--outdir", out, REPO],
         "python -m build (the dev extras bring it: pip install -e '.[dev]')")
    sdist, wheel = out / f"{WHEEL_STEM}.tar.gz", out / f"{WHEEL_STEM}-py3-none-any.whl"
    assert sdist.is_file() and wheel.is_file(), f"python -m build left {sorted(p.name for p in out.iterdir())}"
    return sdist, wheel


@pytest.fixture(scope="module")
def fresh_venv(dists: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new venv holding CPU torch, then the wheel with its dependencies and the client extra."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], "creating a venv")
    # This venv's pip installs into the new one; --no-compile: byte-compiling torch would double the time.
    pip = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-compile"]
    _run([*pip, TORCH_PIN], f"pip install {TORCH_PIN}")
    _run([*pip, f"{dists[1]}[client]"], f"pip install {dists[1].name}[client]")
    return venv


def test_the_wheel_holds_the_hcache_packages_and_nothing_else(dists: tuple[Path, Path]) -> None:
    with zipfile.ZipFile(dists[1]) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(f"{WHEEL_STEM}.dist-info/METADATA").decode())
        entry_points = z.read(f"{WHEEL_STEM}.dist-info/entry_points.txt").decode()
    assert {n.split("/")[0] for n in names} == {"hcache", f"{WHEEL_STEM}.dist-info"}
    assert all(f"{p}/__init__.py" in names for p in PACKAGES), sorted(names)
    assert meta["Name"] == DIST and meta["Version"] == hcache.__version__
    assert meta["Description-Content-Type"] == "text/markdown"
    assert meta.get_payload().startswith("# hcache\n")  # the README
    assert "hcached = hcache.cli.hcached:main" in entry_points
    assert "hcachectl = hcache.cli.hcachectl:app" in entry_points


def test_the_sdist_holds_the_mapped_sources_and_the_systemd_files(dists: tuple[Path, Path]) -> None:
    with tarfile.open(dists[0]) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for d in ("hcache", "cli", "client", "daemon", "layout"):
        assert f"{d}/__init__.py" in names
    assert {"pyproject.toml", "README.md", "MANIFEST.in", "systemd/hcached.service", "systemd/hcached.toml",
            "systemd/hcache.sysusers.conf"} <= names
    assert not any(n.startswith(("tests/", "bench/", "examples/", ".venv/")) for n in names)


def test_the_installed_commands_start(fresh_venv: Path, tmp_path: Path) -> None:
    for command, words in (("hcached", "--data-dir"), ("hcachectl", "status")):
        r = _run([fresh_venv / "bin" / command, "--help"], f"{command} --help", cwd=tmp_path)
        assert words in r.stdout


def test_save_and_restore_through_the_installed_daemon_and_client(
        fresh_venv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        daemon_factory: Callable[..., DaemonProcess]) -> None:
    monkeypatch.delenv("PYTHONPATH", raising=False)  # DaemonProcess passes on this process's environment
    # A console script puts its own bin dir on sys.path, not the cwd: the installed hcache runs, wherever from.
    d = daemon_factory(command=[str(fresh_venv / "bin" / "hcached")])
    r = _run([fresh_venv / "bin" / "python", "-I", "-c", CLIENT, d.socket], "the save/restore script",
             cwd=tmp_path)
    got = json.loads(r.stdout)
    assert Path(got["file"]).is_relative_to(fresh_venv / "lib"), got["file"]
    assert got["version"] == got["dist_version"] == hcache.__version__
    assert got["durable"] == 100 and got["disk_reads"] > 0
    assert got["same"] == {"hidden": True, "kv": True, "tokens": True}
    ls = _run([fresh_venv / "bin" / "hcachectl", "--socket", d.socket, "--json", "ls"], "hcachectl ls",
              cwd=tmp_path)
    assert [(c["ctx"], c["n_tokens"]) for c in json.loads(ls.stdout)["contexts"]] == [("wheel", 100)]
