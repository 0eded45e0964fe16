"""The wire protocol between clients and hcached: msgpack header frames, versioned, plus raw payload frames.

A request is [header, *payload frames]; the header is a map with "v" (protocol version), "op", "id"
(the caller's call id) and the op's arguments. A reply is [header, *payload frames] with "id", "ok",
and either the op's results or "error" (a code below) and "message" (what to do about it).

Requests that lease arena space (append and read without inline, commit, abort, release) may name the arena the
client mapped ("arena": the path hello gave it); a daemon with another arena, one started since, refuses them with
RESTARTED, before they take effect. An append may name the length it continues from ("at"); a context of another
length refuses it with CONFLICT.
"""

from typing import Any

import msgpack

PROTOCOL_VERSION = 1

OPS = frozenset(
    {"hello", "open", "append", "commit", "abort", "flush", "read", "release", "stat", "list", "delete",
     "status", "pin", "evict", "fsck", "stats", "lookup", "fork", "truncate"}
)

# Error codes carried in replies; the client maps each to an HCacheError subclass.
BAD_REQUEST = "bad_request"
UNKNOWN_CONTEXT = "unknown_context"
MODEL_MISMATCH = "model_mismatch"
BAD_LEASE = "bad_lease"
BUSY = "busy"
OVER_CAPACITY = "over_capacity"
CORRUPT = "corrupt"
IO_ERROR = "io_error"
INTERNAL = "internal"
RESTARTED = "restarted"
CONFLICT = "conflict"


class WireError(Exception):
    """A request the daemon refuses; becomes an error reply, never a crash."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def decode(frame: bytes | memoryview) -> dict[str, Any]:
    """Decode a header frame; anything but a msgpack map is a bad request."""
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types for garbage
        raise WireError(BAD_REQUEST, f"header frame is not valid msgpack ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WireError(BAD_REQUEST, f"header must be a msgpack map, got {type(header).__name__}")
    return header


def get(header: dict[str, Any], name: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    """Read a typed field of a request, raising a bad_request that names the field."""
    if name not in header:
        if default is ...:
            raise WireError(BAD_REQUEST, f"request is missing field {name!r}")
        return default
    value = header[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        expected = " or ".join(t.__name__ for t in _as_tuple(kind))
        raise WireError(BAD_REQUEST, f"field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def get_count(header: dict[str, Any], name: str, default: Any = ...) -> int:
    value = get(header, name, int, default)
    if value < 0:
        raise WireError(BAD_REQUEST, f"field {name!r} must be >= 0, got {value}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
