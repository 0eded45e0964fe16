"""sd_notify: tell systemd (Type=notify) that hcached is ready, reloading or stopping."""

import logging
import os
import socket

log = logging.getLogger("hcache.daemon")


def notify(state: str) -> bool:
    """Send one state ("READY=1", "STOPPING=1", ...) to $NOTIFY_SOCKET; False when not run under systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode())
    except OSError as e:
        log.warning("could not notify systemd at %s (%s): %s", os.environ["NOTIFY_SOCKET"], state, e)
        return False
    return True
