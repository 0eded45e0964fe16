"""The hcached entry point: flags, HCACHE_* variables and the config file resolved into a Config, then the daemon."""

import argparse
import os
import sys

from hcache.daemon.config_sources import CONFIG_ENV, KEYS, ConfigError, ConfigSources, render


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hcached", description="hcache storage daemon (one per host). Every setting is a flag, an HCACHE_* "
        "variable (HCACHE_CAPACITY=1TiB) and a key of the TOML config file; a flag wins over the variable, which "
        "wins over the file.")
    p.add_argument("--config", metavar="FILE", help=f"TOML config file (default: ${CONFIG_ENV}, else none)")
    p.add_argument("--print-config", action="store_true",
                   help="print the effective settings and where each came from, then exit")
    for key in KEYS.values():
        if key.name == "data_dirs":
            p.add_argument(key.flag, dest=key.name, action="append", metavar=key.metavar, help=key.help)
        else:
            p.add_argument(key.flag, dest=key.name, metavar=key.metavar, help=key.help)
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    flags = {name: value for name, value in vars(args).items() if name in KEYS and value is not None}
    try:
        sources = ConfigSources(flags, os.environ, args.config)
        resolved = sources.resolve()
    except ConfigError as e:
        sys.exit(f"hcached: {e}")
    if args.print_config:
        print(render(resolved))
        return
    from hcache.daemon.main import run

    run(sources, resolved)


if __name__ == "__main__":
    main()
