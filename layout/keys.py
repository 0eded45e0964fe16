"""Deterministic context keys: blake2b over canonical bytes, identical across processes and restarts."""

import hashlib

KEY_BYTES = 16


def context_key(namespace: str, context_id: str) -> bytes:
    """The 16-byte key of a context; never Python's hash(), which differs per process."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"hcache-ctx")
    for part in (namespace, context_id):
        raw = part.encode("utf-8")
        h.update(len(raw).to_bytes(4, "little"))
        h.update(raw)
    return h.digest()
