"""Host identity used as a placement hint ("put it on the writer's host").

Only a hint: whether a client may copy one-sided is decided by opening the
pool file and checking its incarnation, never by this id or an IP address.
"""

from __future__ import annotations

import functools
import socket


@functools.cache
def host_id(configured: str = "") -> str:
    if configured:
        return configured
    machine = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as fh:
                machine = fh.read().strip()
                break
        except OSError:
            continue
    return f"{socket.gethostname()}/{machine[:12]}" if machine else socket.gethostname()
