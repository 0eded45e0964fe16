"""How hcache lays bytes out: geometry, chunks, on-disk headers, wire messages, keys."""
