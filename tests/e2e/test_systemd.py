"""systemd/hcached.service: systemd-analyze accepts it, and its ExecStart tells a notify socket READY=1."""

import configparser
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "hcached.service"
EXAMPLE = UNIT.with_name("hcached.toml")
INSTALLED = "/usr/local/bin/hcached"  # where README's install puts the entry point
HCACHED = str(Path(sys.executable).with_name("hcached"))


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def _exec_start() -> list[str]:
    return shlex.split(_service()["ExecStart"])


def test_the_unit_is_what_an_operator_expects():
    s = _service()
    assert s["Type"] == "notify" and s["Restart"] == "on-failure" and s["LimitMEMLOCK"] == "infinity"
    assert (s["User"], s["Group"], s["RuntimeDirectory"], s["StateDirectory"]) == ("hcache",) * 4
    assert s["ProtectSystem"] == "strict" and s["NoNewPrivileges"] == "yes" and s["PrivateTmp"] == "yes"
    assert _exec_start() == [INSTALLED, "--config", "/etc/hcache/hcached.toml"]
    assert "/var/lib/hcache" in UNIT.read_text().split("ReadWritePaths=", 1)[1]
    example = EXAMPLE.read_text()
    assert 'socket = "/run/hcache/hcached.sock"' in example and 'state_dir = "/var/lib/hcache"' in example


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_passes_without_warnings(tmp_path):
    """ExecStart is pointed at this install's hcached (verify checks the binary exists); nothing else changes."""
    unit = tmp_path / "hcached.service"
    unit.write_text(UNIT.read_text().replace(f"ExecStart={INSTALLED} ", f"ExecStart={HCACHED} "))
    assert HCACHED in unit.read_text()
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout + r.stderr == "", r.stdout + r.stderr


def test_the_exec_start_command_sends_ready_then_stopping(tmp_path):
    """ExecStart run by hand with NOTIFY_SOCKET set: READY=1 once the socket is bound, STOPPING=1 on SIGTERM."""
    config = tmp_path / "hcached.toml"
    short = Path(tempfile.mkdtemp(prefix="hcn-", dir="/tmp"))  # unix socket paths must stay short
    sock_path = short / "s.sock"
    example = EXAMPLE.read_text()
    for key, value in (("state_dir", tmp_path / "state"), ("data_dirs", [str(tmp_path / "data")]),
                       ("socket", sock_path), ("dram", "32MiB"), ("slab_size", "4MiB")):
        start = example.index(f"\n{key} = ") + 1
        end = example.index("\n", start)
        shown = f'["{value[0]}"]' if isinstance(value, list) else f'"{value}"'
        example = example[:start] + f"{key} = {shown}" + example[end:]
    config.write_text(example)
    argv = _exec_start()
    argv[0] = HCACHED
    argv[argv.index("--config") + 1] = str(config)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(short / "notify"))
    notify.settimeout(30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HCACHE_")}
    proc = subprocess.Popen(argv, env={**env, "NOTIFY_SOCKET": str(short / "notify")}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready = notify.recv(4096).decode()
        assert ready.splitlines()[0] == "READY=1"
        assert sock_path.exists()  # READY came after the socket was bound
        proc.send_signal(signal.SIGTERM)
        assert notify.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        shutil.rmtree(short, ignore_errors=True)
    assert f"configuration from {config}" in proc.stderr.read()


def test_notify_reaches_an_abstract_socket(monkeypatch):
    from hcache.daemon.notify import notify

    name = f"hcache-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify("READY=1")
        assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert notify("READY=1") is False
