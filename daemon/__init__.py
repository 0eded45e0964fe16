"""hcached: the per-host daemon that owns hcache's bytes (no torch here: it only moves bytes)."""
