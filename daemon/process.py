"""Runs the real hcached as a child process on given directories: for tests, benchmarks and the demo."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

from hcache.layout import wire


class DaemonProcess:
    """One hcached: start, stop (SIGTERM), kill (SIGKILL) and restart on the same state and data dirs.

    command runs hcached (default: this interpreter's hcache.cli.hcached), e.g. an installed hcached script."""

    def __init__(self, root: Path, n_dirs: int = 1, engine: str = "auto", dram: str = "128MiB",
                 slab_size: str = "16MiB", extra: list[str] | None = None, command: list[str] | None = None) -> None:
        self.root = root
        self.command = command or [sys.executable, "-m", "hcache.cli.hcached"]
        self.state_dir = root / "state"
        self.data_dirs = [root / f"data{i}" for i in range(n_dirs)]
        # ipc paths are limited to ~107 bytes: keep the socket in a short directory of its own
        self._sock_dir = Path(tempfile.mkdtemp(prefix="hc-", dir="/tmp"))
        self.socket = str(self._sock_dir / "s.sock")
        self.args = ["--state-dir", str(self.state_dir), "--socket", self.socket, "--dram", dram,
                     "--slab-size", slab_size, "--io-engine", engine, "--lease-timeout", "10"]
        for d in self.data_dirs:
            self.args += ["--data-dir", str(d)]
        self.args += extra or []
        self.log_path = root / "hcached.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "DaemonProcess":
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([*self.command, *self.args], stdout=log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hcached exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket) and self.ping():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"hcached did not come up in {timeout}s:\n{self.log()}")

    def ping(self, timeout_ms: int = 500) -> bool:
        """Whether the daemon answers hello on its socket."""
        return self.request({"v": wire.PROTOCOL_VERSION, "op": "hello", "id": 1}, timeout_ms) is not None

    def request(self, header: dict | bytes, timeout_ms: int = 5000, frames: list | None = None) -> dict | None:
        """Send one raw request (a header map, or raw bytes) and return the decoded reply header."""
        zctx = zmq.Context.instance()
        s = zctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        try:
            s.connect(f"ipc://{self.socket}")
            raw = header if isinstance(header, bytes) else wire.encode(header)
            s.send_multipart([raw, *(frames or [])])
            if not s.poll(timeout_ms):
                return None
            return wire.decode(s.recv_multipart()[0])
        finally:
            s.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def restart(self) -> "DaemonProcess":
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop the daemon if it still runs (SIGTERM, so its arena file goes too; SIGKILL if stuck)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self._sock_dir, ignore_errors=True)
