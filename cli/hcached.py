"""The hcached entry point: parses flags into a daemon Config and runs the daemon."""

import argparse
import sys

from hcache.daemon.config import Config
from hcache.layout.units import parse_size


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hcached", description="hcache storage daemon (one per host)")
    p.add_argument("--data-dir", action="append", default=[], metavar="DIR",
                   help="a data dir, one per SSD; repeat for several (default: STATE_DIR/data)")
    p.add_argument("--state-dir", metavar="DIR", help="index and lock (default: $HCACHE_HOME or ~/.local/state/hcache)")
    p.add_argument("--socket", metavar="PATH", help="ipc socket (default: $XDG_RUNTIME_DIR/hcache/hcached.sock)")
    p.add_argument("--dram", type=parse_size, metavar="SIZE", help="arena (DRAM snapshot buffer) size, e.g. 4GiB")
    p.add_argument("--capacity", type=parse_size, metavar="SIZE", help="disk bytes for slabs over all data dirs")
    p.add_argument("--tcp", metavar="HOST:PORT", help="also serve remote clients over tcp")
    p.add_argument("--io-engine", choices=["auto", "io_uring", "threads"], help="IO engine (default: auto)")
    p.add_argument("--slab-size", type=parse_size, metavar="SIZE", help="size of each preallocated slab file")
    p.add_argument("--lease-timeout", type=float, metavar="SECONDS", help="how long a client may hold a lease")
    p.add_argument("--read-throttle", type=parse_size, metavar="SIZE",
                   help="cap disk reads at SIZE bytes/s (emulates a slower disk for benchmarks)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v not in (None, [])}
    if "data_dir" in given:
        given["data_dirs"] = given.pop("data_dir")
    try:
        cfg = Config(**given)
    except ValueError as e:
        sys.exit(f"hcached: {e}")
    from hcache.daemon.main import run

    run(cfg)


if __name__ == "__main__":
    main()
