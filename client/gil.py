"""A shorter GIL switch interval while hcache's IO threads share the interpreter with a model's busy thread."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

# A thread that launches GPU kernels runs Python almost without pause; another thread waiting for the GIL gets it
# only when the interval runs out. At CPython's default 5 ms, every hand-off in a read (send, reply, copy,
# release) waited that long: a 16 MiB read that took 22 ms alone took 80-100 ms beside a busy thread, 30 ms at
# 0.5 ms (measured on this project's CPU VM).
SWITCH_INTERVAL_S = 0.0005

_lock = threading.Lock()
_users = 0
_saved = 0.0


@contextlib.contextmanager
def responsive() -> Iterator[None]:
    """Within the block (nested or in several threads at once), the switch interval is at most 0.5 ms."""
    global _users, _saved
    with _lock:
        if _users == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved, SWITCH_INTERVAL_S))
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                sys.setswitchinterval(_saved)
