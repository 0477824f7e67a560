"""The systemd notify protocol without a dependency: one datagram per message."""

from __future__ import annotations

import os
import socket
import time

_last_sent: dict[str, float] = {}
_last_watchdog = 0.0


def enabled() -> bool:
    return bool(os.environ.get("NOTIFY_SOCKET"))


def notify(message: str, *, throttle_s: float = 0.0) -> bool:
    """Send ``message`` to $NOTIFY_SOCKET; False when unset or unreachable."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    key = message.split("=", 1)[0]
    now = time.monotonic()
    if throttle_s and now - _last_sent.get(key, 0.0) < throttle_s:
        return False
    _last_sent[key] = now
    if path.startswith("@"):
        path = "\0" + path[1:]  # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(path)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def notify_watchdog() -> None:
    """WATCHDOG=1 at a third of WATCHDOG_USEC; only called while heartbeats are fresh."""
    global _last_watchdog  # noqa: PLW0603 - one master per process
    watched = os.environ.get("WATCHDOG_PID")
    if watched and watched != str(os.getpid()):
        return  # systemd watches another process of ours, not this one
    usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
    interval = usec / 3e6 if usec else 1.0
    now = time.monotonic()
    if now - _last_watchdog >= interval:
        _last_watchdog = now
        notify("WATCHDOG=1")
