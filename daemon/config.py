"""The daemon's configuration: one validated dataclass with the defaults an operator expects."""

import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from hcache.layout.paths import default_socket_path, default_state_dir

IO_ENGINES = ("auto", "io_uring", "threads")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# What SIGHUP can change in a running daemon; the rest needs a restart.
LIVE_KEYS = ("capacity", "dir_capacity", "high_watermark", "low_watermark", "ttl", "log_level")


@dataclass(slots=True)
class Config:
    """Everything hcached needs to start; paths are resolved in __post_init__."""

    state_dir: Path = field(default_factory=default_state_dir)
    data_dirs: list[Path] = field(default_factory=list)
    socket: str = ""
    dram: int = 1 << 30
    capacity: int = 0  # total disk bytes for slabs; 0 = bounded only by the file systems
    dir_capacity: int = 0  # disk bytes for slabs in each data dir; 0 = bounded only by its file system
    high_watermark: float = 0.95  # of capacity: above it, least recently used contexts are evicted...
    low_watermark: float = 0.85  # ...until usage is back under this
    ttl: float = 0.0  # seconds since last access after which a context is evicted; 0 = never
    tcp: str = ""
    metrics: str = ""  # HOST:PORT (or PORT, on 127.0.0.1) for Prometheus text at /metrics; "" = off
    io_engine: str = "auto"
    slab_size: int = 256 << 20
    lease_timeout: float = 30.0
    flush_batch: int = 64 << 20
    log_level: str = "INFO"
    read_throttle: int = 0  # bytes/s cap on disk reads, to emulate a slower disk in benchmarks; 0 = none

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().absolute()
        self.data_dirs = [Path(d).expanduser().absolute() for d in self.data_dirs] or [self.state_dir / "data"]
        if len(set(self.data_dirs)) != len(self.data_dirs):
            raise ValueError("a data dir is listed twice: give each SSD's directory once")
        if not self.socket:
            runtime = os.environ.get("XDG_RUNTIME_DIR")
            self.socket = str(Path(runtime) / "hcache" / "hcached.sock" if runtime
                              else default_socket_path(self.state_dir))
        if self.io_engine not in IO_ENGINES:
            raise ValueError(f"io_engine {self.io_engine!r} is not one of {IO_ENGINES}")
        if self.dram < 16 << 20:
            raise ValueError(f"dram {self.dram} bytes is too small: give the arena at least 16MiB")
        if self.slab_size < 1 << 20 or self.slab_size % 4096:
            raise ValueError("slab_size must be a multiple of 4KiB and at least 1MiB")
        if self.read_throttle < 0:
            raise ValueError("read_throttle must be >= 0 bytes/s (0: no cap)")
        if self.lease_timeout <= 0:
            raise ValueError("lease_timeout must be positive (seconds)")
        if self.tcp and self.tcp.count(":") != 1:
            raise ValueError(f"tcp {self.tcp!r} must be HOST:PORT")
        if self.metrics.isdigit():
            self.metrics = f"127.0.0.1:{self.metrics}"
        if self.metrics and (self.metrics.count(":") != 1 or not self.metrics.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"metrics {self.metrics!r} must be HOST:PORT or PORT")
        if self.capacity < 0 or self.dir_capacity < 0:
            raise ValueError("capacity and dir_capacity must be >= 0 bytes (0: bounded by the file system)")
        if not 0 < self.low_watermark < self.high_watermark <= 1:
            raise ValueError(f"watermarks must satisfy 0 < low ({self.low_watermark}) < high "
                             f"({self.high_watermark}) <= 1, as fractions of capacity")
        if self.ttl < 0:
            raise ValueError("ttl must be >= 0 seconds (0: contexts never expire)")
        self.log_level = self.log_level.upper()
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level {self.log_level!r} is not one of {LOG_LEVELS}")


def reload_into(running: Config, new: Config) -> tuple[dict[str, tuple[object, object]], list[str]]:
    """Copy the live settings of `new` into the running config; returns what changed (key: (old, new)) and
    the keys that differ but only take effect after a restart."""
    changed = {}
    for key in LIVE_KEYS:
        old, value = getattr(running, key), getattr(new, key)
        if old != value:
            setattr(running, key, value)
            changed[key] = (old, value)
    restart = [f.name for f in fields(Config) if f.name not in LIVE_KEYS
               and getattr(running, f.name) != getattr(new, f.name)]
    return changed, restart
