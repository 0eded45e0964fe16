"""Where hcached's settings come from: flag > HCACHE_* variable > TOML file > default, each value with its origin."""

import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hcache.daemon.config import IO_ENGINES, LOG_LEVELS, Config
from hcache.layout.units import parse_duration, parse_size

ENV_PREFIX = "HCACHE_"
CONFIG_ENV = "HCACHE_CONFIG"


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {v!r}")
    return v


def _paths(v: Any) -> list[Path]:
    items = v.split(os.pathsep) if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise ValueError(f"expected a list of directories, got {v!r}")
    return [Path(i) for i in items]


def _fraction(v: Any) -> float:
    if isinstance(v, str) and v.strip().endswith("%"):
        return float(v.strip()[:-1]) / 100
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        raise ValueError(f"expected a fraction like 0.9 or 90%, got {v!r}")
    return float(v)


def _choice(options: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        for option in options:
            if isinstance(v, str) and v.lower() == option.lower():
                return option
        raise ValueError(f"expected one of {', '.join(options)}, got {v!r}")
    return parse


@dataclass(frozen=True, slots=True)
class Key:
    """One setting: its name in the file, how its text is parsed, what it means."""

    name: str
    parse: Callable[[Any], Any]
    help: str
    metavar: str

    @property
    def flag(self) -> str:
        return "--data-dir" if self.name == "data_dirs" else "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()


KEYS: dict[str, Key] = {k.name: k for k in (
    Key("state_dir", lambda v: Path(_text(v)), "index and lock (default: $HCACHE_HOME or ~/.local/state/hcache)",
        "DIR"),
    Key("data_dirs", _paths, "a data dir, one per SSD; repeat the flag for several (env: separated by ':') "
        "(default: STATE_DIR/data)", "DIR"),
    Key("socket", _text, "ipc socket (default: $XDG_RUNTIME_DIR/hcache/hcached.sock, else STATE_DIR/hcached.sock)",
        "PATH"),
    Key("dram", parse_size, "arena (DRAM snapshot buffer) size, e.g. 4GiB", "SIZE"),
    Key("capacity", parse_size, "disk bytes for slabs over all data dirs (0: what the file systems hold)", "SIZE"),
    Key("dir_capacity", parse_size, "disk bytes for slabs in each data dir (0: what its file system holds)", "SIZE"),
    Key("high_watermark", _fraction, "usage (fraction of capacity) above which LRU contexts are evicted", "FRACTION"),
    Key("low_watermark", _fraction, "usage (fraction of capacity) eviction brings it back under", "FRACTION"),
    Key("ttl", parse_duration, "evict contexts not accessed for this long, e.g. 7d (0: never)", "DURATION"),
    Key("tcp", _text, "also serve remote clients over tcp", "HOST:PORT"),
    Key("metrics", _text, "serve Prometheus text at http://HOST:PORT/metrics (off by default)", "HOST:PORT"),
    Key("io_engine", _choice(IO_ENGINES), "IO engine: auto, io_uring or threads", "ENGINE"),
    Key("slab_size", parse_size, "size of each preallocated slab file", "SIZE"),
    Key("lease_timeout", parse_duration, "how long a client may hold a lease (seconds)", "SECONDS"),
    Key("flush_batch", parse_size, "bytes written per IO submission by the flusher", "SIZE"),
    Key("log_level", _choice(LOG_LEVELS), "DEBUG, INFO, WARNING or ERROR", "LEVEL"),
    Key("read_throttle", parse_size, "cap disk reads at SIZE bytes/s (emulates a slower disk for benchmarks)",
        "SIZE"),
)}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names where it came from."""


@dataclass(frozen=True, slots=True)
class Resolved:
    config: Config
    origins: dict[str, str]  # key -> "flag --x", "env HCACHE_X", "file PATH" or "default"
    path: Path | None  # the config file read, if any


class ConfigSources:
    """The flags hcached was started with, its environment and its config file; resolve() reads the file anew,
    so SIGHUP sees what an operator edited."""

    def __init__(self, flags: Mapping[str, Any], env: Mapping[str, str], config_file: str | None = None) -> None:
        unknown = set(flags) - set(KEYS)
        if unknown:
            raise ConfigError(f"unknown settings {sorted(unknown)}")
        self.flags = dict(flags)
        self.env = {k.name: env[k.env] for k in KEYS.values() if env.get(k.env, "") != ""}
        given = config_file or env.get(CONFIG_ENV) or None
        self.path = Path(given).expanduser().absolute() if given else None

    def _file(self) -> dict[str, Any]:
        if self.path is None:
            return {}
        try:
            with open(self.path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config file {self.path} does not exist: create it (systemd/hcached.toml is an "
                              "example) or start hcached without --config / HCACHE_CONFIG") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"config file {self.path}: {e}") from None
        unknown = sorted(set(data) - set(KEYS))
        if unknown:
            raise ConfigError(f"config file {self.path}: unknown keys {unknown}; known keys: {sorted(KEYS)}")
        return data

    def resolve(self) -> Resolved:
        values: dict[str, Any] = {}
        origins = {name: "default" for name in KEYS}
        layers = [(self._file(), lambda k: f"file {self.path}"), (self.env, lambda k: f"env {k.env}"),
                  (self.flags, lambda k: f"flag {k.flag}")]
        for source, origin in layers:  # lowest precedence first; later ones win
            for name, raw in source.items():
                key = KEYS[name]
                try:
                    values[name] = key.parse(raw)
                except ValueError as e:
                    raise ConfigError(f"{origin(key)}: {name}: {e}") from None
                origins[name] = origin(key)
        try:
            cfg = Config(**values)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{e} (check {', '.join(sorted({origins[n] for n in values}))})") from None
        return Resolved(cfg, origins, self.path)


def render(resolved: Resolved) -> str:
    """The effective settings as TOML, each with where it came from: usable as a config file."""
    lines = []
    width = max(len(n) for n in KEYS)
    for name in KEYS:
        value = getattr(resolved.config, name)
        if KEYS[name].parse is parse_size:
            value = _exact_size(value)
        lines.append(f"{name.ljust(width)} = {_toml(value)}  # {resolved.origins[name]}")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Path | str):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _exact_size(n: int) -> int | str:
    """4294967296 -> "4GiB"; sizes that are no whole number of KiB stay byte counts."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return n
