"""glibc malloc settings for alertd's long-lived processes: reuse freed memory, do not return it.

Every alert allocates and frees the same few megabytes: a download's body
chunks in a child, libav's frame buffers in a PyAV helper. With glibc's
defaults, a free that leaves more than a few hundred KiB at the top of the
heap gives it back to the kernel (trim), and blocks above the mmap threshold
get their own mapping, so the next alert faults every page in again, zeroed.
On a VM that costs more than the work itself: a PyAV probe of a 2 MB clip
took 303 page faults and 4.3 ms of CPU with the defaults, 0 and 2.2 ms with
these settings (docs/tuning.md).

With them a process keeps what it freed, up to ``TRIM_THRESHOLD`` at the top
of its heap, and reuses it: its resident size is its peak use, not its
current use. Blocks over ``MMAP_THRESHOLD`` still get their own mapping and
go back when freed.
"""

from __future__ import annotations

import ctypes
import os

# mallopt(3) parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest accepted value on 64-bit
TRIM_THRESHOLD = 64 * 2**20

# An operator who set any of these chose the allocator's behaviour; theirs wins.
_OPERATOR_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Set glibc's trim and mmap thresholds for this process; True if they were set.

    False, changing nothing, when the operator set malloc's thresholds in the
    environment (``MALLOC_*_`` or ``glibc.malloc`` in ``GLIBC_TUNABLES``) or
    the C library is not glibc (musl's ``mallopt`` does nothing and says so).
    """
    if any(name in os.environ for name in _OPERATOR_SETTINGS) or (
        "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # Order matters: setting the mmap threshold also turns off glibc's
    # dynamic adjustment of both, which would otherwise move them again.
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
