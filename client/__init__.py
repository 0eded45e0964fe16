"""hcache's client SDK: HCacheClient (blocking) and AsyncHCacheClient save and restore through hcached."""

from typing import Any

from hcache.client.errors import (
    BadRequest,
    Busy,
    ContextChanged,
    CorruptChunk,
    DaemonUnreachable,
    HCacheError,
    LeaseError,
    ModelMismatch,
    OverCapacity,
    StorageIOError,
    UnknownContext,
)
from hcache.layout.geometry import Geometry

__all__ = ["AsyncHCacheClient", "BadRequest", "Busy", "ContextChanged", "ContextInfo", "CorruptChunk",
           "DaemonUnreachable", "Geometry", "HCacheClient", "HCacheError", "LeaseError", "ModelMismatch",
           "OverCapacity", "StorageIOError", "UnknownContext", "plan"]

_LAZY = {"HCacheClient": "hcache.client.sync", "AsyncHCacheClient": "hcache.client.aio",
         "ContextInfo": "hcache.client.layout", "plan": "hcache.client.planner"}


def __getattr__(name: str) -> Any:
    # torch loads only when a data-path class is first used, so hcachectl starts fast.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
