"""The daemon's configuration: one validated dataclass with the defaults an operator expects."""

import os
from dataclasses import dataclass, field
from pathlib import Path

from hcache.layout.paths import default_socket_path, default_state_dir

IO_ENGINES = ("auto", "io_uring", "threads")


@dataclass(slots=True)
class Config:
    """Everything hcached needs to start; paths are resolved in __post_init__."""

    state_dir: Path = field(default_factory=default_state_dir)
    data_dirs: list[Path] = field(default_factory=list)
    socket: str = ""
    dram: int = 1 << 30
    capacity: int = 0  # total disk bytes for slabs; 0 = bounded only by the file systems
    tcp: str = ""
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
