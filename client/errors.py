"""The client's exceptions: one HCacheError subclass per daemon error code, each saying what to do."""

from hcache.layout import wire


class HCacheError(Exception):
    """Base of every error hcache raises to a caller."""

    code = "error"


class DaemonUnreachable(HCacheError):
    code = "unreachable"


def no_daemon_at(endpoint: str, detail: str) -> DaemonUnreachable:
    return DaemonUnreachable(f"hcached {detail} at {endpoint}: start hcached, or point HCACHE_SOCKET (or "
                             "--socket / socket=...) at the socket it listens on")


class BadRequest(HCacheError):
    code = wire.BAD_REQUEST


class UnknownContext(HCacheError, KeyError):
    code = wire.UNKNOWN_CONTEXT

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelMismatch(HCacheError):
    code = wire.MODEL_MISMATCH


class LeaseError(HCacheError):
    code = wire.BAD_LEASE


class Busy(HCacheError):
    code = wire.BUSY


class OverCapacity(HCacheError):
    code = wire.OVER_CAPACITY


class CorruptChunk(HCacheError):
    code = wire.CORRUPT


class StorageIOError(HCacheError):
    code = wire.IO_ERROR


class DaemonInternalError(HCacheError):
    code = wire.INTERNAL


class DaemonRestarted(HCacheError):
    """hcached was restarted since this client mapped its arena; the client maps the new one and retries once."""

    code = wire.RESTARTED


class ContextChanged(HCacheError):
    """A context does not hold what its writer saw or the model's cache holds: another writer, tokens lost with a
    restart or an eviction, or a conversation that differs from it."""

    code = wire.CONFLICT


class UnsupportedModel(HCacheError):
    """The model's architecture has no projection here: its layers' K/V cannot be rebuilt bit-exactly."""

    code = "unsupported_model"


_BY_CODE = {cls.code: cls for cls in (BadRequest, UnknownContext, ModelMismatch, LeaseError, Busy, OverCapacity,
                                      CorruptChunk, StorageIOError, DaemonInternalError, DaemonRestarted,
                                      ContextChanged)}


def from_reply(reply: dict) -> HCacheError:
    """The exception an error reply stands for."""
    cls = _BY_CODE.get(reply.get("error"), HCacheError)
    return cls(str(reply.get("message", "hcached refused the request without saying why")))
