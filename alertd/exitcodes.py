"""Process exit codes: the one place they are defined (README "Exit codes" mirrors this)."""

from __future__ import annotations

import signal

EXIT_OK = 0
"""Clean stop: a graceful or fast shutdown finished."""

EXIT_CRASH = 1
"""An unexpected error; the master restarts such a child with backoff."""

EXIT_USAGE = 2
"""Bad command line (click's own code)."""

EXIT_CONFIG = 3
"""Bad configuration or database schema: refused at start. A child that exits
with this while no child consumes makes the master halt with it too, instead
of fork-looping; during a HUP rollover the master goes back to the previous
config instead, and otherwise the others keep serving while it backs off."""

EXIT_RECYCLED = 4
"""A child left on purpose (--max-alerts-per-child / --max-memory-per-child);
the master replaces it at once, without backoff, unless it left before a
single alert (a memory limit below a child's own size): then with backoff."""


def signal_name(number: int) -> str:
    """SIGKILL for 9; a real-time signal, which has no name of its own, by number."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
