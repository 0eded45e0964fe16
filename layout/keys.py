"""Deterministic context keys: blake2b over canonical bytes, identical across processes and restarts."""

import hashlib

KEY_BYTES = 16


def _key_of(person: bytes, *parts: str) -> bytes:
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=person)
    for part in parts:
        raw = part.encode("utf-8")
        h.update(len(raw).to_bytes(4, "little"))
        h.update(raw)
    return h.digest()


def context_key(namespace: str, context_id: str) -> bytes:
    """The 16-byte key of a context; never Python's hash(), which differs per process."""
    return _key_of(b"hcache-ctx", namespace, context_id)


def prefix_domain(model: str, namespace: str) -> bytes:
    """What content keys are computed within: one model in one namespace (sharing never crosses either)."""
    return _key_of(b"hcache-domain", model, namespace)


def chunk_content_key(domain: bytes, previous: bytes | None, token_ids: bytes) -> bytes:
    """The key of a full chunk: its token ids (int32 little-endian) after the key of the chunk before it, so a key
    names the whole prefix up to the chunk's end, as a layer's hidden state at a position depends on all before."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"hcache-prefix")
    h.update(domain)
    h.update(previous or bytes(KEY_BYTES))
    h.update(token_ids)
    return h.digest()


def prefix_keys(domain: bytes, token_ids: bytes, chunk_bytes: int) -> list[bytes]:
    """The content keys of every full chunk of a run of token ids (int32 little-endian, from position 0)."""
    keys: list[bytes] = []
    for at in range(0, len(token_ids) - chunk_bytes + 1, chunk_bytes):
        keys.append(chunk_content_key(domain, keys[-1] if keys else None, token_ids[at : at + chunk_bytes]))
    return keys


def shared_chunk_name(content_key: bytes, layer: int, rep: int) -> bytes:
    """The index's name for the shared chunk of one (layer, representation) at a content key."""
    h = hashlib.blake2b(digest_size=KEY_BYTES, person=b"hcache-shared")
    h.update(content_key)
    h.update(layer.to_bytes(4, "little") + rep.to_bytes(4, "little"))
    return h.digest()
