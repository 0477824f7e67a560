"""Loopback ports for a server a test starts later, or for nobody at all.

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range, the
same range every outgoing connection draws its local port from. Between the
moment the probe socket closes and the moment ``alertd start`` binds it, a
child's connection to RabbitMQ, PostgreSQL or a test server may take that very
port, and the bind fails with "Address already in use" (seen in CI).
Ports below the ephemeral range are never handed out that way, so a random
free one there stays free until the test binds it.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

_FIRST = 20000  # below the usual ephemeral range, above most well-known services


def _ephemeral_floor() -> int:
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return low


def free_port() -> int:
    """A loopback TCP port outside the ephemeral range that nobody listens on now."""
    last = _ephemeral_floor() - 1
    if last <= _FIRST:
        raise RuntimeError(f"the ephemeral port range starts at {last + 1}; "
                           f"no room below it for test ports")
    for _ in range(200):
        port = random.randint(_FIRST, last)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in {_FIRST}..{last}")
