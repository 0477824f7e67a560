"""What /proc says about a process the tests started (or that a process they started forked)."""

from __future__ import annotations

from pathlib import Path


def is_reaped(pid: int) -> bool:
    """Gone from the process table: not even a zombie waiting for its parent."""
    return not Path(f"/proc/{pid}").exists()


def is_alive(pid: int) -> bool:
    """Running or stopped; a zombie (dead, not yet reaped by init) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def minor_faults(pid: int) -> int:
    """Page faults the process has taken that needed no disk read (``minflt`` in /proc/pid/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])
