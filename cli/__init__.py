"""Command-line entry points: hcached (the daemon) and hcachectl (its operator tool)."""
