"""Where hcached keeps its state and socket by default; shared so clients find the daemon."""

import os
from pathlib import Path


def default_state_dir() -> Path:
    home = os.environ.get("HCACHE_HOME")
    return Path(home) if home else Path.home() / ".local" / "state" / "hcache"


def default_socket_path(state_dir: Path | None = None) -> Path:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if state_dir is None and runtime:
        return Path(runtime) / "hcache" / "hcached.sock"
    return (state_dir or default_state_dir()) / "hcached.sock"


def endpoint_for(socket: str | os.PathLike) -> str:
    """A ZeroMQ endpoint for a socket path or URL: paths become ipc://, URLs pass through."""
    s = os.fspath(socket)
    return s if "://" in s else f"ipc://{os.path.abspath(s)}"


def missing_ipc_socket(endpoint: str) -> str | None:
    """The socket path when an ipc endpoint has no socket file (no daemon there), else None."""
    if endpoint.startswith("ipc://") and not os.path.exists(endpoint[len("ipc://"):]):
        return endpoint[len("ipc://"):]
    return None


def client_endpoint(socket: str | os.PathLike | None = None) -> str:
    """Where a client connects: the argument, else $HCACHE_SOCKET, else the default socket."""
    if socket is None:
        socket = os.environ.get("HCACHE_SOCKET") or default_socket_path()
    return endpoint_for(socket)
